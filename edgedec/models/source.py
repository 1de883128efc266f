"""Model sources: a Hugging Face directory, a GGUF file, or a registry name, loaded into one canonical form."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError, UnsupportedError
from ..runtime.bundle import sha256_file
from . import registry
from .arch import SUPPORTED_MODEL_TYPES, ArchFacts

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


@dataclass
class SourceInfo:
    kind: str  # "hf" | "gguf"
    path: str
    name: str
    sha256: str
    registry_name: str | None = None
    weight_format: str = "float"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LoadedModel:
    model: object  # transformers *ForCausalLM, float32, eval mode
    arch: ArchFacts
    tokenizer_json: str  # tokenizers' serialized fast tokenizer
    chat_template: str | None
    special_tokens: dict  # bos_token, eos_token, bos_token_id, eos_token_ids, pad_token_id
    source: SourceInfo
    extras: dict = field(default_factory=dict)


def resolve(spec: str | None) -> tuple[str, Path, str | None]:
    """Return (kind, path, registry_name) for a model argument; ``None`` means the embedded default."""
    if spec is None:
        spec = registry.DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return "hf", path, None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is not a model: expected a Hugging Face directory or a .gguf file")
        return "gguf", path, None
    entry = registry.lookup(spec)
    if entry is None:
        known = ", ".join(e.name for e in registry.REGISTRY.values())
        raise ModelError(f"no such file, directory or registry model: {spec!r} (known models: {known})")
    local = registry.local_path(entry)
    if local is None:
        log.info("%s is not in the cache (%s); pulling it", entry.name, registry.cache_dir())
        local = registry.pull(entry.name)
    return "gguf", local, entry.name


def _special_tokens(tok) -> dict:
    eos = tok.eos_token_id
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "pad_token_id": tok.pad_token_id,
    }


def _check_gguf(path: Path) -> tuple[str, str]:
    """Read the GGUF header with the gguf package; return (architecture, tensor types); raise ModelError if corrupt."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode()
    except Exception as exc:  # the gguf reader raises ValueError, KeyError, struct errors, ...
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedError(
            f"GGUF architecture {arch!r} is not supported; edgedec supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    types = {t.tensor_type.name for t in reader.tensors}
    return arch, ",".join(sorted(types))


def load(spec: str | None) -> LoadedModel:
    """Load a model source into float32 torch weights + tokenizer + architecture facts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, path, registry_name = resolve(spec)
    weight_format = "float"
    if kind == "gguf":
        _, weight_format = _check_gguf(path)
        directory, kwargs = path.parent, {"gguf_file": path.name}
    else:
        directory, kwargs = path, {}
        if not (path / "tokenizer.json").is_file():
            raise ModelError(f"{path} has no tokenizer.json (edgedec needs a fast tokenizer)")
    try:
        config = AutoConfig.from_pretrained(directory, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot read the model configuration of {path}: {exc}") from exc
    arch = ArchFacts.from_hf_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as exc:
        what = "the tokenizer" if kind == "gguf" else "tokenizer.json"
        raise ModelError(f"cannot read {what} of {path} (corrupt?): {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the weights of {path}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    if kind == "hf":
        tokenizer_json = (path / "tokenizer.json").read_text()
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        digest = hashlib.sha256()
        for f in [path / "config.json", *files]:
            digest.update(sha256_file(f).encode())
        sha = digest.hexdigest()
    else:
        tokenizer_json = tokenizer.backend_tokenizer.to_str()
        sha = sha256_file(path)
    source = SourceInfo(
        kind=kind, path=str(path.resolve()), name=registry_name or path.name, sha256=sha,
        registry_name=registry_name, weight_format=weight_format,
    )
    return LoadedModel(
        model=model,
        arch=arch,
        tokenizer_json=tokenizer_json,
        chat_template=getattr(tokenizer, "chat_template", None),
        special_tokens=_special_tokens(tokenizer),
        source=source,
    )
