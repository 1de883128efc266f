"""``edgedec compile`` with no --target and no -q: the source's precision, exactly, on the fastest target this
host runs; one line on stderr and the manifest's ``defaults`` say what was chosen and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgedec.compiler.pipeline import CompileOptions
from edgedec.passes import int4
from edgedec.targets import auto


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_weights_follow_the_source_and_the_target():
    q41 = auto.SourceWeights("gguf", {"Q4_1": 210, "Q8_0": 1}, {"F32": 61})
    passes, why = auto.default_weight_passes(q41, "cpu-tvm")
    assert passes == (("int4", ()),) and "exactly" in why
    passes, why = auto.default_weight_passes(q41, "cpu")  # MatMulNBits rounds activations to int8
    assert passes == () and "int8" in why and "exactly on cpu" in why
    kq = auto.SourceWeights("gguf", {"Q4_K": 169, "Q6_K": 29, "ZZZ": 1}, {"F32": 141})
    passes, why = auto.default_weight_passes(kq, "cpu-tvm")
    assert passes == () and "ZZZ" in why  # a type int4 does not re-express exactly stays float32
    assert auto.default_weight_passes(auto.SourceWeights("hf"), "cpu-tvm")[0] == ()
    assert {"Q4_0", "Q4_1", "Q8_0"} <= int4.EXACT_SOURCE_TYPES and "cpu" not in int4.LOSSLESS_TARGETS


def test_explicit_flags_are_kept(tiny_llama_dir):
    d = auto.resolve(str(tiny_llama_dir), CompileOptions(target="cpu"))
    assert d.target == "cpu" and d.passes == () and not d.target_reason and not d.weights_reason
    assert not d.manifest_entry()
    d = auto.resolve(str(tiny_llama_dir), CompileOptions(target="auto", passes=(("int8", ()),), auto_weights=True))
    assert d.target == "cpu" and d.passes == () and d.weights_reason is None  # -q int8 given: no weight default


def test_auto_falls_back_with_the_reason(tiny_llama_dir):
    """A sliding window is an ONNX Runtime feature: auto passes over cpu-tvm and says why."""
    d = auto.resolve(str(tiny_llama_dir), CompileOptions(target="auto", passes=(("int4", ()),), kv_window=64,
                                                         max_context=128))
    assert d.target == "cpu"
    if auto.host_cannot_run("cpu-tvm") is None:
        assert "not cpu-tvm" in d.target_reason and "--kv-window" in d.target_reason


def test_float_source_default_is_float32_on_cpu(tiny_llama_dir, tmp_path, cli):
    out = tmp_path / "b"
    r = cli("compile", tiny_llama_dir, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "defaults: target cpu" in " ".join(r.stderr.split()) and "float source" in r.stderr
    assert "speed check: decode" in " ".join(r.stdout.split())
    m = _manifest(out)
    assert m["target"]["name"] == "cpu" and m["target"]["auto_reason"]
    assert m["defaults"]["weights"] == {"passes": [], "reason": "float source: float32 weights keep it exactly"}
    assert [p["pass"] for p in m["passes"]] == ["fuse-projections", "fuse-norms"]  # today's float32 bundle


def test_explicit_target_cpu_and_q_none(tiny_llama_dir, tmp_path, cli):
    r = cli("compile", tiny_llama_dir, "-o", tmp_path / "b", "--target", "cpu", "-q", "none", "--no-speed-check")
    assert r.exit_code == 0, r.stderr
    assert "defaults:" not in r.stderr and "speed check" not in r.stdout
    m = _manifest(tmp_path / "b")
    assert "defaults" not in m and "auto_reason" not in m["target"]


# ------------------------------------------------------------------------------------------------
def _quantized_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny Llama as a GGUF with Q4_1 projections and a Q8_0 embedding (SmolLM2's mix), written by
    the test suite's F32 writer with every matrix quantized by gguf's own quantizers on the way."""
    import gguf
    import importlib.util

    # tests/conftest.py's GGUF writer (by path: under tests/targets another conftest module is `conftest`)
    spec = importlib.util.spec_from_file_location("_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("_tests_conftest", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    _write_gguf = module._write_gguf

    original = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, *args, **kwargs):
        if tensor.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0 if name == "token_embd.weight" else gguf.GGMLQuantizationType.Q4_1
            return original(self, name, gguf.quants.quantize(tensor, kind), raw_dtype=kind)
        return original(self, name, tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
        return _write_gguf(model_dir, out)


@pytest.fixture(scope="module")
def q41_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    return _quantized_gguf(tiny_llama_dir, tmp_path_factory.mktemp("q41") / "tiny-llama.Q4_1.gguf")


def test_gguf_q4_1_default_is_lossless_int4(q41_gguf, tmp_path, cli):
    """The default compile of a Q4_1/Q8_0 GGUF: on cpu-tvm, the exact int4 re-expression (every weight's
    error 0, checked after the build), decoding the same tokens as transformers on the dequantized GGUF;
    without TVM on this host, float32 on cpu (also exact)."""
    sw = auto.source_weights(str(q41_gguf))
    assert sw.matrices == {"Q4_1": 14, "Q8_0": 1}
    out = tmp_path / "b"
    r = cli("compile", q41_gguf, "-o", out, "--no-speed-check")
    assert r.exit_code == 0, r.stderr
    m = _manifest(out)
    tvm_here = auto.host_cannot_run("cpu-tvm") is None
    assert m["target"]["name"] == ("cpu-tvm" if tvm_here else "cpu")
    if tvm_here:
        assert m["defaults"]["weights"]["passes"] == ["int4"]
        assert m["defaults"]["weights"]["check"] == {"exact": True}
        kinds = m["graphs"]["decoder"]["quantization"]["kinds"]
        assert set(kinds) == {"Q4_1 4-bit", "Q8_0 8-bit"} and all(k["max_abs_error"] == 0 for k in kinds.values())
    import torch
    from transformers import AutoModelForCausalLM

    from edgedec.runtime import Engine

    model = AutoModelForCausalLM.from_pretrained(q41_gguf.parent, gguf_file=q41_gguf.name, dtype=torch.float32)
    engine = Engine.load(out, threads=1)
    for prompt in ([1, 17, 42, 99], [1, 200, 5, 7, 300, 12]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        got = [t.id for t in engine.generate(prompt, max_new_tokens=16, ignore_eos=True)]
        assert got == ref
