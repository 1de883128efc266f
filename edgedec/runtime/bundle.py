"""Bundle format version 1: a directory with ``manifest.json`` (plain JSON) and the files it lists.

Torch-free. ``Bundle.open`` validates before anything runs: the format version, the required keys,
that every listed file exists with the recorded size and sha256, and that every graph and tokenizer
the manifest refers to is among the hashed files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError

FORMAT = "edgedec-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "format_version", "source", "architecture", "target", "graphs", "kv_cache",
                 "tokenizer", "passes", "files")
ARCH_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle directory")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath} is not an edgedec manifest (format is not {FORMAT!r})")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this edgedec (it reads version {FORMAT_VERSION})"
            )
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise BundleError(f"manifest is missing required keys: {', '.join(missing)}")
        for key in ("architecture", "target", "graphs", "kv_cache", "tokenizer"):
            if not isinstance(manifest[key], dict):
                raise BundleError(f"manifest {key!r} must be an object, got {type(manifest[key]).__name__}")
        missing = [k for k in ARCH_KEYS if not isinstance(manifest["architecture"].get(k), int)]
        if missing:
            raise BundleError(f"manifest architecture is missing or has non-integer: {', '.join(missing)}")
        for name, graph in manifest["graphs"].items():
            if not isinstance(graph, dict):
                raise BundleError(f"manifest graph {name!r} must be an object, got {type(graph).__name__}")
            if not isinstance(graph.get("file"), str):
                raise BundleError(f"manifest graph {name!r} has no 'file'")
        capacity = manifest["kv_cache"].get("max_capacity")
        if not isinstance(capacity, int) or capacity < 1:
            raise BundleError(f"manifest kv_cache.max_capacity must be a positive integer, got {capacity!r}")
        bundle = cls(path, manifest)
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
