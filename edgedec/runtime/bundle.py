"""Bundle format version 1: a directory with ``manifest.json`` (plain JSON) and the files it lists.

Torch-free. ``Bundle.open`` validates before anything runs: the manifest as a whole (types, ranges and
cross-field consistency, :mod:`edgedec.runtime.manifest`), that every listed file exists with the
recorded size and sha256, and that every graph and tokenizer the manifest refers to is among the
hashed files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from .manifest import FORMAT, FORMAT_VERSION, MAX_MANIFEST_BYTES, Manifest, load_json, parse_manifest

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict  # the parsed JSON, as written
    info: Manifest | None = None  # the same, typed and validated (Bundle.open sets it)

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle directory")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
        try:
            size = mpath.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{mpath} has {size:,} bytes, more than a manifest may ({MAX_MANIFEST_BYTES:,})")
            text = mpath.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {mpath}: {exc.strerror or exc}") from exc
        manifest = load_json(text, str(mpath))
        info = parse_manifest(manifest)  # types, ranges, consistency: one BundleError naming the field
        bundle = cls(path, manifest, info)
        bundle._check_files(verify_hashes)
        return bundle

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
            fpath = self.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise BundleError(f"manifest file entry {name!r} points outside the bundle")
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
        return self.path / name

    def size_bytes(self) -> int:
        return sum(info["bytes"] for info in self.manifest["files"].values()) + (self.path / MANIFEST).stat().st_size
