"""Write a bundle atomically: build in a temporary sibling directory, hash every file, rename at the end."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from ..errors import ConfigError
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file

log = logging.getLogger(__name__)
STALE_S = 24 * 3600  # a staging directory untouched this long belongs to a compile that was killed


def check_output(output: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists and may not be replaced."""
    if output.exists():
        if not output.is_dir():
            raise ConfigError(f"output {output} exists and is not a directory")
        if not force:
            raise ConfigError(f"output {output} already exists; pass --force to replace it")
        if any(output.iterdir()) and not (output / MANIFEST).is_file():
            raise ConfigError(f"output {output} is a non-empty directory that is not a bundle; refusing to replace it")
    try:  # like mkdir -p: `-o bundles/smol` works in a fresh checkout
        output.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"cannot create the parent directory of {output}: a path component is a file") from exc


@contextlib.contextmanager
def staging_dir(output: Path):
    """A temporary directory beside ``output`` (same filesystem, so the final rename is atomic).

    Removed on any failure or interrupt; the caller publishes it with :func:`publish`.
    """
    sweep_stale(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_stale(output: Path, older_than_s: float = STALE_S) -> list[Path]:
    """Remove the staging directories that earlier compiles to ``output`` left behind.

    A failed or interrupted compile removes its own; one killed outright (SIGKILL, the OOM killer, a power
    cut) cannot. Only directories untouched for ``older_than_s`` go, so a compile to the same output that is
    still running keeps its own.
    """
    removed = []
    for path in glob.glob(os.path.join(glob.escape(str(output.parent)), f".{glob.escape(output.name)}.*.partial")):
        try:
            if time.time() - os.stat(path).st_mtime < older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a compile that was killed", path)
        removed.append(Path(path))
    return removed


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Hash every file in ``directory`` into ``manifest['files']`` and write ``manifest.json``."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST):  # draft/manifest.json too
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def publish(staged: Path, output: Path) -> None:
    """Move the finished bundle into place; an existing bundle at ``output`` is replaced whole."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)
    for path in staged.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
    try:
        os.rename(staged, output)
    except BaseException:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
