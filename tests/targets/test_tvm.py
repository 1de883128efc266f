"""Targets cpu-tvm and arm64 (Apache TVM): greedy parity with the cpu bundle on tiny Llama and Qwen2,
logits against ONNX Runtime, the cross-compiled artifact's architecture, refused passes, torch-free loading,
and the targets' own int4 (block-quantized weights: exact on GGUF grids, logits against transformers
carrying the same dequantized weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="the cpu-tvm/arm64 targets need apache-tvm (pip install 'edgedec[tvm]')")

from edgedec.compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from edgedec.errors import BundleError, GenerationError, UnsupportedError  # noqa: E402
from edgedec.runtime import Engine  # noqa: E402

PROMPTS = ["def fibonacci(n):", "The for statement is used to", "class A:\n    pass", "Hello, world",
           "import os\nimport sys", "x = [i for i in range(10)]"]
EM_AARCH64 = 183
EM_X86_64 = 62


def _tvm_bundle(model_dir: Path, out: Path, target: str = "cpu-tvm", passes: tuple = (), kv: str = "fp32") -> Path:
    compile_model(str(model_dir), out, CompileOptions(target=target, max_context=128, passes=passes, kv=kv))
    return out


@pytest.fixture(scope="session")
def tvm_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_llama_dir, tmp_path_factory.mktemp("tvm") / "tiny-llama-tvm")


@pytest.fixture(scope="session")
def tvm_qwen2(tiny_qwen2_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_qwen2_dir, tmp_path_factory.mktemp("tvm") / "tiny-qwen2-tvm")


@pytest.fixture(scope="session")
def tvm_fp16_kv_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_llama_dir, tmp_path_factory.mktemp("tvm") / "tiny-llama-tvm-kv16", kv="fp16")


@pytest.fixture(scope="session")
def arm64_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_llama_dir, tmp_path_factory.mktemp("tvm") / "tiny-llama-arm64", target="arm64")


@pytest.fixture(params=["llama", "qwen2"])
def pair(request, tvm_llama, tvm_qwen2, tiny_llama_bundle, tiny_qwen2_bundle):
    """(tvm bundle, cpu bundle) compiled from the same tiny model."""
    return (tvm_llama, tiny_llama_bundle) if request.param == "llama" else (tvm_qwen2, tiny_qwen2_bundle)


def _plain_and_spec(engine, prompt, max_new_tokens: int) -> tuple[list[int], list[int], int]:
    """Greedy token ids for ``prompt`` without speculation, then with ngram+recycling at a fixed draft
    length, and how many drafts were accepted. The adaptive length would mostly stop drafting on the tiny
    models (a draft token costs more than it yields there: 0-1 accepted in 40 tokens), and a run that never
    drafts compares plain decoding with itself; so it is off, and the speculative run must have drafted and
    verified. Callers sum the accepted drafts over their prompts and assert the sum is positive."""
    def run(drafter):
        return [t.id for t in engine.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, drafter=drafter,
                                              adaptive_draft=False)]

    plain, spec = run(None), run("ngram+recycling")
    s = engine.last_stats
    assert s.drafter == "ngram+recycling" and s.verify_steps > 0 and s.drafted_tokens > 0, s
    assert s.accepted_tokens <= s.drafted_tokens
    return plain, spec, s.accepted_tokens


def e_machine(header: bytes) -> int:
    """ELF e_machine (little-endian, offset 18), after checking the magic and the 64-bit class."""
    assert header[:4] == b"\x7fELF", header[:4]
    assert header[4] == 2, "not a 64-bit ELF"
    assert header[5] == 1, "not little-endian"
    return int.from_bytes(header[18:20], "little")


def test_greedy_identical_to_cpu_bundle(pair):
    tvm_dir, cpu_dir = pair
    tvm_engine = Engine.load(tvm_dir, threads=2, trust=True)
    cpu_engine = Engine.load(cpu_dir, threads=2, context_length=128)
    for prompt in PROMPTS:
        want = [t.id for t in cpu_engine.generate(prompt, max_new_tokens=40, ignore_eos=True)]
        got = [t.id for t in tvm_engine.generate(prompt, max_new_tokens=40, ignore_eos=True)]
        assert got == want, prompt
        assert len(set(want)) > 3  # the tiny models produce varied tokens, so the comparison means something


def test_speculation_rolls_back_the_tvm_cache(pair):
    """Chain verification writes drafts into the cache and rolls rejected ones back by length."""
    tvm_dir, _ = pair
    engine = Engine.load(tvm_dir, threads=2, trust=True)
    accepted = 0
    for prompt in PROMPTS[:3]:
        plain, spec, n = _plain_and_spec(engine, prompt, 40)
        assert spec == plain
        accepted += n
    assert accepted > 0


def test_logits_match_onnxruntime(pair):
    """Prefill with several logit rows, one decode step, a multi-token step: TVM vs the cpu bundle's graph."""
    tvm_dir, cpu_dir = pair
    a = Engine.load(tvm_dir, threads=2, trust=True).decoder
    b = Engine.load(cpu_dir, threads=2, context_length=128).decoder
    ids = np.random.default_rng(0).integers(0, 300, size=16).tolist()
    steps = [(ids[:9], [0, 4, 8]), (ids[9:10], None), (ids[10:14], [0, 1, 2, 3])]
    for chunk, rows in steps:
        la, lb = a.forward(chunk, rows), b.forward(chunk, rows)
        assert la.shape == lb.shape
        np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)
    a.kv.length = b.kv.length = 10  # roll back four tokens, then write other ones over them
    np.testing.assert_allclose(a.forward(ids[12:16], [3]), b.forward(ids[12:16], [3]), atol=1e-4, rtol=0)


def test_manifest_describes_library_and_params(tvm_llama):
    m = json.loads((tvm_llama / "manifest.json").read_text())
    g = m["graphs"]["decoder"]
    assert m["target"]["backend"] == "tvm" and g["format"] == "tvm-relax-vm"
    assert g["file"] == "decoder.so" and "params.bin" in g["data"]
    assert set(g["data"]) | {g["file"]} <= set(m["files"])
    assert all(p["offset"] % 64 == 0 and p["dtype"] == "float32" for p in g["params"])
    assert g["verification"]["max_abs_logit_diff"] < 1e-3
    assert m["passes"] == []
    with open(tvm_llama / "decoder.so", "rb") as f:
        assert e_machine(f.read(20)) == EM_X86_64
    # the params file is what the manifest says: the embedding table is the HF model's
    p = next(p for p in g["params"] if p["name"] == "embed_tokens.weight")
    raw = np.fromfile(tvm_llama / "params.bin", dtype="<f4", count=int(np.prod(p["shape"])), offset=p["offset"])
    assert np.isfinite(raw).all() and raw.std() > 0


def test_context_full_and_bad_ids(tvm_llama):
    engine = Engine.load(tvm_llama, threads=1, context_length=16, trust=True)
    dec = engine.decoder
    with pytest.raises(GenerationError, match="do not fit the context of 16"):
        dec.forward(list(range(17)))
    with pytest.raises(GenerationError, match="token ids must be in"):
        dec.forward([1, 10_000])
    tokens = [t.id for t in engine.generate("def f(x):", max_new_tokens=64, ignore_eos=True)]
    assert engine.last_stats.stop_reason == "context_full" and dec.kv.length == 16 and tokens


def test_arm64_artifact_is_aarch64(arm64_bundle, tmp_path):
    m = json.loads((arm64_bundle / "manifest.json").read_text())
    g = m["graphs"]["decoder"]
    assert g["llvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert "decoder.tar" in g["libraries"]
    assert "skipped" in g["verification"]  # cannot run here: recorded, not silent
    with tarfile.open(arm64_bundle / "decoder.tar") as tar:
        objects = [mem for mem in tar.getmembers() if mem.name.endswith(".o")]
        assert objects
        for mem in objects:
            assert e_machine(tar.extractfile(mem).read(20)) == EM_AARCH64, mem.name
    if shutil.which("aarch64-linux-gnu-gcc"):
        assert g["file"] == "decoder.so"
        with open(arm64_bundle / "decoder.so", "rb") as f:
            assert e_machine(f.read(20)) == EM_AARCH64


def test_arm64_shared_library_needs_cross_linker(arm64_bundle):
    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu): "
                    "the bundle has decoder.tar only")
    assert (arm64_bundle / "decoder.so").is_file()


def test_arm64_bundle_refused_on_this_machine(arm64_bundle, cli, one_line_error):
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is aarch64: the bundle runs here")
    with pytest.raises(BundleError, match="built for aarch64-linux-gnu and cannot run on this"):
        Engine.load(arm64_bundle, trust=True)
    one_line_error(cli("run", arm64_bundle, "--prompt", "hi", "--trust"), "built for aarch64-linux-gnu")


@pytest.mark.parametrize("target", ["cpu-tvm", "arm64"])
@pytest.mark.parametrize("args, pass_name", [(["-q", "int8"], "int8"),
                                             (["--pass", "fuse-projections"], "fuse-projections")])
def test_ort_passes_refused_before_any_work(target, args, pass_name, tiny_llama_dir, tmp_path, cli, one_line_error):
    out = tmp_path / "b"
    result = cli("compile", tiny_llama_dir, "-o", out, "--target", target, *args)
    one_line_error(result, f"target {target} cannot take pass {pass_name}: .+")
    assert not out.exists()
    with pytest.raises(UnsupportedError, match=f"target {target} cannot take pass {pass_name}"):
        compile_model(str(tiny_llama_dir), out, CompileOptions(target=target, passes=((pass_name, ()),)))


def test_targets_list_shows_tvm_targets(cli):
    r = cli("targets", "list")
    assert r.exit_code == 0
    for name in ("cpu-tvm", "arm64", "cpu"):
        assert name in r.stdout


@pytest.mark.parametrize("which", ["tvm_llama", "tvm_int4_llama"])
def test_tvm_runtime_stays_torch_free(which, request):
    bundle = request.getfixturevalue(which)
    code = ("import sys; from edgedec.runtime import Engine; e = Engine.load(sys.argv[1], threads=1, trust=True); "
            "e.generate_text('def f(x):', max_new_tokens=4); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_inspect_shows_tvm_bundle(tvm_llama, tvm_int4_llama, cli):
    """inspect shows the library's own verification (not only the exported graph's) and, for int4, what
    the weights and activations are."""
    r = cli("inspect", tvm_llama)
    assert r.exit_code == 0, r.stderr
    assert "cpu-tvm" in r.stdout and "params.bin" in r.stdout and "bundle valid" in r.stdout
    g = json.loads((tvm_llama / "manifest.json").read_text())["graphs"]["decoder"]
    assert f"decoder library: max |logit diff| {g['verification']['max_abs_logit_diff']:.2e}" in r.stdout
    assert "decoder weights" not in r.stdout
    r = cli("inspect", tvm_int4_llama)
    assert r.exit_code == 0, r.stderr
    assert "decoder weights: int4 (" in r.stdout and "activations: float32" in r.stdout


def test_library_for_a_cpu_with_other_extensions_is_refused(tvm_llama, tmp_path):
    """A cpu-tvm library is built for this CPU (-mcpu); a CPU that lacks its extensions gets one line, not SIGILL."""
    from _tiny import copy_bundle, edit_manifest

    bundle = copy_bundle(tvm_llama, tmp_path / "b")
    assert json.loads((bundle / "manifest.json").read_text())["graphs"]["decoder"]["cpu_flags"] is not None
    edit_manifest(bundle, lambda m: m["graphs"]["decoder"].update(cpu_flags=["avx2", "no_such_extension"]))
    with pytest.raises(BundleError, match="uses no_such_extension, which this CPU lacks"):
        Engine.load(bundle, trust=True)


def _as_library_before_check_params_and_verify(monkeypatch) -> None:
    """Make the TVM sessions loaded from now on see their library as one built before ``check_params`` and
    ``verify{k}`` existed (the module does not list them, and the VM does not give them)."""
    from edgedec.runtime.tvm_session import import_tvm

    vm_module = import_tvm().runtime.vm
    real = vm_module.VirtualMachine
    newer = lambda name: name == "check_params" or name.startswith("verify")  # noqa: E731

    class OldModule:
        def __init__(self, module):
            self.module = module

        def implements_function(self, name: str) -> bool:
            return not newer(name) and self.module.implements_function(name)

    class OldVM(real):
        def __init__(self, *args):
            super().__init__(*args)
            self.module = OldModule(self.module)  # after __init__, which looks its functions up in it

        def __getitem__(self, name: str):
            if newer(name):
                raise AttributeError(f"no function {name}")
            return self.module.module[name]

    monkeypatch.setattr(vm_module, "VirtualMachine", OldVM)


@pytest.mark.parametrize("old_library", [False, True])
def test_params_that_do_not_fit_the_library_are_refused_at_load(old_library, tvm_llama, tmp_path, monkeypatch):
    """prefill and decode do not check the weights' shapes on each call; loading does, once, through
    check_params (or, in a library built before it, a one-token prefill). A manifest whose params entry has
    the right byte count but another shape is refused in one line."""
    from _tiny import copy_bundle, edit_manifest

    if old_library:
        _as_library_before_check_params_and_verify(monkeypatch)
    bundle = copy_bundle(tvm_llama, tmp_path / "b")

    def transpose_one(m):
        p = next(p for p in m["graphs"]["decoder"]["params"] if p["name"].endswith("mlp.gate_proj.weight"))
        assert p["shape"][0] != p["shape"][1]
        p["shape"] = p["shape"][::-1]

    edit_manifest(bundle, transpose_one)
    with pytest.raises(BundleError, match="do not fit the library") as err:
        Engine.load(bundle, trust=True)
    assert "\n" not in str(err.value)


def test_a_library_without_verify_functions_speculates_through_prefill(tvm_llama, monkeypatch):
    """A library built before verify{k}: verifications run prefill (every row asked for), with the same
    output as the library that has them, with speculation and without."""
    new = Engine.load(tvm_llama, threads=2, trust=True)
    _as_library_before_check_params_and_verify(monkeypatch)
    old = Engine.load(tvm_llama, threads=2, trust=True)
    assert old.decoder._verify == {} and sorted(new.decoder._verify) == list(range(2, 9))
    accepted = {"old": 0, "new": 0}
    for prompt in PROMPTS[:3]:
        want = [t.id for t in new.generate(prompt, max_new_tokens=32, ignore_eos=True, drafter=None)]
        for name, engine in (("old", old), ("new", new)):
            spec = [t.id for t in engine.generate(prompt, max_new_tokens=32, ignore_eos=True,
                                                  drafter="ngram+recycling", adaptive_draft=False)]
            assert spec == want, prompt
            s = engine.last_stats
            assert s.verify_steps > 0 and s.drafted_tokens > 0 and s.accepted_tokens <= s.drafted_tokens
            accepted[name] += s.accepted_tokens
    assert all(accepted.values()), accepted


@pytest.mark.parametrize("fixture", ["tvm_llama", "tvm_int4_llama", "tvm_fp16_kv_llama"])
def test_verify_functions_give_each_row_the_decode_steps_bits(fixture, request):
    """verify{k} (every row's logits at a static k: what a speculative verification calls) gives row i the
    bits that i + 1 decode steps give, which is what keeps speculation lossless; prefill (rows out of
    order, so not verify) agrees; the manifest lists them with check_params."""
    bundle = request.getfixturevalue(fixture)
    functions = json.loads((bundle / "manifest.json").read_text())["graphs"]["decoder"]["functions"]
    assert {"prefill", "decode", "check_params", *(f"verify{k}" for k in range(2, 9))} <= set(functions)
    dec = Engine.load(bundle, threads=2, trust=True).decoder
    assert sorted(dec._verify) == list(range(2, 9))
    ids = np.random.default_rng(3).integers(0, 300, size=16).tolist()
    dec.forward(ids[:5])
    base = dec.kv.length
    for k in (2, 5, 8):
        new = ids[5:5 + k]
        got = dec.forward(new, list(range(k))).copy()
        dec.kv.length = base
        steps = []
        for t in new:
            steps.append(dec.decode_one(t).copy())
        dec.kv.length = base
        np.testing.assert_array_equal(got, np.stack(steps))
        other = dec.forward(new, list(range(k))[::-1])[::-1]
        dec.kv.length = base
        np.testing.assert_allclose(other, got, rtol=1e-5, atol=1e-5)


def test_fp16_cache_holds_the_float32_bundles_keys_rounded(tvm_fp16_kv_llama, tvm_llama):
    """--kv fp16: the manifest and the runtime's cache are float16 at half the bytes per token; layer 0's keys
    and values are the float32 bundle's rounded to float16 (nothing before them differs), the logits stay
    close to the float32 cache's, and speculation is lossless."""
    m16, m32 = (json.loads((b / "manifest.json").read_text()) for b in (tvm_fp16_kv_llama, tvm_llama))
    kv16, kv32 = m16["kv_cache"], m32["kv_cache"]
    assert (kv16["dtype"], kv16["kv_dtype"], kv32["dtype"], kv32["kv_dtype"]) == ("float16", "fp16", "float32", "fp32")
    assert kv16["bytes_per_token"] * 2 == kv32["bytes_per_token"]
    caches = next(i for i in m16["graphs"]["decoder"]["inputs"] if i["name"] == "caches")
    assert caches["dtype"] == "float16" and "float16" in m16["graphs"]["decoder"]["caches"]
    assert m16["graphs"]["decoder"]["verification"]["max_abs_logit_diff"] < 1e-2
    a, b = Engine.load(tvm_fp16_kv_llama, threads=2, trust=True), Engine.load(tvm_llama, threads=2, trust=True)
    ids = np.random.default_rng(5).integers(0, 300, size=24).tolist()
    got, want = a.decoder.forward(ids, list(range(24))), b.decoder.forward(ids, list(range(24)))
    assert a.decoder.kv.views[0][0].dtype == np.float16 and a.decoder.kv.nbytes * 2 == b.decoder.kv.nbytes
    for j in (0, 1):
        np.testing.assert_array_equal(a.decoder.kv.views[0][j][:, :, :24],
                                      b.decoder.kv.views[0][j][:, :, :24].astype(np.float16))
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert 0 < err < 1e-2 * scale, (err, scale)  # rounded (not the float32 cache's bits), but close
    accepted = 0
    for prompt in PROMPTS[:3]:
        plain, spec, n = _plain_and_spec(a, prompt, 32)
        assert spec == plain, prompt
        accepted += n
    assert accepted > 0


@pytest.mark.parametrize("args, shown", [(["--kv", "int8"], "dtype=int8"), (["--kv", "int4"], "dtype=int4"),
                                         (["--pass", "kv-cache:dtype=fp16,k_scale=per_tensor"], "k_scale=per_tensor")])
def test_quantized_cache_layouts_refused_by_tvm(args, shown, tiny_llama_dir, tmp_path, cli, one_line_error):
    out = tmp_path / "b"
    r = cli("compile", tiny_llama_dir, "-o", out, "--target", "cpu-tvm", *args)
    one_line_error(r, f"target cpu-tvm cannot take kv-cache \\(.*{shown}.*\\): .*float32 or float16 cache")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# -q int4 on the TVM targets
# ---------------------------------------------------------------------------------------------------
INT4 = (("int4", ()),)


@pytest.fixture(scope="session")
def tvm_int4_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_llama_dir, tmp_path_factory.mktemp("tvm") / "tiny-llama-tvm-int4", passes=INT4)


@pytest.fixture(scope="session")
def tvm_int4_qwen2(tiny_qwen2_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_qwen2_dir, tmp_path_factory.mktemp("tvm") / "tiny-qwen2-tvm-int4", passes=INT4)


@pytest.fixture(params=["llama", "qwen2"])
def int4_pair(request, tvm_int4_llama, tvm_int4_qwen2, tiny_llama_dir, tiny_qwen2_dir):
    """(int4 tvm bundle, the model directory it was compiled from)."""
    return (tvm_int4_llama, tiny_llama_dir) if request.param == "llama" else (tvm_int4_qwen2, tiny_qwen2_dir)


def _dequantized_hf(load_hf, model_dir: Path):
    """The transformers model with every weight the int4 target quantizes replaced by its dequantization."""
    import copy

    import torch

    from edgedec.targets import tvm_quant

    model, _ = load_hf(model_dir)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("_proj." in name or "embed_tokens" in name or name == "lm_head.weight"):
                bits = 4 if "_proj." in name else 8
                p.copy_(torch.from_numpy(tvm_quant.quantize(p.numpy(), bits).dequantize()))
    return model


def test_int4_logits_match_transformers_with_the_same_weights(int4_pair, load_hf):
    """Prefill rows, one decode step, a multi-row step and a rollback: the library against transformers
    running the dequantized weights (what the kernels compute with), and far from the float weights."""
    import torch

    bundle, model_dir = int4_pair
    ref_model = _dequantized_hf(load_hf, model_dir)
    ids = np.random.default_rng(0).integers(0, 300, size=16).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        fp32 = load_hf(model_dir)[0](torch.tensor([ids])).logits[0].numpy()
    dec = Engine.load(bundle, threads=2, trust=True).decoder
    np.testing.assert_allclose(dec.forward(ids[:9], [0, 4, 8]), ref[[0, 4, 8]], atol=1e-4, rtol=0)
    np.testing.assert_allclose(dec.forward(ids[9:10]), ref[9], atol=1e-4, rtol=0)
    np.testing.assert_allclose(dec.forward(ids[10:14], [0, 1, 2, 3]), ref[10:14], atol=1e-4, rtol=0)
    dec.kv.length = 12
    np.testing.assert_allclose(dec.forward(ids[12:16], [0, 3]), ref[[12, 15]], atol=1e-4, rtol=0)
    assert np.abs(ref - fp32).max() > 1e-2  # the quantization is real: the float model gives other logits


def test_int4_greedy_matches_transformers_and_speculation_is_lossless(int4_pair, load_hf, hf_generate):
    bundle, model_dir = int4_pair
    ref_model = _dequantized_hf(load_hf, model_dir)
    engine = Engine.load(bundle, threads=2, trust=True)
    accepted = 0
    for prompt in PROMPTS[:4]:
        ids = engine.encode(prompt)
        want = hf_generate(ref_model, ids, 24)
        plain, spec, n = _plain_and_spec(engine, ids, 24)
        assert plain == want, prompt
        assert spec == plain, prompt
        assert len(set(want)) > 3
        accepted += n
    assert accepted > 0


def test_int4_manifest_params_and_size(tvm_int4_llama, tvm_llama):
    g = json.loads((tvm_int4_llama / "manifest.json").read_text())["graphs"]["decoder"]
    q = g["quantization"]
    assert q["scheme"] == "int4" and "W.words uint32" in q["layout"]
    assert q["bits"]["embed_tokens.weight"] == 8 and q["bits"]["layers.0.mlp.down_proj.weight"] == 4
    assert sum(k["weights"] for k in q["kinds"].values()) == len(q["bits"]) == 2 * 7 + 1
    assert g["verification"]["max_abs_logit_diff"] < 1e-3 and "dequantization" in g["verification"]["reference"]
    dtypes = {p["name"]: p["dtype"] for p in g["params"]}
    assert dtypes["layers.1.self_attn.q_proj.weight.words"] == "uint32"
    assert dtypes["layers.1.self_attn.q_proj.weight.scale"] == dtypes["embed_tokens.weight.offset"] == "float16"
    assert "layers.1.self_attn.q_proj.weight" not in dtypes and "norm.weight" in dtypes
    assert all(p["offset"] % 64 == 0 for p in g["params"])
    # the words in params.bin are what the manifest says: unpacked, they are 4-bit values
    from edgedec.targets import tvm_quant

    p = next(p for p in g["params"] if p["name"] == "layers.0.mlp.up_proj.weight.words")
    words = np.fromfile(tvm_int4_llama / "params.bin", dtype="<u4", count=int(np.prod(p["shape"])),
                        offset=p["offset"]).reshape(p["shape"])
    v = tvm_quant.unpack(words, 4)
    assert v.shape == (128, 64) and v.min() >= 0 and v.max() <= 15 and len(np.unique(v)) > 8
    size = lambda b: (b / "params.bin").stat().st_size  # noqa: E731
    assert size(tvm_int4_llama) < 0.45 * size(tvm_llama)


@pytest.mark.parametrize("fmt, bits", [("Q4_1", 4), ("Q4_0", 4), ("Q8_0", 8)])
def test_gguf_grids_are_re_expressed_without_loss(fmt, bits):
    """A weight on a GGUF grid (fp16 block scales, as GGUF stores them) comes back bit for bit."""
    from edgedec.targets import tvm_quant

    rng = np.random.default_rng(1)
    out, k = 64, 96
    d = (rng.random((out, k // 32)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    if fmt == "Q4_1":
        m = (-rng.random((out, k // 32)) * 0.1).astype(np.float16).astype(np.float32)
        q = rng.integers(0, 16, (out, k // 32, 32))
        q[..., 0], q[..., 1] = 0, 15  # the block's extremes, as Q4_1 writes them
        w = q * d[..., None] + m[..., None]
    elif fmt == "Q4_0":
        q = rng.integers(-8, 8, (out, k // 32, 32))
        q[..., 0] = -8
        w = q * d[..., None]
    else:
        q = rng.integers(-127, 128, (out, k // 32, 32))
        q[..., 0] = 127
        w = q * d[..., None]
    w = w.reshape(out, k).astype(np.float32)
    ql = tvm_quant.quantize(w, bits)
    assert ql.kind == fmt
    np.testing.assert_array_equal(ql.dequantize(), w)
    off_grid = tvm_quant.quantize(w + rng.standard_normal(w.shape).astype(np.float32) * 1e-3, bits)
    assert off_grid.kind == "rtn"


def test_pack_round_trip_and_bad_shapes():
    from edgedec.targets import tvm_quant

    rng = np.random.default_rng(2)
    for bits in (4, 8):
        v = rng.integers(0, 1 << bits, (64, 64)).astype(np.int32)
        np.testing.assert_array_equal(tvm_quant.unpack(tvm_quant.pack(v, bits), bits), v)
    assert not tvm_quant.fits((16, 64)) and not tvm_quant.fits((32, 48)) and tvm_quant.fits((32, 64))
    with pytest.raises(ValueError, match="does not fit"):
        tvm_quant.quantize(np.zeros((16, 64), np.float32), 4)


def _kernel_pair(make_one, make_many, bits: int, seed: int):
    """A decode kernel and its multi-row twin over a random (64, 96) weight in ``bits``, built for this
    machine: (one, many, the quantized weight, its tensors, the generator that made it)."""
    import tvm

    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_llvm_target

    target = tvm.target.Target(host_llvm_target(2))
    rng = np.random.default_rng(seed)
    q = tvm_quant.quantize(rng.standard_normal((64, 96)).astype(np.float32), bits)
    build = lambda f: tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target)["main"]  # noqa: E731
    w = [tvm.runtime.tensor(a) for a in (q.words, q.scale, q.offset)]
    return build(make_one(96, 64, bits)), build(make_many(96, 64, bits)), q, w, rng


def _rows_with_decode_bits(one, many, w, x: np.ndarray) -> np.ndarray:
    """x (1, rows, in) through the multi-row kernel, each row checked against the decode kernel's bits."""
    import tvm

    rows, n_out = x.shape[1], 64
    y = tvm.runtime.tensor(np.zeros((1, rows, n_out), np.float32))
    many(tvm.runtime.tensor(x), *w, y)
    for i in range(rows):
        yi = tvm.runtime.tensor(np.zeros((1, 1, n_out), np.float32))
        one(tvm.runtime.tensor(x[:, i:i + 1]), *w, yi)
        np.testing.assert_array_equal(y.numpy()[0, i], yi.numpy()[0, 0])
    return y.numpy()[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_multi_row_kernel_gives_the_decode_kernels_bits(bits):
    """Prefill / verification rows (both multi-row paths: few rows, many rows) equal the one-row decode
    kernel bit for bit, which is what keeps speculation lossless without two-row plain steps; and both
    equal numpy on the dequantized weights."""
    from edgedec.targets import tvm_quant

    one, many, q, w, rng = _kernel_pair(tvm_quant.gemv_kernel, tvm_quant.gemm_kernel, bits, seed=3)
    for rows in (1, 2, 3, tvm_quant.DIRECT_ROWS + 1, 8):
        x = rng.standard_normal((1, rows, 96)).astype(np.float32)
        y = _rows_with_decode_bits(one, many, w, x)
        np.testing.assert_allclose(y, x[0] @ q.dequantize().T, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# -q int4:activations=int8 (AVX512-VNNI)
# ---------------------------------------------------------------------------------------------------
def _has_vnni() -> bool:
    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_cpu_flags

    return tvm_quant.VNNI_FLAG in host_cpu_flags()


needs_vnni = pytest.mark.skipif(not _has_vnni(), reason="int8 activations need AVX512-VNNI; this CPU lacks it")


def _int8_reference(x: np.ndarray, q) -> np.ndarray:
    """numpy's version of the int8-activation kernels: each block of 32 inputs rounded to int8 with scale
    max|x|/127 (half away from zero), integer dot products with the 4- or 8-bit values, then d * dx and
    the offset over the exact float block sum, block by block."""
    from edgedec.targets import tvm_quant

    rows, k = x.shape
    v = tvm_quant.unpack(q.words, q.bits).astype(np.int64)  # (out, k)
    out = v.shape[0]
    per_block = lambda a: a.astype(np.float32).transpose(0, 2, 1).reshape(out, k // 32)  # noqa: E731
    d, m = per_block(q.scale), per_block(q.offset)
    y = np.zeros((rows, out), np.float32)
    for i in range(rows):
        for b in range(k // 32):
            xb = x[i, 32 * b:32 * b + 32]
            mx = np.float32(np.abs(xb).max())
            inv = np.float32(127) / mx if mx > 0 else np.float32(0)
            t = xb * inv
            xq = (np.sign(t) * np.floor(np.abs(t) + np.float32(0.5))).astype(np.int64)
            acc = (v[:, 32 * b:32 * b + 32] * xq).sum(1).astype(np.float32)
            y[i] += acc * (d[:, b] * (mx / np.float32(127))) + m[:, b] * np.float32(xb.sum(dtype=np.float64))
    return y


@needs_vnni
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activation_kernels_compute_what_they_say_and_rows_give_decode_bits(bits):
    """The VNNI kernels against numpy's emulation of the same rounding (close to float32 accumulation
    order), within a few % of the float product; and every multi-row row equals the decode kernel's bits."""
    from edgedec.targets import tvm_quant

    one, many, q, w, rng = _kernel_pair(tvm_quant.gemv_int8_kernel, tvm_quant.gemm_int8_kernel, bits, seed=5)
    x = rng.standard_normal((1, 5, 96)).astype(np.float32)
    x[0, 4] = 0.0  # an all-zero row: scale 0, no division by it
    y = _rows_with_decode_bits(one, many, w, x)
    np.testing.assert_allclose(y, _int8_reference(x[0], q), atol=1e-4, rtol=1e-5)
    exact = x[0] @ q.dequantize().T
    assert 0 < np.abs(y - exact).max() < 0.03 * np.abs(exact).max()


@pytest.fixture(scope="session")
def tvm_int8_act_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    return _tvm_bundle(tiny_llama_dir, tmp_path_factory.mktemp("tvm") / "tiny-llama-tvm-int4-i8",
                       passes=(("int4", {"activations": "int8"}),))


@needs_vnni
def test_int8_activations_bundle_is_close_to_transformers_and_speculates_losslessly(tvm_int8_act_llama, tvm_int4_llama,
                                                                                     tiny_llama_dir, load_hf):
    import torch

    m = json.loads((tvm_int8_act_llama / "manifest.json").read_text())["graphs"]["decoder"]
    assert m["quantization"]["activations"].startswith("int8")
    ref_model = _dequantized_hf(load_hf, tiny_llama_dir)
    ids = np.random.default_rng(0).integers(0, 300, size=12).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    engine = Engine.load(tvm_int8_act_llama, threads=2, trust=True)
    got = engine.decoder.forward(ids, list(range(12)))
    exact = Engine.load(tvm_int4_llama, threads=2, trust=True).decoder.forward(ids, list(range(12)))
    err, scale = np.abs(got - ref).max(), np.abs(ref).max()
    assert 1e-5 < err < 0.15 * scale, (err, scale)  # rounded: not the float bundle's logits, but near them
    assert np.abs(exact - ref).max() < 1e-4
    accepted = 0
    for prompt in PROMPTS:  # every prompt, 48 tokens: on a random tiny model drafts are accepted only now and then
        plain, spec, n = _plain_and_spec(engine, prompt, 48)
        assert spec == plain, prompt
        accepted += n
    assert accepted > 0


@pytest.mark.parametrize("target,option,message", [
    ("arm64", "activations=int8", "needs AVX512-VNNI .+ x86 extension"),
    ("cpu-tvm", "activations=int8", "needs AVX512-VNNI .+ this machine's CPU lacks it"),  # on a CPU without it
    ("cpu-tvm", "activations=int4", "must be float or int8"),
    ("cpu-tvm", "block_size=64", "takes int4 with two options"),
    ("cpu-tvm", "widen=maybe", "int4 widen must be true or false, not 'maybe'"),
])
def test_int4_option_errors(target, option, message, tiny_llama_dir, tmp_path, cli, one_line_error, monkeypatch):
    """The TVM targets' int4 takes one option, activations=float|int8, and int8 only where VNNI is."""
    from edgedec.targets import tvm_quant, tvm_target

    flags = [f for f in tvm_target.host_cpu_flags() if f != tvm_quant.VNNI_FLAG]
    monkeypatch.setattr(tvm_target, "host_cpu_flags", lambda: flags)  # this machine's /proc/cpuinfo, less VNNI
    out = tmp_path / "b"
    r = cli("compile", tiny_llama_dir, "-o", out, "--target", target, "--pass", f"int4:{option}")
    one_line_error(r, message)
    assert not out.exists()


def test_a_float32_compile_after_an_int4_one_is_float32(tiny_llama_dir, tmp_path):
    """The target object is shared by the compiles of a process: -q int4 must not stick to the next one."""
    int4 = compile_model(str(tiny_llama_dir), tmp_path / "a", CompileOptions(target="cpu-tvm", max_context=32,
                                                                             passes=INT4))
    plain = compile_model(str(tiny_llama_dir), tmp_path / "b", CompileOptions(target="cpu-tvm", max_context=32))
    assert int4["graphs"]["decoder"]["quantization"]["scheme"] == "int4"
    assert "quantization" not in plain["graphs"]["decoder"]
    assert {p["dtype"] for p in plain["graphs"]["decoder"]["params"]} == {"float32"}


def test_tvm_compile_exports_no_onnx_and_verifies_the_staged_library(tiny_qwen2_dir, tmp_path, monkeypatch):
    """The TVM targets build from the weights: the ONNX exporter is never called, and the manifest's
    verification is the library's own, run through the runtime's TVM session against transformers."""
    from edgedec.compiler import export

    def no_export(*args, **kwargs):
        raise AssertionError("a TVM target exported an ONNX graph")

    monkeypatch.setattr(export, "export_decoder", no_export)
    monkeypatch.setattr(export, "verify_against_source", no_export)
    m = compile_model(str(tiny_qwen2_dir), tmp_path / "b", CompileOptions(target="cpu-tvm", max_context=32,
                                                                          passes=INT4))
    v = m["verification"]
    assert v == m["graphs"]["decoder"]["verification"]
    assert v["subject"].startswith("decoder.so through the runtime's TvmDecoderSession")
    assert v["reference"] == "transformers with the quantized weights' dequantization"
    assert v["max_abs_logit_diff"] < 1e-3 and len(v["per_step"]) == 3 and v["tokens"] == 12
    assert "export_s" not in m["timings"] and {"weights_s", "build_s", "verify_s"} <= set(m["timings"])
    assert not any(f.endswith((".onnx", ".onnx.data")) for f in m["files"])


def test_a_library_that_differs_from_the_source_is_not_published(tiny_llama_dir, tmp_path):
    """The staged library is run and compared; beyond the tolerance nothing is written."""
    from edgedec.errors import ModelError

    out = tmp_path / "b"
    with pytest.raises(ModelError, match=r"the built bundle \(decoder.so through the runtime's TvmDecoderSession\) "
                                         r"differs from the source model by .* \(tolerance 1e-12\)"):
        compile_model(str(tiny_llama_dir), out, CompileOptions(target="cpu-tvm", max_context=32,
                                                               verify_tolerance=1e-12))
    assert not out.exists() and not list(tmp_path.iterdir())
