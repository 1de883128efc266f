"""The bundle manifest, typed and validated in one place (format version 1).

A bundle is untrusted input: :func:`parse_manifest` turns the parsed ``manifest.json`` into a
:class:`Manifest` (one frozen dataclass per section) or raises one :class:`BundleError` line that names
the field, e.g. ``manifest: kv_cache.layers[1].kv_dtype must be one of fp32, fp16, int8, int4, got {}``.

What is checked, before the runtime allocates or opens anything:

* types: every field the runtime reads has one JSON type (``true`` is not an integer, ``1.0`` is not the
  integer 1, numbers are finite); optional fields may be missing or ``null``; keys this edgedec does not
  know are allowed (they are informational) and ignored;
* ranges: positive layers, heads, head_dim, vocabulary and capacity, each under a bound
  (:data:`LIMITS`), and the KV cache the runtime would allocate under :data:`MAX_KV_BYTES`;
* consistency: the KV-cache section against the architecture, the decoder graph's declared inputs and
  outputs (ONNX Runtime bundles; :func:`check_session_io` then holds the loaded graph to them) or the
  TVM library's parameter table against the architecture, token ids against the vocabulary, the pass
  log's FFN-skip section against the layers, every file the manifest names among its hashed files.

The dataclasses are the single source of the format: ``python -m edgedec.runtime.manifest`` prints
the JSON Schema generated from them (``docs/bundle.schema.json``), ``--markdown`` the field tables of
``docs/bundle-format.md``; tests keep both in sync.
Torch-free: the standard library only (jinja2 for the chat template's syntax).
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from ..errors import BundleError

FORMAT = "edgedec-bundle"
FORMAT_VERSION = 1

# bounds on what a manifest may declare (far above any model edgedec compiles, far below what would
# exhaust a machine): checked before anything is allocated
LIMITS = {
    "layers": 1024,
    "heads": 1024,
    "head_dim": 1024,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "context": 1 << 22,  # tokens of KV cache a bundle may declare
    "file_bytes": 1 << 44,  # 16 TiB
    "draft_len": 64,
    "chunk": 4096,
}
MAX_KV_BYTES = 64 << 30  # the largest KV cache the runtime allocates (64 GiB)
MAX_MANIFEST_BYTES = 64 << 20  # manifest.json larger than this is refused unread
MAX_DEPTH = 64  # JSON nesting depth

# the KV layouts the runtime knows: kv_dtype -> storage dtype, bytes per stored element, elements per head_dim
KV_LAYOUTS = {"fp32": ("float32", 4, 1.0), "fp16": ("float16", 2, 1.0), "int8": ("int8", 1, 1.0),
              "int4": ("uint8", 1, 0.5)}
TVM_KV_DTYPES = ("float32", "float16")
PARAM_DTYPES = {"float32": 4, "uint32": 4, "float16": 2}  # TVM params.bin entries: dtype -> bytes
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}
DYNAMIC_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")  # what the runtime feeds
STATIC_INPUTS = ("input_ids", "position_ids", "attention_mask")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = object()


def spec(help: str, default: Any = _REQUIRED, *, min: float | None = None, max: float | None = None,
         choices: tuple | None = None, max_items: int | None = None, pattern: str | None = None):
    """A manifest field: its one-line description, default (none: required), and constraints."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "max_items": max_items, "pattern": pattern}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# the sections
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """The model's shape: what every buffer the runtime allocates is sized from."""

    num_layers: int = spec("transformer blocks", min=1, max=LIMITS["layers"])
    num_heads: int = spec("query heads per layer", min=1, max=LIMITS["heads"])
    num_kv_heads: int = spec("key/value heads per layer (divides num_heads)", min=1, max=LIMITS["heads"])
    head_dim: int = spec("channels per head (even: rotary pairs channels)", min=2, max=LIMITS["head_dim"])
    hidden_size: int = spec("width of the residual stream", min=1, max=LIMITS["hidden_size"])
    vocab_size: int = spec("tokens in the vocabulary (rows of logits)", min=1, max=LIMITS["vocab_size"])
    model_type: str | None = spec("source architecture, e.g. llama or qwen2 (informational)", None)
    intermediate_size: int | None = spec("FFN width (informational)", None, min=1, max=LIMITS["intermediate_size"])
    max_position_embeddings: int | None = spec("the source model's longest context (informational)", None, min=1)
    rms_norm_eps: float | None = spec("RMSNorm epsilon (informational)", None, min=0)
    rope_theta: float | None = spec("rotary base (informational)", None, min=0)
    tie_word_embeddings: bool | None = spec("head shares the embedding (informational)", None)
    attention_bias: bool | None = spec("q/k/v projections have biases (informational)", None)


@dataclass(frozen=True)
class Source:
    """Where the weights came from (informational)."""

    kind: str | None = spec("hf, gguf or registry", None)
    name: str | None = spec("model name", None)
    path: str | None = spec("path on the machine that compiled the bundle (never opened by the runtime)", None)
    sha256: str | None = spec("hash of the source weights", None)
    registry_name: str | None = spec("edgedec registry name, when compiled from one", None)
    weight_format: str | None = spec("tensor types of the source, e.g. float or F32,Q4_1", None)


@dataclass(frozen=True)
class LLVMTarget:
    """What a TVM library was compiled for (the runtime refuses a library built for another machine)."""

    mtriple: str = spec("target triple, e.g. x86_64-linux-gnu or aarch64-linux-gnu", "")
    mcpu: str = spec("CPU model, e.g. emeraldrapids or apple-m1", "")
    kind: str = spec("llvm", "llvm")


@dataclass(frozen=True)
class Target:
    """The compilation target and the runtime backend that runs the bundle."""

    name: str = spec("target name: cpu, cpu-tvm, arm64, gpu, npu")
    backend: str = spec("runtime backend: onnxruntime or tvm (this runtime refuses others at load)")
    execution_provider: str | None = spec("ONNX Runtime execution provider", None)
    fallback_execution_provider: str | None = spec("provider used when the first is unavailable (logged)", None)
    shapes: str | None = spec("static for fixed-shape graphs (npu)", None, choices=("static", "dynamic"))
    llvm_target: LLVMTarget | None = spec("TVM targets: the LLVM target the library was built for", None)


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as declared: ``shape`` holds integers (fixed) or names (dynamic)."""

    name: str = spec("tensor name, e.g. past_key.0")
    dtype: str = spec("numpy dtype name, e.g. float32, int64 (TVM: also shape)")
    shape: list[int | str] = spec("dimensions: an integer (fixed, >= 0) or a name (dynamic)", max_items=16)


@dataclass(frozen=True)
class Param:
    """One weight in a TVM bundle's params file."""

    name: str = spec("parameter name, e.g. layers.0.self_attn.q_proj.weight")
    shape: list[int] = spec("dimensions", max_items=8)
    dtype: str = spec("element type", choices=tuple(PARAM_DTYPES))
    offset: int = spec("byte offset in params_file", min=0, max=LIMITS["file_bytes"])
    bytes: int = spec("byte length: product(shape) * element size", min=0, max=LIMITS["file_bytes"])


@dataclass(frozen=True)
class Graph:
    """One runnable graph: an ONNX model (with external data files) or a TVM library (with a params file)."""

    role: str = spec("decoder (exactly one) or prefill (a static prefill chunk)")
    file: str = spec("the graph file, relative to the bundle")
    data: list[str] = spec("other files the graph reads (external weights)", [], max_items=4096)
    inputs: list[TensorInfo] = spec("declared inputs", [], max_items=1 << 14)
    outputs: list[TensorInfo] = spec("declared outputs", [], max_items=1 << 14)
    execution_provider: str = spec("ONNX Runtime execution provider", "CPUExecutionProvider")
    fallback_execution_provider: str | None = spec("provider used when the first is unavailable", None)
    shapes: str | None = spec("static: fixed chunk and cache (npu)", None, choices=("static", "dynamic"))
    chunk: int | None = spec("static graphs: tokens per call", None, min=1, max=LIMITS["chunk"])
    format: str | None = spec("tvm-relax-vm for a TVM library", None)
    params_file: str | None = spec("TVM: the raw weights file", None)
    params: list[Param] | None = spec("TVM: the weights in params_file, in call order", None, max_items=1 << 20)
    libraries: list[str] | None = spec("TVM: native libraries the graph loads", None, max_items=64)
    llvm_target: LLVMTarget | None = spec("TVM: the LLVM target (mtriple, mcpu)", None)
    cpu_flags: list[str] | None = spec("TVM: CPU features the library needs", None, max_items=256)


@dataclass(frozen=True)
class KVLayerLayout:
    """One layer's KV layout in a mixed-precision cache."""

    kv_dtype: str = spec("fp32, fp16, int8 or int4", choices=tuple(KV_LAYOUTS))
    dtype: str = spec("storage dtype: float32, float16, int8 or uint8 (int4: two per byte)",
                      choices=tuple(v[0] for v in KV_LAYOUTS.values()))
    row_elements: int | None = spec("stored elements per head row", None, min=1)


@dataclass(frozen=True)
class KeyRotation:
    """Stored keys are multiplied by a Hadamard matrix of order head_dim."""

    kind: str = spec("hadamard", choices=("hadamard",))
    order: int = spec("matrix order: head_dim (a power of two)", min=1, max=LIMITS["head_dim"])


@dataclass(frozen=True)
class KVQuantization:
    """Static scales of a quantized cache (int8/int4)."""

    bits: int | None = spec("8 or 4", None, choices=(4, 8))
    scales_file: str | None = spec("(layer, 2, kv_heads, head_dim) float32 LE scales; needed with a window", None)
    key_offsets_file: str | None = spec("(layer, kv_heads, head_dim) float32 LE key offsets (centred keys)", None)
    key_rotation: KeyRotation | None = spec("rotated keys", None)


@dataclass(frozen=True)
class KVWindow:
    """Sink + sliding window (StreamingLLM): the cache holds sinks + window slots."""

    sinks: int = spec("first tokens always kept", min=0, max=LIMITS["context"])
    window: int = spec("most recent tokens kept", min=1, max=LIMITS["context"])
    rotary_inv_freq: list[float] = spec("head_dim / 2 rotary inverse frequencies (re-rotating evicted keys)",
                                        max_items=LIMITS["head_dim"])
    evict_chunk: int = spec("tokens evicted at a time (1..window)", 1, min=1, max=LIMITS["context"])
    capacity: int | None = spec("sinks + window", None, min=1)


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache the runtime allocates: (layer, 2, 1, kv_heads, capacity, row) in the layout below."""

    max_capacity: int = spec("most tokens the cache may hold", min=1, max=LIMITS["context"])
    dtype: str = spec("storage dtype", "float32", choices=tuple(v[0] for v in KV_LAYOUTS.values()))
    kv_dtype: str = spec("layout: fp32, fp16, int8 or int4", "fp32", choices=tuple(KV_LAYOUTS))
    layout: str | None = spec("per_layer_bnsh (in place) or per_layer_bnsh_host (static graphs)", None)
    num_layers: int | None = spec("equals architecture.num_layers", None, min=1, max=LIMITS["layers"])
    kv_heads: int | None = spec("equals architecture.num_kv_heads", None, min=1, max=LIMITS["heads"])
    head_dim: int | None = spec("equals architecture.head_dim", None, min=1, max=LIMITS["head_dim"])
    in_place: bool | None = spec("present_* share past_*'s buffer", None)
    row_elements: int | None = spec("stored elements per head row", None, min=1)
    bytes_per_token: int | None = spec("KV bytes per token over all layers (informational)", None, min=0)
    quantization: KVQuantization | None = spec("quantized layouts: the static scales", None)
    window: KVWindow | None = spec("sink + sliding window", None)
    layers: list[KVLayerLayout] | None = spec("mixed precision: one layout per layer", None,
                                              max_items=LIMITS["layers"])
    static: bool | None = spec("static graphs: the host keeps the cache", None)


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer file and the special tokens."""

    file: str = spec("tokenizer.json (Hugging Face tokenizers format)")
    chat_template: str | None = spec("Jinja chat template, rendered in a bounded sandbox", None,
                                     max_items=1 << 20)
    bos_token: str | None = spec("beginning-of-sequence text", None, max_items=1024)
    eos_token: str | None = spec("end-of-sequence text", None, max_items=1024)
    bos_token_id: int | None = spec("in [0, vocab_size)", None, min=0)
    eos_token_ids: list[int] = spec("generation stops at these ids, each in [0, vocab_size)", [], max_items=1024)
    pad_token_id: int | None = spec("in [0, vocab_size)", None, min=0)


@dataclass(frozen=True)
class FfnSkipSection:
    """The ffn-skip pass's run-time settings (``passes[i].report.ffn_skip``)."""

    skippable: list[int] = spec("layers with a skip switch (ffn_skip.{layer} inputs)", max_items=LIMITS["layers"])
    mean_cos: list[float] = spec("calibrated saturation per layer (num_layers entries)", max_items=LIMITS["layers"])
    skip_per_token: int = spec("blocks skipped per lossy decode step", min=0)
    draft_skip_per_token: int = spec("blocks skipped per draft step", min=0)
    threshold: float = spec("saturation floor for skipping")
    warmup: int = spec("first decode steps that run every block", min=0, max=1 << 30)
    refresh: int = spec("every refresh-th step runs every block (0: never)", min=0, max=1 << 30)
    use: str = spec("fast (lossy decoding) or draft (drafter only)", choices=("fast", "draft"))
    num_layers: int = spec("equals architecture.num_layers", min=1, max=LIMITS["layers"])


@dataclass(frozen=True)
class PassEntry:
    """One entry of the pass log, in the order the passes ran."""

    name: str = spec("pass name (the JSON key is 'pass')")
    config: dict = spec("the pass's configuration", {})
    modified: bool = spec("the pass changed the graph", True)
    seconds: float = spec("time the pass took", 0.0, min=0)
    bytes_before: int = spec("graph bytes before", 0, min=0)
    bytes_after: int = spec("graph bytes after", 0, min=0)
    report: dict = spec("what the pass reports (ffn-skip: its run-time section under 'ffn_skip')", {})


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding by default."""

    drafter: str = spec("ngram, recycling, ngram+recycling, head, head+ngram or ffn-skip")
    draft_len: int = spec("tokens drafted per verification", 4, min=1, max=LIMITS["draft_len"])


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle: its size and hash, checked at load."""

    bytes: int = spec("size in bytes", min=0, max=LIMITS["file_bytes"])
    sha256: str = spec("lower-case hex sha256", pattern=_SHA256.pattern)


@dataclass(frozen=True)
class Verification:
    """How the compiled graph compared with the source model (informational)."""

    max_abs_logit_diff: float | None = spec("largest |logit difference|", None, min=0)
    tokens: int | None = spec("tokens compared", None, min=0)
    reference: str | None = spec("what it was compared with", None)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: a bundle's description; every other file of the bundle is listed in ``files``."""

    format: str = spec("always edgedec-bundle", choices=(FORMAT,))
    format_version: int = spec("the format version (an integer; this runtime reads 1)")
    source: Source = spec("where the weights came from")
    architecture: Architecture = spec("the model's shape")
    target: Target = spec("target and runtime backend")
    graphs: dict[str, Graph] = spec("the graphs by name; exactly one has role decoder", max_items=64)
    kv_cache: KVCacheSpec = spec("the KV cache")
    tokenizer: Tokenizer = spec("tokenizer and chat template")
    passes: list[PassEntry] = spec("the pass log", max_items=1024)
    files: dict[str, FileEntry] = spec("every file of the bundle but manifest.json, by relative path",
                                       max_items=1 << 16)
    speculation: Speculation | None = spec("the default drafter", None)
    verification: Verification | None = spec("the exported graph's check against the source", None)
    edgedec_version: str | None = spec("edgedec that wrote the bundle", None)
    created: str | None = spec("ISO 8601 time of compilation", None)

    def decoder(self) -> Graph:
        return next(g for g in self.graphs.values() if g.role == "decoder")

    def ffn_skip(self) -> FfnSkipSection | None:
        for i, p in enumerate(self.passes):
            if p.name == "ffn-skip":
                return _parse(FfnSkipSection, p.report.get("ffn_skip"), f"passes[{i}].report.ffn_skip")
        return None

    def cache_capacity(self) -> int:
        """Tokens the runtime's cache may be allocated for (the window's slots when windowed)."""
        w = self.kv_cache.window
        if w is not None:
            return w.sinks + w.window
        dec = self.decoder()
        if dec.shapes == "static":  # the host cache spans the graph's fixed cache, whatever the context
            cap = next((t.shape[2] for t in dec.inputs if t.name == "past_key.0" and len(t.shape) == 4), None)
            if isinstance(cap, int):
                return max(cap, self.kv_cache.max_capacity)
        return self.kv_cache.max_capacity

    def kv_bytes_per_token(self) -> int:
        """Bytes the KV cache takes per token over all layers, keys and values, as the runtime stores it."""
        a, kv = self.architecture, self.kv_cache
        kinds = [l.kv_dtype for l in kv.layers] if kv.layers else [kv.kv_dtype] * a.num_layers
        return sum(int(2 * a.num_kv_heads * a.head_dim * KV_LAYOUTS[k][2] * KV_LAYOUTS[k][1]) for k in kinds)


# ---------------------------------------------------------------------------------------------
# parsing: one generic walk over the dataclasses
# ---------------------------------------------------------------------------------------------
JSON_KEYS = {"name": "pass"}  # dataclass field -> JSON key where they differ (PassEntry.name is "pass")


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, problem: str, value: Any = MISSING) -> BundleError:
    got = "" if value is MISSING else f", got {_shown(value)}"
    return BundleError(f"manifest: {path} {problem}{got}")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else "")
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict or is_dataclass(tp):
        return "an object"
    return "a JSON value"


def _check_range(value, meta: dict, path: str):
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise _fail(path, f"must be >= {lo}", value)
    if hi is not None and value > hi:
        raise _fail(path, f"must be <= {hi:,}", value)
    return value


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name) else json.dumps(name)


def _parse(tp, value, path: str, meta: dict | None = None):
    """``value`` (parsed JSON) as type ``tp``, or a BundleError naming ``path``."""
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:  # int | str: the first JSON type that matches
            if _matches(a, value):
                return _parse(a, value, path, meta)
        raise _fail(path, f"must be {_describe(tp)}", value)
    if meta.get("choices") is not None:
        if not any(value == c and type(value) is type(c) for c in meta["choices"]):
            raise _fail(path, f"must be one of {', '.join(map(str, meta['choices']))}", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, "must be true or false", value)
        return value
    if tp is int:
        if type(value) is not int:
            raise _fail(path, "must be an integer", value)
        return _check_range(value, meta, path)
    if tp is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _fail(path, "must be a finite number", value)
        return _check_range(float(value), meta, path)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, "must be a string", value)
        if meta.get("max_items") is not None and len(value) > meta["max_items"]:
            raise _fail(path, f"must be at most {meta['max_items']:,} characters long")
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
            raise _fail(path, f"must match {meta['pattern']}", value)
        return value
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, "must be an object", value)
        if meta.get("max_items") is not None and len(value) > meta["max_items"]:
            raise _fail(path, f"must have at most {meta['max_items']:,} entries")
        if origin is None:
            return value
        return {k: _parse(args[1], v, f"{path}.{_key(k)}") for k, v in value.items()}
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise _fail(path, "must be a list", value)
        if meta.get("max_items") is not None and len(value) > meta["max_items"]:
            raise _fail(path, f"must have at most {meta['max_items']:,} entries")
        return [_parse(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(path, "must be an object", value)
        kwargs = {}
        hints = _hints(tp)
        for f in fields(tp):
            key = JSON_KEYS.get(f.name, f.name) if tp is PassEntry else f.name
            where = f"{path}.{key}" if path else key
            if key not in value:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise _fail(where, "is missing")
                continue
            kwargs[f.name] = _parse(hints[f.name], value[key], where, dict(f.metadata))
        return tp(**kwargs)
    raise TypeError(f"no parser for {tp!r}")  # a bug in this module


def _matches(tp, value) -> bool:
    if tp is int:
        return type(value) is int
    if tp is float:
        return type(value) in (int, float)
    if tp is str:
        return isinstance(value, str)
    if tp is bool:
        return isinstance(value, bool)
    if tp is dict or typing.get_origin(tp) is dict or is_dataclass(tp):
        return isinstance(value, dict)
    if tp is list or typing.get_origin(tp) is list:
        return isinstance(value, list)
    return True


_HINTS: dict = {}


def _hints(tp) -> dict:
    if tp not in _HINTS:
        _HINTS[tp] = typing.get_type_hints(tp)
    return _HINTS[tp]


# ---------------------------------------------------------------------------------------------
# reading and validating
# ---------------------------------------------------------------------------------------------
def load_json(text: str | bytes, where: str = "manifest.json") -> dict:
    """Parse manifest text: no duplicate keys, no NaN/Infinity, at most :data:`MAX_DEPTH` levels deep."""

    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise BundleError(f"{where} has the key {_shown(k)} twice in one object")
            out[k] = v
        return out

    def no_constants(name):
        raise BundleError(f"{where} is not valid JSON: {name} is not a JSON number")

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except RecursionError as exc:
        raise BundleError(f"{where} nests deeper than {MAX_DEPTH} levels") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:  # ValueError: an integer too long
        raise BundleError(f"{where} is not valid JSON: {exc}") from exc
    stack = [(data, 1)]
    while stack:  # iteratively: what the parser accepted may still be too deep to print or walk
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BundleError(f"{where} nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return data


def parse_manifest(data: Any) -> Manifest:
    """Validate a parsed manifest; return it typed or raise one BundleError naming the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"manifest.json is not an edgedec manifest (format is not {FORMAT!r})")
    version = data.get("format_version")
    if type(version) is not int:
        raise _fail("format_version", "must be an integer", version)
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not supported by this edgedec "
                          f"(it reads version {FORMAT_VERSION})")
    missing = [f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in data]
    if missing:
        raise BundleError(f"manifest is missing required keys: {', '.join(missing)}")
    m = _parse(Manifest, data, "")
    _check(m)
    return m


def _check(m: Manifest) -> None:
    """Cross-field consistency (types and ranges are already checked)."""
    a, kv = m.architecture, m.kv_cache
    if a.num_heads % a.num_kv_heads:
        raise _fail("architecture.num_kv_heads", f"must divide num_heads ({a.num_heads})", a.num_kv_heads)
    if a.head_dim % 2:
        raise _fail("architecture.head_dim", "must be even (rotary pairs channels)", a.head_dim)
    for key, want in (("num_layers", a.num_layers), ("kv_heads", a.num_kv_heads), ("head_dim", a.head_dim)):
        got = getattr(kv, key)
        if got is not None and got != want:
            arch_key = {"kv_heads": "num_kv_heads"}.get(key, key)
            raise _fail(f"kv_cache.{key}", f"must equal architecture.{arch_key} ({want})", got)
    roles = [g.role for g in m.graphs.values()]
    if roles.count("decoder") != 1:
        raise BundleError("bundle has no graph with role 'decoder'" if not roles.count("decoder") else
                          f"manifest: graphs has {roles.count('decoder')} graphs with role 'decoder'")
    for role in sorted(set(roles)):
        if roles.count(role) > 1:
            raise _fail("graphs", f"has {roles.count(role)} graphs with role {role!r}")
    _check_kv(m)
    _check_files_named(m)
    names = {id(g): n for n, g in m.graphs.items()}
    if m.target.backend == "tvm":
        g = m.decoder()
        _check_tvm(m, g, f"graphs.{_key(names[id(g)])}")
    elif m.target.backend == "onnxruntime":
        for name, g in m.graphs.items():
            _check_onnx_graph(m, g, f"graphs.{_key(name)}")
    t = m.tokenizer
    for key in ("bos_token_id", "pad_token_id"):
        if (v := getattr(t, key)) is not None and v >= a.vocab_size:
            raise _fail(f"tokenizer.{key}", f"must be < vocab_size ({a.vocab_size})", v)
    for i, v in enumerate(t.eos_token_ids):
        if v >= a.vocab_size:
            raise _fail(f"tokenizer.eos_token_ids[{i}]", f"must be < vocab_size ({a.vocab_size})", v)
    if t.chat_template is not None:
        from .text import check_template

        check_template(t.chat_template)
    if m.speculation is not None:
        from .drafters import is_drafter_name

        if not is_drafter_name(m.speculation.drafter):
            raise _fail("speculation.drafter", "is not a drafter this runtime knows", m.speculation.drafter)
    if (skip := m.ffn_skip()) is not None:
        i = next(i for i, p in enumerate(m.passes) if p.name == "ffn-skip")
        where = f"passes[{i}].report.ffn_skip"
        if skip.num_layers != a.num_layers:
            raise _fail(f"{where}.num_layers", f"must equal architecture.num_layers ({a.num_layers})", skip.num_layers)
        if len(skip.mean_cos) != a.num_layers:
            raise _fail(f"{where}.mean_cos", f"must have {a.num_layers} entries (one per layer), has {len(skip.mean_cos)}")
        if not skip.skippable or len(set(skip.skippable)) != len(skip.skippable) or \
                any(not 0 <= l < a.num_layers for l in skip.skippable):
            raise _fail(f"{where}.skippable", f"must be distinct layers in [0, {a.num_layers})", skip.skippable)
        for key in ("skip_per_token", "draft_skip_per_token"):
            if getattr(skip, key) > len(skip.skippable):
                raise _fail(f"{where}.{key}", f"must be <= {len(skip.skippable)} (the skippable layers)",
                            getattr(skip, key))


def _check_kv(m: Manifest) -> None:
    a, kv = m.architecture, m.kv_cache
    if KV_LAYOUTS[kv.kv_dtype][0] != kv.dtype and not kv.layers:
        raise _fail("kv_cache.dtype", f"must be {KV_LAYOUTS[kv.kv_dtype][0]} for kv_dtype {kv.kv_dtype}", kv.dtype)
    if kv.layers is not None:
        if len(kv.layers) != a.num_layers:
            raise _fail("kv_cache.layers", f"must have one entry per layer ({a.num_layers}), has {len(kv.layers)}")
        for i, layer in enumerate(kv.layers):
            if KV_LAYOUTS[layer.kv_dtype][0] != layer.dtype:
                raise _fail(f"kv_cache.layers[{i}].dtype",
                            f"must be {KV_LAYOUTS[layer.kv_dtype][0]} for kv_dtype {layer.kv_dtype}", layer.dtype)
    kinds = {l.kv_dtype for l in kv.layers} if kv.layers else {kv.kv_dtype}
    if "int4" in kinds and a.head_dim % 4:
        raise _fail("architecture.head_dim", "must be a multiple of 4 for an int4 cache", a.head_dim)
    quant = kv.quantization
    if kv.window is not None:
        w = kv.window
        if len(w.rotary_inv_freq) != a.head_dim // 2:
            raise _fail("kv_cache.window.rotary_inv_freq", f"must have head_dim / 2 = {a.head_dim // 2} entries, "
                                                           f"has {len(w.rotary_inv_freq)}")
        if w.evict_chunk > w.window:
            raise _fail("kv_cache.window.evict_chunk", f"must be <= window ({w.window})", w.evict_chunk)
        if w.sinks + w.window > kv.max_capacity:
            raise _fail("kv_cache.window", f"sinks + window must be <= max_capacity ({kv.max_capacity})",
                        w.sinks + w.window)
        if w.capacity is not None and w.capacity != w.sinks + w.window:
            raise _fail("kv_cache.window.capacity", f"must equal sinks + window ({w.sinks + w.window})", w.capacity)
        if kinds & {"int8", "int4"} and (quant is None or quant.scales_file is None):
            raise _fail("kv_cache.quantization.scales_file", "is missing: a quantized windowed cache needs its scales")
    if quant is not None and quant.key_rotation is not None:
        if quant.key_rotation.order != a.head_dim or a.head_dim & (a.head_dim - 1):
            raise _fail("kv_cache.quantization.key_rotation.order",
                        f"must equal head_dim ({a.head_dim}), a power of two", quant.key_rotation.order)
    if m.target.backend == "tvm" and kv.dtype not in TVM_KV_DTYPES:
        raise _fail("kv_cache.dtype", f"must be one of {', '.join(TVM_KV_DTYPES)} on the tvm backend", kv.dtype)
    capacity = m.cache_capacity()
    nbytes = m.kv_bytes_per_token() * capacity
    if nbytes > MAX_KV_BYTES:
        raise BundleError(f"manifest: the KV cache would take {nbytes / 2**30:,.1f} GiB for {capacity:,} tokens, "
                          f"above the runtime's limit of {MAX_KV_BYTES >> 30} GiB (architecture or "
                          "kv_cache.max_capacity too large)")


def _referenced(m: Manifest) -> list[tuple[str, str]]:
    """(field path, file name) of every file the manifest tells the runtime to read."""
    out = [("tokenizer.file", m.tokenizer.file)]
    for name, g in m.graphs.items():
        p = f"graphs.{_key(name)}"
        out.append((f"{p}.file", g.file))
        out += [(f"{p}.data[{i}]", d) for i, d in enumerate(g.data)]
        if g.params_file is not None:
            out.append((f"{p}.params_file", g.params_file))
        out += [(f"{p}.libraries[{i}]", d) for i, d in enumerate(g.libraries or [])]
    q = m.kv_cache.quantization
    if q is not None:
        for key in ("scales_file", "key_offsets_file"):
            if getattr(q, key) is not None:
                out.append((f"kv_cache.quantization.{key}", getattr(q, key)))
    return out


def _check_files_named(m: Manifest) -> None:
    if not m.files:
        raise BundleError("manifest lists no files")
    for where, name in _referenced(m):
        if name not in m.files:
            raise BundleError(f"manifest refers to {name!r}, which is not among its hashed files ({where})")


def _layer_rows(m: Manifest) -> list[tuple[str, int]]:
    """(storage dtype, row elements) of each layer's cache."""
    a, kv = m.architecture, m.kv_cache
    kinds = [l.kv_dtype for l in kv.layers] if kv.layers else [kv.kv_dtype] * a.num_layers
    return [(KV_LAYOUTS[k][0], int(a.head_dim * KV_LAYOUTS[k][2])) for k in kinds]


def _check_onnx_graph(m: Manifest, g: Graph, path: str) -> None:
    """An ONNX graph's declared inputs and outputs against the architecture and the KV layout."""
    a, kv = m.architecture, m.kv_cache
    static = g.shapes == "static"
    inputs = {t.name: (i, t) for i, t in enumerate(g.inputs)}
    outputs = {t.name: (i, t) for i, t in enumerate(g.outputs)}
    if len(inputs) != len(g.inputs) or len(outputs) != len(g.outputs):
        raise _fail(f"{path}", "declares an input or output name twice")
    if "logits" not in outputs:
        raise _fail(f"{path}.outputs", "must declare logits")
    i, logits = outputs["logits"]
    if not logits.shape or (isinstance(logits.shape[-1], int) and logits.shape[-1] != a.vocab_size):
        raise _fail(f"{path}.outputs[{i}].shape", f"must end in vocab_size ({a.vocab_size})", logits.shape)
    rows = _layer_rows(m)
    out_names = ("new_key", "new_value") if static else ("present_key", "present_value")
    for kind, names in ((inputs, ("past_key", "past_value")), (outputs, out_names)):
        for base in names:
            layers = sorted(int(n.rsplit(".", 1)[1]) for n in kind
                            if n.startswith(base + ".") and n.rsplit(".", 1)[1].isdigit())
            if layers != list(range(a.num_layers)):
                where = "inputs" if kind is inputs else "outputs"
                raise _fail(f"{path}.{where}", f"declare {base}.0 .. {base}.{len(layers) - 1} for {len(layers)} "
                                               f"layers; architecture.num_layers is {a.num_layers}")
    fed = set(STATIC_INPUTS if static else DYNAMIC_INPUTS)
    fed |= {f"{kind}.{l}" for kind in ("past_key", "past_value") for l in range(a.num_layers)}
    skip = m.ffn_skip()
    fed |= {f"ffn_skip.{l}" for l in (skip.skippable if skip is not None and not static else [])}
    for name, (i, _) in inputs.items():
        if name not in fed:
            raise _fail(f"{path}.inputs[{i}]", "is an input this runtime does not feed", name)
    for l, (dtype, row) in enumerate(rows):
        for base in ("past_key", "past_value"):
            i, t = inputs[f"{base}.{l}"]
            where = f"{path}.inputs[{i}]"
            if static:
                dtype, row = "float32", a.head_dim  # the host cache of a static graph is float32
            if t.dtype != dtype:
                raise _fail(f"{where}.dtype", f"must be {dtype}, the kv_cache layout of layer {l}", t.dtype)
            if len(t.shape) != 4:
                raise _fail(f"{where}.shape", "must have 4 dimensions (batch, kv_heads, capacity, row)", t.shape)
            for d, want, what in ((0, 1, "batch"), (1, a.num_kv_heads, "num_kv_heads"), (3, row, "the row length")):
                if isinstance(t.shape[d], int) and t.shape[d] != want:
                    raise _fail(f"{where}.shape[{d}]", f"must be {want} ({what})", t.shape[d])
            if static:
                cap = t.shape[2]
                if not isinstance(cap, int) or cap < kv.max_capacity:
                    raise _fail(f"{where}.shape[2]", f"must be a fixed cache of at least kv_cache.max_capacity "
                                                     f"({kv.max_capacity}) positions", cap)


def _check_tvm(m: Manifest, g: Graph, path: str) -> None:
    """A TVM library's parameter table against the architecture and its params file."""
    a = m.architecture
    if g.format != "tvm-relax-vm":
        raise _fail(f"{path}.format", "must be tvm-relax-vm on the tvm backend", g.format)
    if g.params_file is None or g.params is None:
        raise _fail(path, "must name params_file and list params on the tvm backend")
    size = m.files[g.params_file].bytes
    layers = set()
    by_name = {}
    for i, p in enumerate(g.params):
        where = f"{path}.params[{i}]"
        if math.prod(p.shape) * PARAM_DTYPES[p.dtype] != p.bytes:
            raise _fail(f"{where}.bytes", f"must be product(shape) * {PARAM_DTYPES[p.dtype]} "
                                          f"({math.prod(p.shape) * PARAM_DTYPES[p.dtype]:,})", p.bytes)
        if p.offset + p.bytes > size:
            raise _fail(f"{where}", f"ends at byte {p.offset + p.bytes:,}, past the end of {g.params_file} ({size:,})")
        if (mt := re.match(r"layers\.(\d+)\.", p.name)) is not None:
            layers.add(int(mt.group(1)))
        by_name[p.name] = (where, p)
    if layers != set(range(a.num_layers)):
        raise _fail(f"{path}.params", f"hold layers {_ranges(layers)}; architecture.num_layers is {a.num_layers}")
    checks = (("embed_tokens.weight", 0, 1, a.vocab_size, "vocab_size"),
              ("rope.cos", 1, 2, a.head_dim, "head_dim"),
              ("layers.0.self_attn.k_proj.weight", 0, 1, a.num_kv_heads * a.head_dim, "num_kv_heads * head_dim"),
              ("layers.0.self_attn.k_proj.weight.words", 0, None, a.num_kv_heads * a.head_dim,
               "num_kv_heads * head_dim"))
    for name, dim, scale, want, what in checks:
        if name not in by_name:
            continue
        where, p = by_name[name]
        if len(p.shape) <= dim:
            raise _fail(f"{where}.shape", f"has too few dimensions for {name}", p.shape)
        got = p.shape[dim] * (scale if scale is not None else p.shape[-1])
        if got != want:
            raise _fail(f"{where}.shape", f"does not fit architecture.{what} = {want}", p.shape)
    if "rope.cos" in by_name and by_name["rope.cos"][1].shape[0] < m.kv_cache.max_capacity:
        where, p = by_name["rope.cos"]
        raise _fail(f"{where}.shape[0]", f"must cover kv_cache.max_capacity ({m.kv_cache.max_capacity}) positions",
                    p.shape[0])


def _ranges(values: set[int]) -> str:
    if not values:
        return "none"
    s = sorted(values)
    return f"{s[0]}..{s[-1]}" if s == list(range(s[0], s[-1] + 1)) else ", ".join(map(str, s[:8]))


def check_session_io(graph: dict, session, file: str) -> None:
    """Hold a loaded ONNX Runtime session to the graph's declared inputs and outputs: every declared
    tensor exists with its dtype and fixed dimensions, and the graph has no input that is not declared."""
    declared_in = {t["name"]: t for t in graph.get("inputs", [])}
    declared_out = {t["name"]: t for t in graph.get("outputs", [])}
    real_in = {i.name: i for i in session.get_inputs()}
    real_out = {o.name: o for o in session.get_outputs()}
    extra = sorted(set(real_in) - set(declared_in))
    if extra:
        raise BundleError(f"{file} has inputs the manifest does not declare: {', '.join(extra[:5])}")
    for kind, declared, real in (("input", declared_in, real_in), ("output", declared_out, real_out)):
        for name, t in declared.items():
            if name not in real:
                raise BundleError(f"the manifest declares {kind} {name!r}, which {file} does not have")
            r = real[name]
            dtype = ORT_DTYPES.get(r.type, r.type)
            if dtype != t["dtype"]:
                raise BundleError(f"{file}'s {kind} {name} is {dtype}; the manifest declares {t['dtype']}")
            shape = list(r.shape)
            if len(shape) != len(t["shape"]) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                                    for x, y in zip(shape, t["shape"])):
                raise BundleError(f"{file}'s {kind} {name} has shape {shape}; the manifest declares {t['shape']}")


# ---------------------------------------------------------------------------------------------
# JSON Schema, generated from the dataclasses
# ---------------------------------------------------------------------------------------------
def _schema(tp, meta: dict | None = None) -> dict:
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_schema(a, meta) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    out: dict = {}
    if tp is int:
        out = {"type": "integer"}
    elif tp is float:
        out = {"type": "number"}
    elif tp is str:
        out = {"type": "string"}
        if meta.get("max_items") is not None:
            out["maxLength"] = meta["max_items"]
        if meta.get("pattern"):
            out["pattern"] = meta["pattern"]
    elif tp is bool:
        out = {"type": "boolean"}
    elif tp is dict or origin is dict:
        out = {"type": "object"}
        if origin is dict:
            out["additionalProperties"] = _schema(args[1])
        if meta.get("max_items") is not None:
            out["maxProperties"] = meta["max_items"]
    elif tp is list or origin is list:
        out = {"type": "array", "items": _schema(args[0]) if args else {}}
        if meta.get("max_items") is not None:
            out["maxItems"] = meta["max_items"]
    elif is_dataclass(tp):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if meta.get("min") is not None:
        out["minimum"] = meta["min"]
    if meta.get("max") is not None:
        out["maximum"] = meta["max"]
    if meta.get("choices") is not None:
        out = {"enum": list(meta["choices"])}
    return out


def _sections(tp, seen: dict) -> None:
    if tp.__name__ in seen:
        return
    hints = _hints(tp)
    props, required = {}, []
    seen[tp.__name__] = None
    for f in fields(tp):
        key = JSON_KEYS.get(f.name, f.name) if tp is PassEntry else f.name
        prop = _schema(hints[f.name], dict(f.metadata))
        if "$ref" in prop:
            prop = {"allOf": [prop]}
        prop["description"] = f.metadata.get("help", "")
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(key)
        else:
            prop["default"] = f.default if f.default is not MISSING else f.default_factory()
        props[key] = prop
        for t in _dataclasses_in(hints[f.name]):
            _sections(t, seen)
    seen[tp.__name__] = {"type": "object", "description": (tp.__doc__ or "").strip(), "properties": props,
                         "required": required, "additionalProperties": True}


def _dataclasses_in(tp) -> list:
    if is_dataclass(tp):
        return [tp]
    return [d for a in typing.get_args(tp) for d in _dataclasses_in(a)]


def json_schema() -> dict:
    """The JSON Schema (2020-12) of manifest.json, generated from the dataclasses of this module.

    It states types, required keys and ranges; the cross-field rules (graph shapes against the
    architecture, the KV-cache size limit, ...) are in docs/bundle-format.md and in :func:`parse_manifest`."""
    defs: dict = {}
    _sections(Manifest, defs)
    _sections(FfnSkipSection, defs)
    root = defs.pop("Manifest")
    root["properties"]["format_version"]["const"] = FORMAT_VERSION
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"edgedec bundle manifest, format version {FORMAT_VERSION}", **root,
            "$defs": dict(sorted(defs.items()))}


def fields_markdown() -> str:
    """The manifest's fields as Markdown tables, one per section (docs/bundle-format.md holds them)."""
    sections: list = []

    def collect(tp):
        if is_dataclass(tp) and tp not in sections:
            sections.append(tp)
            for f in fields(tp):
                for t in _dataclasses_in(_hints(tp)[f.name]):
                    collect(t)

    collect(Manifest)
    collect(FfnSkipSection)
    out = []
    for tp in sections:
        out += [f"#### {tp.__name__}", "", (tp.__doc__ or "").strip(), "",
                "| field | type | required / default | constraint | meaning |", "|---|---|---|---|---|"]
        for f in fields(tp):
            key = JSON_KEYS.get(f.name, f.name) if tp is PassEntry else f.name
            meta = f.metadata
            kind = _type_name(_hints(tp)[f.name])
            if f.default is MISSING and f.default_factory is MISSING:
                req = "required"
            else:
                req = json.dumps(f.default if f.default is not MISSING else f.default_factory())
            rules = []
            if meta.get("choices"):
                rules.append("one of " + ", ".join(map(str, meta["choices"])))
            if meta.get("min") is not None:
                rules.append(f">= {meta['min']}")
            if meta.get("max") is not None:
                rules.append(f"<= {meta['max']:,}")
            if meta.get("max_items") is not None:
                rules.append(f"at most {meta['max_items']:,} " + ("characters" if "str" in kind and "list" not in kind
                                                                  else "entries"))
            if meta.get("pattern"):
                rules.append(f"matches `{meta['pattern']}`")
            out.append(f"| `{key}` | {kind} | {req} | {'; '.join(rules)} | {meta.get('help', '')} |")
        out.append("")
    return "\n".join(out)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) if a is not type(None) else "null" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"object of {_type_name(args[1])}"
    if is_dataclass(tp):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object"}.get(tp, "any")


if __name__ == "__main__":
    sys.stdout.write(fields_markdown() if "--markdown" in sys.argv[1:] else json.dumps(json_schema(), indent=2) + "\n")
