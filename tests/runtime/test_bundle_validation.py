"""A corrupted bundle is refused with a clear error, by ``Engine.load`` and by ``edgedec run``/``inspect``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgedec.errors import BundleError
from edgedec.runtime import Bundle, Engine


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def bad_json(b: Path):
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[: len(text) // 2])


def not_edgedec(b: Path):
    _edit_manifest(b, lambda m: m.update(format="something-else"))


def future_version(b: Path):
    _edit_manifest(b, lambda m: m.update(format_version=2))


def missing_key(b: Path):
    _edit_manifest(b, lambda m: m.pop("kv_cache"))


def bad_arch(b: Path):
    _edit_manifest(b, lambda m: m["architecture"].update(num_layers="2"))


def no_manifest(b: Path):
    (b / "manifest.json").unlink()


def truncated_weights(b: Path):
    data = b / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])


def flipped_byte(b: Path):
    data = b / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def modified_tokenizer(b: Path):
    tok = b / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<s>", "<S>"))


def deleted_graph(b: Path):
    (b / "decoder.onnx").unlink()


def unhashed_graph(b: Path):
    _edit_manifest(b, lambda m: m["files"].pop("decoder.onnx"))


def outside_path(b: Path):
    _edit_manifest(b, lambda m: m["files"].update({"../escape.bin": {"bytes": 1, "sha256": "0" * 64}}))


def other_backend(b: Path):
    _edit_manifest(b, lambda m: m["target"].update(backend="coreml"))


CORRUPTIONS = [
    (bad_json, r"manifest\.json is not valid JSON"),
    (not_edgedec, r"is not an edgedec manifest"),
    (future_version, r"bundle format version 2 is not supported by this edgedec \(it reads version 1\)"),
    (missing_key, r"manifest is missing required keys: kv_cache"),
    (bad_arch, r"manifest: architecture\.num_layers must be an integer, got \"2\""),
    (no_manifest, r"is not a bundle: manifest\.json is missing"),
    (truncated_weights, r"bundle file decoder\.onnx\.data has \d+ bytes, manifest says \d+ \(truncated or modified\)"),
    (flipped_byte, r"bundle file decoder\.onnx\.data does not match its sha256"),
    (modified_tokenizer, r"bundle file tokenizer\.json (does not match its sha256|has \d+ bytes)"),
    (deleted_graph, r"bundle file decoder\.onnx is missing"),
    (unhashed_graph, r"manifest refers to 'decoder\.onnx', which is not among its hashed files"),
    (outside_path, r"manifest file entry '\.\./escape\.bin' points outside the bundle"),
    (other_backend, r"this runtime runs onnxruntime and tvm bundles; this one is for backend 'coreml'"),
]
IDS = [c[0].__name__ for c in CORRUPTIONS]


def test_pristine_copy_loads(bundle_copy):
    engine = Engine.load(bundle_copy, threads=1)
    assert engine.generate_text("x", max_new_tokens=2, ignore_eos=True)


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=IDS)
def test_engine_load_refuses(bundle_copy, corrupt, message):
    corrupt(bundle_copy)
    with pytest.raises(BundleError, match=message):
        Engine.load(bundle_copy, threads=1)


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=IDS)
def test_cli_run_refuses(bundle_copy, corrupt, message, cli, one_line_error):
    corrupt(bundle_copy)
    one_line_error(cli("run", bundle_copy, "--prompt", "hello", "-n", "2", "--threads", "1"), message)


@pytest.mark.parametrize("corrupt, message", [c for c in CORRUPTIONS if c[0] is not other_backend],
                         ids=[i for i in IDS if i != "other_backend"])
def test_cli_inspect_refuses(bundle_copy, corrupt, message, cli, one_line_error):
    corrupt(bundle_copy)
    one_line_error(cli("inspect", bundle_copy), message)


def test_size_is_checked_even_without_hashes(bundle_copy):
    flipped_byte(bundle_copy)
    Bundle.open(bundle_copy, verify_hashes=False)  # same size: only the hash would notice
    Engine.load(bundle_copy, threads=1, verify=False)
    truncated_weights(bundle_copy)
    with pytest.raises(BundleError, match="has \\d+ bytes"):
        Engine.load(bundle_copy, threads=1, verify=False)


def test_not_a_directory(tmp_path, cli, one_line_error):
    path = tmp_path / "file.txt"
    path.write_text("hi")
    with pytest.raises(BundleError, match="is not a bundle directory"):
        Engine.load(path)
    one_line_error(cli("run", tmp_path / "nope", "-p", "hi"), "is not a bundle directory")


def test_edgedec_run_entry_point(bundle_copy):
    """The installed console script, not just the typer app: exit 2, one line, no traceback."""
    flipped_byte(bundle_copy)
    exe = Path(sys.executable).with_name("edgedec")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgedec.cli"]
    proc = subprocess.run([*cmd, "run", str(bundle_copy), "-p", "hello", "-n", "2"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: bundle file decoder.onnx.data does not match its sha256 in the manifest (corrupted or modified)"]
    assert proc.stdout == ""


def test_cli_run_works_on_the_pristine_copy(bundle_copy, cli):
    r = cli("run", bundle_copy, "--prompt", "def f(x):", "-n", "4", "--threads", "1", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["new_tokens"] <= 4 and result["stop_reason"] in ("length", "eos")
    engine = Engine.load(bundle_copy, threads=1)
    assert result["token_ids"] == [t.id for t in engine.generate("def f(x):", max_new_tokens=4)]
    r = cli("run", bundle_copy, "--prompt", "hi", "--chat", "--system", "be brief", "-n", "3", "--threads", "1",
            "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 10  # the template wrapped the message


def test_cli_run_takes_the_prompt_as_argument_option_or_stdin(bundle_copy, cli, one_line_error):
    from typer.testing import CliRunner

    from edgedec.cli import app

    want = [t.id for t in Engine.load(bundle_copy, threads=1).generate("def f(x):", max_new_tokens=4)]
    ids = lambda r: json.loads(r.stdout)["token_ids"]  # noqa: E731
    common = ["-n", "4", "--threads", "1", "--json"]
    assert ids(cli("run", bundle_copy, "def f(x):", *common)) == want
    for args in (["-"], []):  # stdin: asked for with -, or read when nothing else gives the prompt
        r = CliRunner().invoke(app, ["run", str(bundle_copy), *args, *common], input="def f(x):\n")
        assert r.exit_code == 0, r.stderr
        assert ids(r) == want  # echo's newline is not part of the prompt
    one_line_error(cli("run", bundle_copy, "a", "-p", "b", *common), "give the prompt once")
    one_line_error(cli("run", bundle_copy, *common), "no prompt")  # the test runner's stdin is empty


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(architecture=[]), r"manifest: architecture must be an object, got \[\]"),
        (lambda m: m.update(graphs=["decoder.onnx"]), r"manifest: graphs must be an object"),
        (lambda m: m["graphs"].update(decoder="decoder.onnx"), r"manifest: graphs\.decoder must be an object"),
        (lambda m: m["graphs"]["decoder"].pop("file"), r"manifest: graphs\.decoder\.file is missing"),
        (lambda m: m["graphs"]["decoder"].update(role="draft"), r"bundle has no graph with role 'decoder'"),
        (lambda m: m.update(tokenizer="tokenizer.json"), r"manifest: tokenizer must be an object"),
        (lambda m: m.update(kv_cache={}), r"manifest: kv_cache\.max_capacity is missing"),
        (lambda m: m.update(target=None), r"manifest: target must be an object, got null"),
        (lambda m: m.update(files=[]), r"manifest: files must be an object"),
        (lambda m: m["files"]["decoder.onnx"].pop("sha256"), r"manifest: files\.decoder\.onnx\.sha256 is missing"),
        (lambda m: m["files"].update({"tokenizer.json": "abc"}), r"manifest: files\.tokenizer\.json must be an object"),
    ],
    ids=["arch-list", "graphs-list", "graph-str", "graph-no-file", "no-decoder-role", "tokenizer-str",
         "kv-no-capacity", "target-null", "files-list", "no-sha", "file-entry-str"],
)
def test_malformed_manifest_is_a_bundle_error(bundle_copy, edit, message, cli, one_line_error):
    """Malformed sections are bad input (BundleError, exit 2), never an internal error."""
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        Engine.load(bundle_copy, threads=1)
    one_line_error(cli("run", bundle_copy, "--prompt", "hello", "-n", "2", "--threads", "1"), message)
