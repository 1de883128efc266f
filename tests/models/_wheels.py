"""Local wheels for pull tests: real wheel files (zip + METADATA + WHEEL + RECORD) that pip installs from a
directory (``--no-index --find-links DIR``) or from a tiny HTTP server, so no test needs the network."""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(wheelhouse: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """Write ``<dist>-<version>-py3-none-any.whl`` holding ``files`` (paths inside the wheel) into ``wheelhouse``."""
    dist = re.sub(r"[-_.]+", "_", package)
    info = f"{dist}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgedec-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    entries = {**files, **meta}
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in entries.items())
    record += f"{info}/RECORD,,\n"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    path = wheelhouse / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return path


def make_part_wheels(wheelhouse: Path, entry, chunks: list[bytes]) -> None:
    """One wheel per part of ``entry`` (a RegistryEntry), part i holding ``chunks[i]`` at its registry path."""
    for part, chunk in zip(entry.parts, chunks):
        module = part.path.split("/")[0]
        make_wheel(wheelhouse, part.package, part.version, {f"{module}/__init__.py": b"", part.path: chunk})


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
