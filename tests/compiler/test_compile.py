"""The compile pipeline: manifest contents, atomic writing, model-source and option errors, GGUF input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edgedec.compiler.pipeline import CompileOptions, compile_model
from edgedec.errors import ConfigError, ModelError, UnsupportedError
from edgedec.runtime import Bundle, Engine


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    """Staging or replaced-bundle directories a compile left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial") or ".old-" in p.name)


# --- manifest --------------------------------------------------------------------------------
def test_manifest_contents(tiny):
    m = _manifest(tiny["bundle"])
    assert m["format"] == "edgedec-bundle" and m["format_version"] == 1
    src, hf = m["source"], tiny["dir"]
    assert src["kind"] == "hf" and src["path"] == str(hf.resolve()) and src["weight_format"] == "float"
    digest = hashlib.sha256()
    for f in (hf / "config.json", hf / "model.safetensors"):
        digest.update(_sha256(f).encode())
    assert src["sha256"] == digest.hexdigest()

    config = json.loads((hf / "config.json").read_text())
    a = m["architecture"]
    assert a["model_type"] == tiny["name"] == config["model_type"]
    assert (a["num_layers"], a["hidden_size"], a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (2, 64, 4, 2, 16)
    assert (a["intermediate_size"], a["vocab_size"], a["max_position_embeddings"]) == (128, 384, 256)
    assert a["attention_bias"] is (tiny["name"] == "qwen2")
    assert a["tie_word_embeddings"] is (tiny["name"] == "llama")

    assert m["target"] == {"name": "cpu", "backend": "onnxruntime", "execution_provider": "CPUExecutionProvider"}
    g = m["graphs"]["decoder"]
    assert g["role"] == "decoder" and g["file"] == "decoder.onnx" and g["data"] == ["decoder.onnx.data"]
    inputs = {v["name"]: v for v in g["inputs"]}
    outputs = {v["name"]: v for v in g["outputs"]}
    layers = [f"{kind}.{i}" for i in range(2) for kind in ("key", "value")]
    assert list(inputs) == ["input_ids", "seqlens_k", "total_sequence_length", "logits_index",
                            *[f"past_{x}" for x in layers]]
    assert list(outputs) == ["logits", *[f"present_{x}" for x in layers]]
    assert inputs["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": [1, "sequence"]}
    assert inputs["seqlens_k"]["dtype"] == inputs["total_sequence_length"]["dtype"] == "int32"
    assert inputs["past_key.0"] == {"name": "past_key.0", "dtype": "float32", "shape": [1, 2, "capacity", 16]}
    assert outputs["logits"] == {"name": "logits", "dtype": "float32", "shape": [1, "num_logits", 384]}

    kv = m["kv_cache"]
    assert (kv["num_layers"], kv["kv_heads"], kv["head_dim"], kv["max_capacity"]) == (2, 2, 16, 256)
    assert kv["dtype"] == "float32" and kv["in_place"] is True

    tok = m["tokenizer"]
    assert tok["file"] == "tokenizer.json"
    assert (tok["bos_token"], tok["eos_token"], tok["bos_token_id"], tok["eos_token_ids"], tok["pad_token_id"]) == \
        ("<s>", "</s>", 1, [2], 0)
    assert "<|im_start|>" in tok["chat_template"] and "add_generation_prompt" in tok["chat_template"]
    assert (tiny["bundle"] / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()

    v = m["verification"]
    assert v["max_abs_logit_diff"] < 1e-3 and v["tokens"] == 12 and v["reference"] == "transformers"
    fuse, norms = m["passes"]  # the cpu target's required passes, nothing else without options
    assert fuse["pass"] == "fuse-projections" and fuse["modified"] is True
    assert fuse["report"] == {"fused": {"qkv": 2, "siblings": 2}}  # 2 layers: q/k/v and gate/up each
    assert norms["pass"] == "fuse-norms" and norms["modified"] is True
    assert norms["report"]["norms"] == 5 and norms["report"]["skip_norms"] == 3  # 2 per layer + final


def test_manifest_hashes_every_file(tiny):
    bundle = tiny["bundle"]
    files = _manifest(bundle)["files"]
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json"}
    assert set(files) == {"decoder.onnx", "decoder.onnx.data", "tokenizer.json"}
    for name, info in files.items():
        assert info == {"bytes": (bundle / name).stat().st_size, "sha256": _sha256(bundle / name)}, name
    Bundle.open(bundle)


def test_bundle_is_self_contained(tiny, tmp_path):
    """Moved elsewhere, with the source model gone, the bundle still runs."""
    moved = tmp_path / "moved"
    shutil.copytree(tiny["bundle"], moved)
    engine = Engine.load(moved, threads=1)
    assert engine.generate_text("x", max_new_tokens=3, ignore_eos=True)


def test_cli_inspect(tiny_llama_bundle, cli):
    r = cli("inspect", tiny_llama_bundle)
    assert r.exit_code == 0, r.stderr
    assert "bundle valid" in r.stdout and "llama, 2 layers" in r.stdout
    r = cli("inspect", tiny_llama_bundle, "--json")
    assert json.loads(r.stdout) == _manifest(tiny_llama_bundle)


# --- atomic writing --------------------------------------------------------------------------
def test_failed_verification_leaves_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=r"the exported graph differs from the source model by .* in logits "
                                         r"\(tolerance 1e-12\); refusing to write a wrong bundle"):
        compile_model(str(tiny_llama_dir), out, CompileOptions(verify_tolerance=1e-12))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_compile_keeps_the_old_bundle(tiny_llama_bundle, tiny_llama_dir, tmp_path, monkeypatch):
    """An interrupt mid-way through a --force compile removes the staging dir and leaves the old bundle."""
    from edgedec.compiler import export

    out = tmp_path / "out"
    shutil.copytree(tiny_llama_bundle, out)
    before = {p.name: _sha256(p) for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        assert _leftovers(tmp_path), "the pipeline should be writing into a staging directory"
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "verify_against_source", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compile_model(str(tiny_llama_dir), out, CompileOptions(force=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: _sha256(p) for p in out.iterdir()} == before
    Bundle.open(out)


def test_existing_output_is_refused_without_force(tiny_llama_bundle, tiny_llama_dir, tmp_path, cli, one_line_error):
    out = tmp_path / "out"
    shutil.copytree(tiny_llama_bundle, out)
    with pytest.raises(ConfigError, match=r"already exists; pass --force to replace it"):
        compile_model(str(tiny_llama_dir), out)
    one_line_error(cli("compile", tiny_llama_dir, "-o", out), r"already exists; pass --force to replace it")
    assert _leftovers(tmp_path) == []


def test_cli_compile_force_replaces_a_bundle(tiny_llama_bundle, tiny_qwen2_dir, tmp_path, cli):
    out = tmp_path / "out"
    shutil.copytree(tiny_llama_bundle, out)
    r = cli("compile", tiny_qwen2_dir, "-o", out, "--force", "--max-context", "64")
    assert r.exit_code == 0, r.stderr
    assert f"bundle {out}" in "".join(r.stdout.split("\n")) and "max |logit diff| vs source" in r.stdout
    manifest = _manifest(out)
    assert manifest["architecture"]["model_type"] == "qwen2"
    assert manifest["kv_cache"]["max_capacity"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or replaced bundle left
    engine = Engine.load(out, threads=1)
    assert engine.context_length == 64
    assert out.stat().st_mode & 0o077  # not left with mkdtemp's private 0700 mode


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.write_text("x"), r"exists and is not a directory"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), r"is a non-empty directory that is not a bundle"),
    ],
    ids=["file", "foreign-dir"],
)
def test_force_does_not_clobber_non_bundles(tiny_llama_dir, tmp_path, setup, message):
    out = tmp_path / "out"
    setup(out)
    with pytest.raises(ConfigError, match=message):
        compile_model(str(tiny_llama_dir), out, CompileOptions(force=True))
    assert out.exists()


def test_missing_output_parents_are_created(tiny_llama_dir, tmp_path):
    out = tmp_path / "a" / "b"
    compile_model(str(tiny_llama_dir), out, CompileOptions())
    assert Bundle.open(out).manifest["format_version"] == 1


def test_output_under_a_file_is_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "a").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"cannot create the parent directory of .*: a path component is a file"):
        compile_model(str(tiny_llama_dir), tmp_path / "a" / "b")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_context=8), r"max_context must be >= 16, got 8"),
        (dict(verify_tolerance=0), r"verify_tolerance must be > 0, got 0"),
        (dict(verify_tolerance=float("nan")), r"verify_tolerance must be > 0, got nan"),
    ],
)
def test_bad_compile_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompileOptions(**kwargs)


def test_unknown_target(tiny_llama_dir, tmp_path, cli, one_line_error):
    with pytest.raises(UnsupportedError, match=r"unknown target 'npu9'; valid targets: cpu"):
        compile_model(str(tiny_llama_dir), tmp_path / "out", CompileOptions(target="npu9"))
    one_line_error(cli("compile", tiny_llama_dir, "-o", tmp_path / "out", "--target", "npu9"),
                   r"unknown target 'npu9'; valid targets: cpu")
    assert list(tmp_path.iterdir()) == []


# --- model sources ---------------------------------------------------------------------------
def _write_gguf_header(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bad_source(kind: str, tmp: Path, tiny_dir: Path) -> Path:
    src = tmp / "src"
    if kind == "missing":
        return tmp / "no-such-model"
    if kind == "text-file":
        src = tmp / "weights.bin"
        src.write_bytes(b"\x00" * 64)
    elif kind == "no-config":
        src.mkdir()
        shutil.copy(tiny_dir / "tokenizer.json", src)
    elif kind == "no-tokenizer":
        src.mkdir()
        shutil.copy(tiny_dir / "config.json", src)
        shutil.copy(tiny_dir / "model.safetensors", src)
    elif kind == "bad-config":
        src.mkdir()
        shutil.copy(tiny_dir / "tokenizer.json", src)
        (src / "config.json").write_text("{not json")
    elif kind == "gpt2":
        src.mkdir()
        shutil.copy(tiny_dir / "tokenizer.json", src)
        (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}))
    elif kind == "no-weights":
        src.mkdir()
        shutil.copy(tiny_dir / "tokenizer.json", src)
        shutil.copy(tiny_dir / "config.json", src)
    elif kind == "random-gguf":
        src = tmp / "model.gguf"
        src.write_bytes(bytes(range(256)) * 64)
    elif kind == "empty-gguf":
        src = tmp / "model.gguf"
        src.write_bytes(b"")
    elif kind == "gpt2-gguf":
        src = _write_gguf_header(tmp / "gpt2.gguf", "gpt2")
    return src


SOURCE_ERRORS = [
    ("missing", ModelError, r"no such file, directory or registry model: '.*no-such-model' "
                            r"\(known models: SmolLM2-135M-Instruct, "),
    ("text-file", ModelError, r"weights\.bin is not a model: expected a Hugging Face directory or a \.gguf file"),
    ("no-config", ModelError, r"is not a Hugging Face model directory \(no config\.json\)"),
    ("no-tokenizer", ModelError, r"has no tokenizer\.json \(edgedec needs a fast tokenizer\)"),
    ("bad-config", ModelError, r"cannot read the model configuration of"),
    ("gpt2", UnsupportedError, r"unsupported architecture 'gpt2'; edgedec supports llama, qwen2"),
    ("no-weights", ModelError, r"cannot load the weights of"),
    ("random-gguf", ModelError, r"model\.gguf is not a readable GGUF file"),
    ("empty-gguf", ModelError, r"model\.gguf is not a readable GGUF file"),
    ("gpt2-gguf", UnsupportedError, r"GGUF architecture 'gpt2' is not supported; edgedec supports llama, qwen2"),
]


@pytest.mark.parametrize("kind, error, message", SOURCE_ERRORS, ids=[s[0] for s in SOURCE_ERRORS])
def test_model_source_errors(kind, error, message, tiny_llama_dir, tmp_path, cli, one_line_error):
    src = _bad_source(kind, tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        compile_model(str(src), out)
    assert not out.exists() and _leftovers(tmp_path) == []
    one_line_error(cli("compile", src, "-o", out), message)
    assert not out.exists() and _leftovers(tmp_path) == []


# --- GGUF ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_bundle(tiny_llama_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-bundle") / "bundle"
    compile_model(str(tiny_llama_gguf), out)
    return out


def test_gguf_manifest(gguf_bundle, tiny_llama_gguf, tiny_llama_bundle):
    m, ref = _manifest(gguf_bundle), _manifest(tiny_llama_bundle)
    src = m["source"]
    assert src["kind"] == "gguf" and src["name"] == tiny_llama_gguf.name
    assert src["sha256"] == _sha256(tiny_llama_gguf) and src["weight_format"] == "F32"
    arch, ref_arch = dict(m["architecture"]), dict(ref["architecture"])
    assert arch.pop("rms_norm_eps") == pytest.approx(ref_arch.pop("rms_norm_eps"), rel=1e-6)  # float32 in GGUF
    assert arch == ref_arch
    assert m["verification"]["max_abs_logit_diff"] < 1e-3
    assert m["tokenizer"]["eos_token_ids"] == [2] and m["tokenizer"]["bos_token"] == "<s>"
    assert m["tokenizer"]["chat_template"] == ref["tokenizer"]["chat_template"]


def test_gguf_bundle_matches_the_hf_bundle(gguf_bundle, tiny_llama_bundle):
    """Same weights through llama.cpp's layout (permuted q/k rows, byte-level vocabulary): same tokens."""
    ours, ref = Engine.load(gguf_bundle, threads=1), Engine.load(tiny_llama_bundle, threads=1)
    for prompt in ("def fibonacci(n):\n    return", "The quick brown fox", "Étrange café 🙂"):
        assert ours.codec.encode(prompt) == ref.codec.encode(prompt), prompt
        a = [t.id for t in ours.generate(prompt, max_new_tokens=24, ignore_eos=True)]
        b = [t.id for t in ref.generate(prompt, max_new_tokens=24, ignore_eos=True)]
        assert a == b, prompt


def test_sigterm_during_a_compile_leaves_nothing_behind(tiny_llama_dir, tmp_path):
    """A cancelled CI job sends SIGTERM: the compile stops and removes its staging directory."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bundles" / "b"
    proc = subprocess.Popen([sys.executable, "-m", "edgedec.cli", "compile", str(tiny_llama_dir), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".b.*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the compile ended before its staging directory appeared"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []


def test_a_compile_sweeps_what_a_killed_compile_left(tiny_llama_dir, tmp_path, cli):
    """SIGKILL leaves a staging directory nothing could remove; the next compile to that output removes it
    once it is a day old, and leaves a fresh one (a compile still running) and other names alone."""
    import os
    import time

    out = tmp_path / "b"
    stale, fresh, other = (tmp_path / ".b.x1.partial", tmp_path / ".b.x2.partial", tmp_path / ".bb.x3.partial")
    for d in (stale, fresh, other):
        (d / "graphs").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    for d in (stale, other):
        os.utime(d, (day_ago, day_ago))
    r = cli("compile", tiny_llama_dir, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert (out / "manifest.json").is_file()
    assert not stale.exists() and fresh.is_dir() and other.is_dir()
