"""Write a bundle atomically: build in a temporary sibling directory, hash every file, rename at the end.

Replacing is careful: ``--force`` replaces only an edgedec bundle (a ``manifest.json`` that parses as an
edgedec manifest, and no files it does not list), never another directory. A compile holds
``.<output>.lock`` beside the output for its whole run, so two compiles to one path cannot both
proceed (the second is refused), and the final rename never replaces what appeared at the output
meanwhile unless ``--force`` allows it (``renameat2(RENAME_NOREPLACE)`` where Linux has it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the no-replace check before the rename remains
    fcntl = None

from ..errors import ConfigError
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from ..runtime.trust import SIGNATURE

log = logging.getLogger(__name__)
STALE_S = 24 * 3600  # a staging directory untouched this long belongs to a compile that was killed
BUNDLE_KEYS = ("format", "format_version", "source", "architecture", "target", "graphs", "kv_cache", "tokenizer",
               "files")  # what every manifest edgedec writes has: how --force recognizes a bundle


def not_a_bundle(directory: Path) -> str | None:
    """Why ``directory`` is not an edgedec bundle that ``--force`` may replace (None: it is one, or empty).

    A bundle's ``manifest.json`` parses as an edgedec manifest (format, format_version and the keys a
    bundle has), and every file in the directory is one it lists (or the manifest and its signature):
    a file of the user's inside would be deleted with the rest."""
    entries = list(directory.iterdir())
    if not entries:
        return None
    mpath = directory / MANIFEST
    if not mpath.is_file() or mpath.is_symlink():
        return f"it has no {MANIFEST}"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"its {MANIFEST} is not valid JSON"
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("format_version"), int) and not isinstance(manifest["format_version"], bool)
            and all(k in manifest for k in BUNDLE_KEYS) and isinstance(manifest["files"], dict)):
        return f"its {MANIFEST} is not an edgedec manifest"
    known = {MANIFEST, SIGNATURE, *manifest["files"]}
    for path in directory.rglob("*"):
        if path.is_symlink() or not path.is_dir():
            rel = path.relative_to(directory).as_posix()
            if rel not in known:
                return f"it holds {rel}, which its manifest does not list"
    return None


def check_output(output: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists and may not be replaced."""
    if os.path.lexists(output):
        if output.is_symlink():
            raise ConfigError(f"output {output} is a symbolic link; name the directory itself")
        if not output.is_dir():
            raise ConfigError(f"output {output} exists and is not a directory")
        if not force:
            raise ConfigError(f"output {output} already exists; pass --force to replace it")
        if why := not_a_bundle(output):
            raise ConfigError(f"output {output} is a non-empty directory that is not a bundle ({why}); "
                              "refusing to replace it")
    try:  # like mkdir -p: `-o bundles/smol` works in a fresh checkout
        output.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"cannot create the parent directory of {output}: a path component is a file") from exc


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold ``.<output>.lock`` (an exclusive ``flock``) beside ``output``; refuse if another compile holds it.

    The lock file is removed on release. A compile that opened it before that removal and locks it after
    holds a file no longer at the path; it notices (the inode differs) and starts over."""
    if fcntl is None:
        yield
        return
    path = lock_path(output)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another compile is writing {output} now ({path.name} is locked); "
                              "wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def staging_dir(output: Path):
    """A temporary directory beside ``output`` (same filesystem, so the final rename is atomic), made while
    holding the output's lock (:func:`output_lock`) for the whole compile.

    Removed on any failure or interrupt; the caller publishes it with :func:`publish`.
    """
    with output_lock(output):
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


def publish(staged: Path, output: Path, force: bool = False) -> None:
    """Move the finished bundle into place. What is at ``output`` now is checked again (it may have
    appeared while compiling): only with ``force``, and only an edgedec bundle, is it replaced whole."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)
    for path in staged.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if os.path.lexists(output):
        check_output(output, force)  # the same refusals as before the compile
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
    try:
        rename_no_replace(staged, output)
    except FileExistsError:
        if old is not None:
            os.rename(old, output)
        raise ConfigError(f"output {output} appeared while compiling; pass --force to replace it") from None
    except BaseException:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (even an empty directory,
    which a plain rename would replace). Linux's ``renameat2(RENAME_NOREPLACE)`` makes it atomic; elsewhere
    (or on a filesystem without it) an existence check precedes the rename, under the output's lock."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
