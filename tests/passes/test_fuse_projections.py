"""fuse-projections on the tiny decoders: structure, exact numerics, honest `modified`, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgedec.passes.base import PassError, create_pass


@pytest.fixture(scope="module")
def unfused(tiny, tmp_path_factory):
    """The tiny model exported without the cpu target's passes."""
    from edgedec.compiler import export
    from edgedec.models.source import load

    loaded = load(str(tiny["dir"]))
    path = export.export_decoder(loaded.model, loaded.arch, tmp_path_factory.mktemp("unfused") / "d.onnx", 64)
    return onnx.load(str(path))


def _run(model, steps=(5, 1, 3)):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    layers = sum(1 for i in s.get_inputs() if i.name.startswith("past_key."))
    kv = s.get_inputs()[4].shape
    past = [np.zeros((1, kv[1], 16, kv[3]), np.float32) for _ in range(2 * layers)]
    ids = np.random.default_rng(0).integers(0, 200, sum(steps))
    outs, start = [], 0
    for n in steps:
        feed = {f"past_{k}.{l}": past[2 * l + j] for l in range(layers) for j, k in enumerate(("key", "value"))}
        feed.update(input_ids=ids[None, start:start + n], seqlens_k=np.array([start + n - 1], np.int32),
                    total_sequence_length=np.array(start + n, np.int32), logits_index=np.arange(n))
        logits, *past = s.run(None, feed)
        outs.append(logits)
        start += n
    return np.concatenate(outs, axis=1)


def test_fuses_qkv_into_packed_attention_and_gate_up_into_split(tiny, unfused):
    result = create_pass("fuse-projections")(unfused)
    assert result.modified and result.report == {"fused": {"qkv": 2, "siblings": 2}}
    ops = Counter(n.op_type for n in result.model.graph.node)
    before = Counter(n.op_type for n in unfused.graph.node)
    assert ops["MatMul"] == before["MatMul"] - 2 * 3  # per layer: q,k,v -> 1 and gate,up -> 1
    assert ops["Split"] == 2
    for gqa in (n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"):
        assert gqa.input[1] == gqa.input[2] == ""  # packed QKV in `query`
    np.testing.assert_allclose(_run(result.model), _run(unfused), rtol=0, atol=1e-5)


def test_second_run_changes_nothing(unfused):
    p = create_pass("fuse-projections")
    once = p(unfused).model
    again = p(once)
    assert not again.modified and len(again.model.graph.node) == len(once.graph.node)


def test_siblings_only(unfused):
    result = create_pass("fuse-projections", {"qkv": False})(unfused)
    assert result.report == {"fused": {"qkv": 0, "siblings": 4}}  # q/k/v fused with a Split instead
    assert all(n.input[1] for n in result.model.graph.node if n.op_type == "GroupQueryAttention")
    np.testing.assert_allclose(_run(result.model), _run(unfused), rtol=0, atol=1e-5)


def test_requires_a_float_graph():
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(PassError, match="no MatMul found: fuse-projections needs the float decoder graph"):
        create_pass("fuse-projections")(empty)


def test_config_types_are_checked_with_postponed_annotations():
    from edgedec.errors import ConfigError

    with pytest.raises(ConfigError, match="FuseProjectionsConfig.qkv must be bool, got 'yes'"):
        create_pass("fuse-projections", {"qkv": "yes"})
