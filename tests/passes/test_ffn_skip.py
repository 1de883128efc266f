"""ffn-skip: calibration, the pass (If per skippable layer), the runtime controller, eval and the drafter.

A tiny random 6-layer Llama: the plain bundle is the reference; a skipped block is checked against a
graph from which that FFN block was cut out independently (here, by rewiring the residual Add).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _tiny  # noqa: E402

from edgedec.calibrate import FfnStats, calibrate_ffn, plan_skipping  # noqa: E402
from edgedec.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from edgedec.errors import ConfigError, EdgedecError  # noqa: E402
from edgedec.passes.base import create_pass  # noqa: E402
from edgedec.passes.ffn_skip import FfnSkipPass, find_ffn_blocks  # noqa: E402
from edgedec.runtime import Engine  # noqa: E402

LAYERS = 6
PROMPT = [5, 17, 42, 99, 7, 130, 64, 12, 200, 33]


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    base = tmp_path_factory.mktemp("ffn6")
    hf = _tiny.maker().make_tiny_model(base / "hf", seed=3, max_positions=256, num_layers=LAYERS)
    plain = base / "plain"
    compile_model(str(hf), plain, CompileOptions())
    return hf, plain, base


@pytest.fixture(scope="module")
def stats_path(tiny6):
    _, plain, base = tiny6
    stats = calibrate_ffn(plain, samples=2, length=64)
    path = base / "stats.json"
    stats.save(path)
    return path


def _skip_bundle(tiny6, stats_path, name, **opts):
    hf, _, base = tiny6
    out = base / name
    if not out.exists():
        options = {"stats": str(stats_path), "ratio": 0.34, "never_skip_first": 1, "never_skip_last": 1,
                   "candidates": 2.0, "warmup": 2, "refresh": 4, **opts}
        compile_model(str(hf), out, CompileOptions(passes=(("ffn-skip", options),)))
    return out


@pytest.fixture(scope="module")
def fast_bundle(tiny6, stats_path):
    return _skip_bundle(tiny6, stats_path, "fast")


@pytest.fixture(scope="module")
def draft_bundle(tiny6, stats_path):
    return _skip_bundle(tiny6, stats_path, "draft", use="draft")


def _section(bundle):
    m = json.loads((Path(bundle) / "manifest.json").read_text())
    return next(p for p in m["passes"] if p["pass"] == "ffn-skip")["report"]["ffn_skip"]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _prefill(sess, ids, skip=()):
    n = len(ids)
    feed = {"input_ids": np.asarray([ids], np.int64), "seqlens_k": np.array([n - 1], np.int32),
            "total_sequence_length": np.array(n, np.int32), "logits_index": np.arange(n, dtype=np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            feed[i.name] = np.zeros((1, i.shape[1], n, i.shape[3]), np.float32)
        elif i.name.startswith("ffn_skip."):
            feed[i.name] = np.array([int(i.name.split(".")[1]) in skip])
    return sess.run(["logits"], feed)[0][0]


# -- calibration ---------------------------------------------------------------------------------
def test_calibrate_stats(stats_path):
    s = FfnStats.load(stats_path)
    assert len(s.mean_cos) == len(s.p10_cos) == LAYERS
    assert all(-1.0 <= v <= 1.0 for v in s.mean_cos)
    assert all(p <= m + 1e-6 for p, m in zip(s.p10_cos, s.mean_cos))
    assert s.tokens == 128 and s.sequences == 2
    assert s.never_skip_first >= 1 and s.never_skip_last >= 1
    plan = plan_skipping(s.to_dict(), 0.34, 1, 1)
    assert plan["eligible"] == [1, 2, 3, 4] and plan["skip_per_token"] == 2


def test_calibrate_matches_numpy_cos(tiny6):
    """The calibration's per-layer cos equals cos computed in numpy from the plain graph's residual states."""
    from tokenizers import Tokenizer

    from edgedec.calibrate import _feeds, calibrate_ffn_graph, read_calibration_text

    _, plain, _ = tiny6
    model = onnx.load(str(plain / "decoder.onnx"))
    ids = Tokenizer.from_file(str(plain / "tokenizer.json")).encode(read_calibration_text(None)[0]).ids[:64]
    stats = calibrate_ffn_graph(model, ids, samples=1, length=64)
    blocks = find_ffn_blocks(model)
    assert len(blocks) == LAYERS
    names = [t for b in blocks for t in (b.x, b.out)]
    model.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(names, sess.run(names, _feeds(model, ids))))
    for b in blocks:
        x, h = got[b.x][0].astype(np.float64), got[b.out][0].astype(np.float64)
        cos = (x * h).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(h, axis=-1)
        assert stats.mean_cos[b.layer] == pytest.approx(cos.mean(), abs=1e-5)


def test_stats_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(ConfigError, match="not FFN calibration stats"):
        FfnStats.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read FFN calibration stats"):
        FfnStats.load(bad)


def test_calibrate_cli(cli, one_line_error, tiny6, tmp_path):
    _, plain, _ = tiny6
    out = tmp_path / "s.json"
    r = cli("calibrate", "ffn", str(plain), "-o", str(out), "--samples", "1", "--length", "32")
    assert r.exit_code == 0, r.stderr
    assert "never skip" in r.stdout and len(FfnStats.load(out).mean_cos) == LAYERS
    one_line_error(cli("calibrate", "ffn", str(tmp_path / "nope"), "-o", str(out)), "not a bundle")
    one_line_error(cli("calibrate", "ffn", str(plain), "-o", str(out), "--samples", "0"), "samples must be")


# -- the pass --------------------------------------------------------------------------------------
def test_structure(fast_bundle):
    sec = _section(fast_bundle)
    assert sec["eligible"] == [1, 2, 3, 4] and sec["skip_per_token"] == 2
    assert len(sec["skippable"]) == 4  # candidates 2.0 x 2 blocks, all eligible layers
    model = onnx.load(str(fast_bundle / "decoder.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert sorted(n.name for n in ifs) == sorted(f"ffn_skip/{l}/if" for l in sec["skippable"])
    inputs = {i.name: i for i in model.graph.input}
    for l in sec["skippable"]:
        assert inputs[f"ffn_skip.{l}"].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert "ffn_cos" in {o.name for o in model.graph.output}
    for n in ifs:  # the block (with its weight matmuls) lives only in the else branch
        branches = {a.name: a.g for a in n.attribute}
        # skipped: the stream unchanged, and (fuse-norms form) the next layer's norm of it
        assert [x.op_type for x in branches["then_branch"].node] == ["SimplifiedLayerNormalization", "Identity"]
        assert any(x.op_type == "MatMul" for x in branches["else_branch"].node)


def test_no_skip_equals_unskipped(tiny6, fast_bundle):
    _, plain, _ = tiny6
    a = _prefill(_session(plain / "decoder.onnx"), PROMPT)
    b = _prefill(_session(fast_bundle / "decoder.onnx"), PROMPT)
    np.testing.assert_array_equal(a, b)
    ref = Engine.load(plain, threads=1)
    eng = Engine.load(fast_bundle, threads=1)
    eng.decoder.ffn_skip.enabled = False
    want = list(ref.generate(PROMPT, max_new_tokens=16, ignore_eos=True))
    got = list(eng.generate(PROMPT, max_new_tokens=16, ignore_eos=True))
    assert [t.id for t in got] == [t.id for t in want]


def _cut_ffn(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    """The plain (fuse-norms) graph with layer ``layer``'s FFN block removed, built without the pass: the
    second SkipSimplifiedLayerNormalization after the layer's attention (stream + FFN output, normalized
    for the next layer) becomes SimplifiedLayerNormalization of the stream alone, and its sum output is
    replaced by the stream. The dead FFN nodes are left to ONNX Runtime to drop."""
    from onnx import helper

    g = model.graph
    nodes = list(g.node)
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"][layer]
    skips = [n for n in nodes[nodes.index(gqa):] if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(skips) >= 2, "expected the fuse-norms form (SkipSimplifiedLayerNormalization after each block)"
    post = skips[1]
    stream, gamma = post.input[0], post.input[2]
    eps = [a.f for a in post.attribute if a.name == "epsilon"]
    norm = helper.make_node("SimplifiedLayerNormalization", [stream, gamma], [post.output[0]], axis=-1,
                            **({"epsilon": eps[0]} if eps else {}))
    summed = post.output[3] if len(post.output) > 3 else ""
    for n in nodes:
        for k, i in enumerate(n.input):
            if summed and i == summed:
                n.input[k] = stream
    for o in g.output:
        assert o.name != summed
    nodes[nodes.index(post)] = norm
    g.ClearField("node")
    g.node.extend(nodes)
    return model


@pytest.mark.parametrize("layer", [2, 3])
def test_skipped_block_is_not_run(tiny6, fast_bundle, layer):
    _, plain, _ = tiny6
    cut = _cut_ffn(onnx.load(str(plain / "decoder.onnx")), layer)
    sess = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    want = _prefill(sess, PROMPT)
    got = _prefill(_session(fast_bundle / "decoder.onnx"), PROMPT, skip={layer})
    full = _prefill(_session(plain / "decoder.onnx"), PROMPT)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - full).max() > 1e-3  # and skipping the block changes the output


@pytest.mark.parametrize("opts, msg", [
    ({"ratio": 0.0}, "ratio must be in"),
    ({"ratio": 1.5}, "ratio must be in"),
    ({"use": "turbo"}, "use must be one of"),
    ({"mechanism": "loop"}, "mechanism must be one of"),
    ({"refresh": 1}, "refresh must be"),
    ({"candidates": 0.5}, "candidates must be"),
    ({"stats": "/no/such/stats.json"}, "no such file"),
    ({"never_skip_first": -2}, "never_skip_first"),
])
def test_config_errors(opts, msg):
    with pytest.raises(ConfigError, match=msg):
        create_pass("ffn-skip", opts)


def test_ratio_too_large_for_eligible(tiny6, stats_path):
    _, plain, _ = tiny6
    model = onnx.load(str(plain / "decoder.onnx"))
    p = create_pass("ffn-skip", {"stats": str(stats_path), "ratio": 0.9, "never_skip_first": 1,
                                 "never_skip_last": 1})
    with pytest.raises(ConfigError, match="only 4 layers are eligible"):
        p(model)


def test_pass_needs_decoder_structure():
    from onnx import helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(EdgedecError, match="no GroupQueryAttention"):
        FfnSkipPass(create_pass("ffn-skip", {}).config)(helper.make_model(g))


def test_pass_refuses_second_run(fast_bundle):
    model = onnx.load(str(fast_bundle / "decoder.onnx"))
    with pytest.raises(EdgedecError, match="ran already"):
        create_pass("ffn-skip", {})(model)


# -- runtime ---------------------------------------------------------------------------------------
def test_controller_skips_after_warmup(fast_bundle):
    eng = Engine.load(fast_bundle, threads=1)
    ctl = eng.decoder.ffn_skip
    masks = []
    orig = ctl.before_decode

    def spy():
        orig()
        masks.append(ctl.mask.copy())

    ctl.before_decode = spy
    list(eng.generate(PROMPT, max_new_tokens=12, ignore_eos=True))
    assert len(masks) == 11
    counts = [int(m.sum()) for m in masks]
    assert counts[:2] == [0, 0]  # warm-up 2
    assert counts[3] == 0 and counts[7] == 0  # refresh every 4th step
    assert max(counts) <= 2 and sum(counts) > 0
    assert 0 < ctl.skip_ratio <= 2 / LAYERS


def test_eval_honours_skipping(tiny6, fast_bundle):
    from edgedec.evaluate import EvalOptions, evaluate

    _, plain, _ = tiny6
    text = [("t", _tiny.sample_text())]
    opts = EvalOptions(window=64, stride=32, max_tokens=160, threads=1)
    eng_full = evaluate(plain, text, opts)
    lossy = evaluate(fast_bundle, text, opts, reference=plain)
    assert lossy.perplexity != pytest.approx(eng_full.perplexity, rel=1e-6)
    assert lossy.greedy_agreement < 1.0
    # the step-by-step path itself is exact: with 0 blocks per token it reproduces the plain bundle
    from edgedec import evaluate as ev

    eng = Engine.load(fast_bundle, threads=1, context_length=64)
    eng.decoder.ffn_skip.set_skip(0)
    ref = Engine.load(plain, threads=1, context_length=64)
    ids = eng.codec.encode(_tiny.sample_text())[:64]
    for first in (1, 20):
        a = ev._window_logits(eng, ids, first)
        b = ev._window_logits(ref, ids, first)
        assert a.shape == b.shape == (64 - first, ref.bundle.arch["vocab_size"])
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("which", ["draft", "fast"])
def test_drafter_is_lossless(tiny6, fast_bundle, draft_bundle, which):
    _, plain, _ = tiny6
    bundle = draft_bundle if which == "draft" else fast_bundle
    ref = Engine.load(plain, threads=1)
    eng = Engine.load(bundle, threads=1)
    prompts = [PROMPT, PROMPT[::-1] * 2]
    for p in prompts:
        want = [t.id for t in ref.generate(p, max_new_tokens=24, ignore_eos=True)]
        got = [t.id for t in eng.generate(p, max_new_tokens=24, ignore_eos=True, drafter="ffn-skip",
                                          draft_len=3, adaptive_draft=False)]
        assert got == want
        assert eng.last_stats.drafted_tokens > 0 and eng.last_stats.verify_steps > 0


def test_ffn_drafter_needs_skip_bundle(tiny6):
    _, plain, _ = tiny6
    eng = Engine.load(plain, threads=1)
    with pytest.raises(EdgedecError, match="ffn-skip pass"):
        list(eng.generate(PROMPT, max_new_tokens=4, drafter="ffn-skip"))
