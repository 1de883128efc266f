"""The npu target: static-shape standard-op graph, host-side cache, QDQ numerics against the fp32 bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgedec.errors import ConfigError, GenerationError, UnsupportedError
from edgedec.runtime import Engine

NPU_CHUNK, NPU_CAPACITY = 8, 64  # as in conftest.py

PROMPT = list(range(5, 25))  # 20 tokens: more than two chunks of 8


def test_graphs_are_static_and_standard(npu_bundle):
    """A prefill graph of C tokens and a one-token decode graph, the same nodes over one weight file."""
    manifest = json.loads((npu_bundle / "manifest.json").read_text())
    graphs = manifest["graphs"]
    assert graphs["decoder"]["chunk"] == 1 and graphs["prefill"]["chunk"] == NPU_CHUNK
    assert graphs["decoder"]["data"] == graphs["prefill"]["data"] == ["weights.data"]
    assert manifest["kv_cache"]["max_capacity"] == NPU_CAPACITY and manifest["kv_cache"]["in_place"] is False
    models = {role: onnx.load(str(npu_bundle / g["file"]), load_external_data=False) for role, g in graphs.items()}
    assert [n.op_type for n in models["decoder"].graph.node] == [n.op_type for n in models["prefill"].graph.node]
    for role, chunk in (("decoder", 1), ("prefill", NPU_CHUNK)):
        model = models[role]
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        ops = {n.op_type for n in model.graph.node}
        assert "GroupQueryAttention" not in ops and {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
        for v in list(model.graph.input) + list(model.graph.output):
            assert all(d.dim_value > 0 and not d.dim_param for d in v.type.tensor_type.shape.dim), v.name
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
        assert shapes["input_ids"] == [1, chunk]
        assert shapes["attention_mask"] == [1, 1, chunk, NPU_CAPACITY + chunk]
        assert shapes["past_key.0"][2] == NPU_CAPACITY
    assert manifest["passes"][0]["pass"] == "qdq" and manifest["passes"][0]["report"]["quantized"] > 0


def test_float_static_graph_matches_cpu_bundle(npu_float_bundle, tiny_llama_bundle):
    """Without quantization the static graph (chunked prefill, padding, host cache) is the same model."""
    npu = Engine.load(npu_float_bundle, threads=1)
    ref = Engine.load(tiny_llama_bundle, threads=1, context_length=NPU_CAPACITY)
    assert npu.decoder.provider == "CPUExecutionProvider"  # QNN is not here: the recorded fallback
    a = npu.decoder.forward(PROMPT, logits_rows=range(len(PROMPT)))
    b = ref.decoder.forward(PROMPT, logits_rows=range(len(PROMPT)))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert npu.decoder._one.chunk == 1  # single tokens run on the one-token graph
    for tok in (7, 3, 11):  # single-token steps on the cache
        np.testing.assert_allclose(npu.decoder.decode_one(tok), ref.decoder.decode_one(tok), atol=1e-4)
    x = [t.id for t in npu.generate(PROMPT, max_new_tokens=24, ignore_eos=True)]
    y = [t.id for t in ref.generate(PROMPT, max_new_tokens=24, ignore_eos=True)]
    assert x == y


def test_speculation_on_static_graph_is_lossless(npu_float_bundle):
    """Multi-token verification and rollback work on the host cache: greedy output is unchanged."""
    e = Engine.load(npu_float_bundle, threads=1)
    ids = PROMPT * 2
    plain = [t.id for t in e.generate(ids, max_new_tokens=20, ignore_eos=True, drafter=None)]
    spec = [t.id for t in e.generate(ids, max_new_tokens=20, ignore_eos=True, drafter="ngram",
                                     adaptive_draft=False)]
    assert plain == spec
    stats = e.last_stats  # the repeated prompt gives the n-gram drafter matches: drafts were made and verified
    assert stats.verify_steps > 0 and stats.drafted_tokens > 0  # (rejected ones rolled back on the host cache)


def test_qdq_numerics_against_fp32(npu_bundle, tiny_llama_bundle):
    """A16W8 on the tiny model: logits close to float32, greedy tokens agree."""
    npu = Engine.load(npu_bundle, threads=1)
    ref = Engine.load(tiny_llama_bundle, threads=1, context_length=NPU_CAPACITY)
    a = npu.decoder.forward(PROMPT, logits_rows=range(len(PROMPT)))
    b = ref.decoder.forward(PROMPT, logits_rows=range(len(PROMPT)))
    assert np.abs(a - b).max() < 0.15 * np.abs(b).max()  # random tiny weights: A16W8 error ~7% of the logit scale
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    x = [t.id for t in npu.generate(PROMPT, max_new_tokens=16, ignore_eos=True)]
    y = [t.id for t in ref.generate(PROMPT, max_new_tokens=16, ignore_eos=True)]
    assert sum(i == j for i, j in zip(x, y)) / len(y) >= 0.75, (x, y)


def test_eval_runs_on_npu_bundle(npu_bundle, tiny_llama_bundle):
    from edgedec.evaluate import EvalOptions, evaluate
    from _tiny import sample_text

    r = evaluate(npu_bundle, [("t", sample_text())], EvalOptions(window=64, stride=32, max_tokens=200),
                 reference=tiny_llama_bundle)
    assert 0.9 < r.perplexity_ratio < 1.1
    assert r.greedy_agreement >= 0.8


def test_context_is_the_static_cache(npu_bundle):
    e = Engine.load(npu_bundle, threads=1)
    with pytest.raises(GenerationError, match="do not fit"):
        e.decoder.forward(list(range(NPU_CAPACITY + 1)))
    with pytest.raises(GenerationError, match="context_length"):
        Engine.load(npu_bundle, context_length=NPU_CAPACITY + 1)


@pytest.mark.parametrize("spec, match", [
    (("int4", ()), "target npu cannot take pass int4: .*MatMulNBits"),
    (("fuse-projections", ()), "target npu cannot take pass fuse-projections: .*GroupQueryAttention"),
    (("qdq", (("lm_head", "fp32"),)), "target npu cannot take qdq:lm_head=fp32"),
])
def test_refused_before_any_work(spec, match, tmp_path):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    with pytest.raises(UnsupportedError, match=match):
        compile_model("/nonexistent/model", tmp_path / "b", CompileOptions(target="npu", passes=(spec,)))
    assert not (tmp_path / "b").exists()


def test_chunk_only_for_static_targets(tmp_path):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    with pytest.raises(ConfigError, match="chunk applies to static-shape targets"):
        compile_model("/nonexistent/model", tmp_path / "b", CompileOptions(target="cpu", chunk=16))
