"""Bundle format version 1: a directory with ``manifest.json`` (plain JSON) and the files it lists.

Torch-free. ``Bundle.open`` validates before anything runs: the manifest as a whole (types, ranges and
cross-field consistency, :mod:`edgedec.runtime.manifest`), that every listed file exists with the
recorded size and sha256, and that every graph and tokenizer the manifest refers to is among the
hashed files.

Containment: nothing outside the bundle's directory is read because the manifest says so. Every name
the manifest gives (``files`` entries, graphs, external data, the tokenizer, parameter and scale files)
is a relative path without ``..`` that, with symbolic links followed, stays inside the directory; a
symbolic link anywhere in the bundle that leads out of it refuses the whole bundle. The refusal says
nothing about the link's target (not whether it exists, nor its size). :meth:`Bundle.file` is the one
way the runtime turns a name into a path, and it only returns hashed files inside the bundle.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import BundleError
from .manifest import FORMAT, FORMAT_VERSION, MAX_MANIFEST_BYTES, Manifest, load_json, parse_manifest  # noqa: F401 (re-exported)

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_inside(root: str | Path, name: str) -> Path:
    """``root / name`` with symbolic links followed, refused unless it stays inside ``root``.

    ``name`` must be a relative path without ``..``. A link out is refused with a message that names
    only ``name``: nothing about where it leads, whether that exists, or its size."""
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute() \
            or ".." in Path(name).parts or "\\" in name:
        raise BundleError(f"manifest file entry {name!r} points outside the bundle")
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, target]) != base:
        raise BundleError(f"bundle file {name} leads outside the bundle directory (a symbolic link); "
                          "refusing to read it")
    return Path(target)


def check_links(root: str | Path) -> None:
    """Refuse a bundle directory holding a symbolic link that leads out of it (or that cannot be
    resolved). Graph formats name files of their own (ONNX external data), so every link counts, not
    only those the manifest names."""
    base = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            target = os.path.realpath(path)
            if os.path.commonpath([base, target]) != base:
                rel = os.path.relpath(path, base)
                raise BundleError(f"bundle file {rel} is a symbolic link that leads outside the bundle directory; "
                                  "refusing the bundle")


@dataclass
class Bundle:
    path: Path
    manifest: dict  # the parsed JSON, as written
    info: Manifest | None = None  # the same, typed and validated (Bundle.open sets it)
    raw: bytes = field(default=b"", repr=False)  # manifest.json's bytes as read: what a signature covers

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle directory")
        mpath = path / MANIFEST
        if not os.path.lexists(mpath):
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
        real = resolve_inside(path, MANIFEST)  # before reading it: the manifest itself may be a link out
        if not real.is_file():
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
        try:
            if real.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{mpath} has {real.stat().st_size:,} bytes, more than a manifest may "
                                  f"({MAX_MANIFEST_BYTES:,})")
            raw = real.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {mpath}: {exc.strerror or exc}") from exc
        manifest = load_json(raw, str(mpath))
        info = parse_manifest(manifest)  # types, ranges, consistency: one BundleError naming the field
        check_links(path)  # an edgedec manifest: now the directory is worth walking
        bundle = cls(path, manifest, info, raw=raw)
        bundle._check_files(verify_hashes)
        bundle._check_nested()
        return bundle

    def _check_nested(self) -> None:
        """A draft model the manifest speculates with (``speculation.drafter = "model:REL"``) must be a
        bundle inside this one, among its hashed files: a manifest never makes the loader open another
        bundle elsewhere on disk. (A caller's own ``--spec model:PATH`` may point anywhere.)"""
        spec = self.manifest.get("speculation")
        drafter = spec.get("drafter") if isinstance(spec, dict) else None
        if isinstance(drafter, str) and "model:" in drafter:  # model:REL, or a combination ending in one
            self.nested_bundle(drafter.partition("model:")[2])

    def nested_bundle(self, rel: str) -> Path:
        """The directory of the draft bundle the manifest names as ``model:REL``: relative to this bundle,
        inside it after symbolic links, and with its ``manifest.json`` among this bundle's hashed files
        (so this manifest's hashes, and a signature over it, cover the draft)."""
        where = f"the manifest's speculation.drafter model:{rel}"
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{where} names a bundle outside this bundle's directory; a manifest may only name "
                              "a draft bundle inside it (model:draft); pass --spec model:PATH to use another")
        path = resolve_inside(self.path, rel)
        key = f"{PurePosixPath(rel).as_posix()}/{MANIFEST}"
        if not path.is_dir() or key not in self.manifest["files"]:
            raise BundleError(f"{where} is not a draft bundle among this bundle's hashed files "
                              f"({key} is not listed)")
        return path

    def _check_files(self, verify_hashes: bool) -> None:
        files = self.manifest["files"]
        if not isinstance(files, dict) or not files:
            raise BundleError("manifest lists no files")
        referenced = [self.manifest["tokenizer"].get("file")]
        for name, graph in self.manifest["graphs"].items():
            referenced += [graph.get("file"), *graph.get("data", [])]
        for ref in referenced:
            if ref not in files:
                raise BundleError(f"manifest refers to {ref!r}, which is not among its hashed files")
        for name, info in files.items():
            fpath = resolve_inside(self.path, name)
            if not isinstance(info, dict):
                raise BundleError(f"manifest file entry {name!r} must be an object with bytes and sha256")
            if not fpath.is_file():
                raise BundleError(f"bundle file {name} is missing")
            size = fpath.stat().st_size
            if size != info.get("bytes"):
                raise BundleError(f"bundle file {name} has {size} bytes, manifest says {info.get('bytes')} (truncated or modified)")
            if verify_hashes and sha256_file(fpath) != info.get("sha256"):
                raise BundleError(f"bundle file {name} does not match its sha256 in the manifest (corrupted or modified)")

    # convenience accessors -------------------------------------------------------------------
    @property
    def arch(self) -> dict:
        return self.manifest["architecture"]

    def graph(self, role: str) -> dict:
        for name, g in self.manifest["graphs"].items():
            if g.get("role") == role:
                return g
        raise BundleError(f"bundle has no graph with role {role!r}")

    def file(self, name: str) -> Path:
        """The path of the bundle file ``name``: one of the manifest's hashed files, inside the bundle
        (symbolic links followed). Anything else is refused, so a manifest cannot point the runtime at a
        file the hashes do not cover or outside the directory."""
        if not isinstance(name, str) or name not in self.manifest["files"]:
            raise BundleError(f"manifest refers to {name!r}, which is not among its hashed files")
        return resolve_inside(self.path, name)

    def size_bytes(self) -> int:
        return sum(info["bytes"] for info in self.manifest["files"].values()) + (self.path / MANIFEST).stat().st_size
