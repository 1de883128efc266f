"""``compile --force`` replaces only an edgedec bundle; two compiles to one path cannot both win
(issue 21, "Found" 2 and "Smaller": concurrent compiles)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgedec.compiler import bundle_writer
from edgedec.compiler.pipeline import CompileOptions, compile_model
from edgedec.errors import ConfigError
from edgedec.runtime import Bundle


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _project(path: Path) -> Path:
    """The reproducer: a project folder that happens to hold a manifest.json."""
    (path / "src").mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"name": "x"}))
    (path / "NOTES.md").write_text("my notes\n")
    (path / "src" / "main.py").write_text("print('mine')\n")
    return path


def test_force_refuses_a_project_folder_with_a_manifest(tiny_llama_dir, tmp_path, cli, one_line_error):
    out = _project(tmp_path / "proj")
    before = _snapshot(out)
    one_line_error(cli("compile", tiny_llama_dir, "-o", out, "--force"),
                   r"output .*proj is a non-empty directory that is not a bundle \(its manifest\.json is not an "
                   r"edgedec manifest\); refusing to replace it")
    with pytest.raises(ConfigError, match="is not an edgedec manifest"):
        compile_model(str(tiny_llama_dir), out, CompileOptions(force=True))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no staging dir, lock or moved copy left


@pytest.mark.parametrize("case, message", [
    ("extra-file", r"it holds NOTES\.md, which its manifest does not list"),
    ("format-only", r"its manifest\.json is not an edgedec manifest"),
    ("bad-json", r"its manifest\.json is not valid JSON"),
    ("no-manifest", r"it has no manifest\.json"),
], ids=["extra-file", "format-only", "bad-json", "no-manifest"])
def test_force_replaces_only_a_whole_bundle(tiny_llama_bundle, tmp_path, case, message):
    out = tmp_path / "out"
    shutil.copytree(tiny_llama_bundle, out)
    if case == "extra-file":  # a bundle directory the user put their own file into
        (out / "NOTES.md").write_text("mine\n")
    elif case == "format-only":  # the right format string, none of a bundle's keys
        (out / "manifest.json").write_text(json.dumps({"format": "edgedec-bundle", "format_version": 1}))
    elif case == "bad-json":
        (out / "manifest.json").write_text("{")
    else:
        (out / "manifest.json").unlink()
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=message):
        bundle_writer.check_output(out, force=True)
    assert _snapshot(out) == before


def test_force_still_replaces_a_bundle_and_its_signature(tiny_llama_bundle, tmp_path, keys):
    from edgedec.runtime.trust import sign_bundle

    out = tmp_path / "out"
    shutil.copytree(tiny_llama_bundle, out)
    sign_bundle(out, keys["a"][0])
    bundle_writer.check_output(out, force=True)  # a signed bundle is still a bundle


def test_force_does_not_follow_a_symlinked_output(tiny_llama_bundle, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(tiny_llama_bundle, real)
    os.symlink(real, tmp_path / "out")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        bundle_writer.check_output(tmp_path / "out", force=True)


def test_a_compile_holding_the_lock_refuses_another(tiny_llama_dir, tmp_path, cli, one_line_error):
    out = tmp_path / "out"
    with bundle_writer.output_lock(out):
        one_line_error(cli("compile", tiny_llama_dir, "-o", out), r"another compile is writing .*out now")
        one_line_error(cli("compile", tiny_llama_dir, "-o", out, "--force"), r"another compile is writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file goes with the lock


def test_publish_never_replaces_what_appeared_meanwhile(tmp_path):
    """An empty directory created at the output during a compile: a plain rename would replace it."""
    staged, out = tmp_path / ".out.x.partial", tmp_path / "out"
    staged.mkdir()
    (staged / "manifest.json").write_text("{}")
    out.mkdir()
    with pytest.raises(FileExistsError):
        bundle_writer.rename_no_replace(staged, out)
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        bundle_writer.publish(staged, out)
    assert list(out.iterdir()) == [] and (staged / "manifest.json").is_file()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a bundle"):
        bundle_writer.publish(staged, out, force=True)
    assert (out / "mine.txt").read_text() == "mine"


def test_two_concurrent_compiles_cannot_both_win(tiny_llama_dir, tmp_path):
    """Two real compiles started together to one path, without --force: one writes the bundle, the other is
    refused in one line with exit 2 (locked out, or finding the finished bundle)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgedec.cli", "compile", str(tiny_llama_dir), "-o", str(out), "--max-context", "64"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1
    assert "another compile is writing" in loser or "already exists" in loser, loser
    Bundle.open(out)  # the winner's bundle, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
