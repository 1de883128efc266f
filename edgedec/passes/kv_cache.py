"""Pass ``kv-cache``: the KV-cache layout of the decoder graph (``edgedec compile --kv``).

Layouts (every one is ``(1, kv_heads, capacity, row)`` per layer and per K/V, BNSH, bound in place):

* ``fp32``  float32 rows of ``head_dim`` (the exported graph; the pass changes nothing);
* ``fp16``  float16 rows of ``head_dim``;
* ``int8``  int8 rows of ``head_dim``: ``q = clamp(round(x / scale), -128, 127)``, ``x ~ q * scale``;
* ``int4``  uint8 rows of ``head_dim / 2``, two values per byte, element ``2i`` in the low nibble:
  ``q = clamp(round(x / scale), -8, 7) + 8``, ``x ~ (q - 8) * scale``.

The quantized layouts use ONNX Runtime's own quantized cache in ``com.microsoft.GroupQueryAttention``
(``k_quant_type``/``v_quant_type``, ``kv_cache_bit_width``, ``k_scale``/``v_scale`` inputs): the kernel
quantizes new keys and values as it writes them and dequantizes inside attention. Its scales are static,
so this pass calibrates them: it runs the graph it is given (float cache) on calibration text and
records, per layer, the range of what the kernel stores. Keys are stored *after* rotary embedding, so
a key channel's range depends on the positions seen; with ``k_range=pair`` the range of channels ``i``
and ``i + head_dim/2`` (the pair rotary rotates together) is the largest norm of the pair, which bounds
the channel at every position (rotation keeps the norm), at the cost of up to sqrt(2) in resolution.
``k_range=observed`` takes each channel's absmax at the calibrated positions instead: finer steps, but
keys at positions the calibration did not reach may clip. ``auto`` (default) uses pair ranges for int8
and observed ranges for int4, where resolution dominates (SmolLM2, int4 cache, 2,048 held-out tokens:
perplexity ratio 1.17 observed vs 1.36 pair).

Per-token scales (KIVI's choice for values) and a float window of recent tokens are not in the kernel;
per-channel static scales are what it offers. Scale tensors are float32 initializers
``kv_scale.key.{layer}`` / ``kv_scale.value.{layer}`` shaped ``(1, kv_heads, 1, head_dim)`` (per channel)
or ``(1,)`` (per tensor).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option

log = logging.getLogger(__name__)

KV_DTYPES = ("fp32", "fp16", "int8", "int4")
SCALE_LAYOUTS = ("per_channel", "per_tensor")
K_RANGES = ("auto", "pair", "observed")
CLIPS = ("auto", "mse", "none")
CLIP_RATIOS = np.linspace(1.0, 0.3, 15)  # candidate fractions of the calibrated range (clip=mse)
# logical dtype -> (storage dtype name, ONNX elem type, elements per head_dim row divisor, bytes per element)
STORAGE = {
    "fp32": ("float32", onnx.TensorProto.FLOAT, 1, 4),
    "fp16": ("float16", onnx.TensorProto.FLOAT16, 1, 2),
    "int8": ("int8", onnx.TensorProto.INT8, 1, 1),
    "int4": ("uint8", onnx.TensorProto.UINT8, 2, 1),
}
QMAX = {"int8": 127, "int4": 7}
SCALE_INPUTS = (12, 13)  # GroupQueryAttention inputs k_scale, v_scale


def row_elements(dtype: str, head_dim: int) -> int:
    """Elements per (token, kv head) row of the cache buffer in layout ``dtype``."""
    return head_dim // STORAGE[dtype][2]


def bytes_per_token(dtype: str, num_layers: int, kv_heads: int, head_dim: int) -> int:
    """Cache bytes one token occupies over all layers, keys and values."""
    return num_layers * 2 * kv_heads * row_elements(dtype, head_dim) * STORAGE[dtype][3]


def quantize(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """What the kernel stores for ``x`` (..., head_dim): int8, or packed uint8 for int4."""
    q = np.rint(x / scale)
    if dtype == "int8":
        return np.clip(q, -128, 127).astype(np.int8)
    q = (np.clip(q, -8, 7) + 8).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of :func:`quantize` (float32)."""
    if dtype == "int8":
        return q.astype(np.float32) * scale
    lo, hi = (q & 15).astype(np.float32) - 8, (q >> 4).astype(np.float32) - 8
    x = np.empty(q.shape[:-1] + (q.shape[-1] * 2,), np.float32)
    x[..., 0::2], x[..., 1::2] = lo, hi
    return x * scale


@dataclass(frozen=True)
class KvCacheConfig(PassConfig):
    dtype: str = option("fp32", "cache layout: fp32, fp16, int8 or int4 (packed two per byte)")
    k_scale: str = option("per_channel", "key scales (int8/int4): per_channel (one per kv head and channel) "
                                         "or per_tensor (one per layer)")
    v_scale: str = option("per_channel", "value scales (int8/int4): per_channel or per_tensor")
    k_range: str = option("auto", "key ranges: pair (norm of each rotary channel pair, valid at any position), "
                                  "observed (per-channel absmax at the calibrated positions), or auto (pair for "
                                  "int8, observed for int4)")
    headroom: float = option(1.0, "multiply calibrated ranges by this before choosing scales (values beyond "
                                  "the range are clipped)")
    clip: str = option("auto", "shrink each range to the clip that minimises the squared error on the calibration "
                               "cache: mse, none, or auto (mse for int4, none for int8)")
    calibration_text: str = option("", "UTF-8 text file to calibrate on (default: prose from Python's "
                                       "pydoc_data.topics)")
    samples: int = option(2, "calibration sequences")
    sequence_length: int = option(1024, "tokens per calibration sequence")

    def validate(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"kv-cache.dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        for name in ("k_scale", "v_scale"):
            if getattr(self, name) not in SCALE_LAYOUTS:
                raise ConfigError(f"kv-cache.{name} must be one of {', '.join(SCALE_LAYOUTS)}, "
                                  f"got {getattr(self, name)!r}")
        if self.k_range not in K_RANGES:
            raise ConfigError(f"kv-cache.k_range must be one of {', '.join(K_RANGES)}, got {self.k_range!r}")
        if self.clip not in CLIPS:
            raise ConfigError(f"kv-cache.clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")
        if not 0.25 <= self.headroom <= 4.0:
            raise ConfigError(f"kv-cache.headroom must be in [0.25, 4], got {self.headroom}")
        if self.calibration_text and not Path(self.calibration_text).expanduser().is_file():
            raise ConfigError(f"kv-cache.calibration_text: no such file: {self.calibration_text}")
        if self.samples < 1:
            raise ConfigError(f"kv-cache.samples must be >= 1, got {self.samples}")
        if not 16 <= self.sequence_length <= 8192:
            raise ConfigError(f"kv-cache.sequence_length must be in 16..8192, got {self.sequence_length}")


def _attention_nodes(model: onnx.ModelProto) -> dict[int, onnx.NodeProto]:
    """layer -> its GroupQueryAttention node, read from the past_key.{layer} input it takes."""
    nodes = {}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and len(node.input) > 4:
            name = node.input[3]
            if name.startswith("past_key.") and name[len("past_key."):].isdigit():
                nodes[int(name[len("past_key."):])] = node
    return nodes


class KvCachePass(Pass):
    name = "kv-cache"
    config_class = KvCacheConfig

    def requires(self, model: onnx.ModelProto) -> None:
        nodes = _attention_nodes(model)
        if not nodes:
            raise PassError("kv-cache found no com.microsoft.GroupQueryAttention node reading a graph input "
                            "past_key.{layer}")
        graph_inputs = {v.name for v in model.graph.input}
        outputs = {v.name for v in model.graph.output}
        for l, node in nodes.items():
            want = (f"past_value.{l}", f"present_key.{l}", f"present_value.{l}")
            have = (node.input[4], node.output[1] if len(node.output) > 1 else "",
                    node.output[2] if len(node.output) > 2 else "")
            if have != want or node.input[4] not in graph_inputs or not set(have[1:]) <= outputs:
                raise PassError(f"kv-cache: the attention node of layer {l} does not read/write "
                                f"{', '.join(want)} as graph inputs/outputs (found {', '.join(have)})")
            kinds = {a.name for a in node.attribute}
            if "k_quant_type" in kinds or "kv_cache_bit_width" in kinds:
                raise PassError(f"kv-cache: layer {l}'s cache is already quantized")
        if self.config.dtype in QMAX and not self.context.tokenizer_json:
            raise PassError("kv-cache needs the model's tokenizer (PassContext.tokenizer_json) to calibrate scales")

    # ------------------------------------------------------------------------------------------
    def apply(self, model: onnx.ModelProto) -> PassResult:
        c = self.config
        nodes = _attention_nodes(model)
        kv_heads, head_dim = self._kv_shape(model)
        report = {"dtype": c.dtype, "storage_dtype": STORAGE[c.dtype][0],
                  "row_elements": row_elements(c.dtype, head_dim),
                  "bytes_per_token": bytes_per_token(c.dtype, len(nodes), kv_heads, head_dim)}
        if c.dtype == "fp32":
            return PassResult(model, False, report)
        if c.dtype == "int4" and head_dim % 2:
            raise PassError(f"kv-cache int4 packs two values per byte and needs an even head_dim, got {head_dim}")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        if c.dtype in QMAX:
            ranges, calib = self._calibrate(model, nodes)
            report["calibration"] = calib
            report["quantization"] = self._quantize_attention(out, ranges, report)
        self._retype(out, c.dtype, head_dim)
        return PassResult(out, True, report)

    @staticmethod
    def _kv_shape(model: onnx.ModelProto) -> tuple[int, int]:
        for v in model.graph.input:
            if v.name == "past_key.0":
                dims = v.type.tensor_type.shape.dim
                if len(dims) == 4 and dims[1].dim_value and dims[3].dim_value:
                    return dims[1].dim_value, dims[3].dim_value
        raise PassError("kv-cache: graph input past_key.0 has no static (1, kv_heads, capacity, head_dim) shape")

    def _retype(self, model: onnx.ModelProto, dtype: str, head_dim: int) -> None:
        elem, row = STORAGE[dtype][1], row_elements(dtype, head_dim)
        for v in list(model.graph.input) + list(model.graph.output):
            if v.name.startswith(("past_key.", "past_value.", "present_key.", "present_value.")):
                v.type.tensor_type.elem_type = elem
                v.type.tensor_type.shape.dim[3].dim_value = row

    # ------------------------------------------------------------------------------------------
    def _token_ids(self) -> tuple[list[int], str]:
        from .qdq import calibration_token_ids

        c = self.config
        return calibration_token_ids(self.name, c.calibration_text, self.context.tokenizer_json, c.sequence_length)

    def _calibrate(self, model: onnx.ModelProto, nodes: dict) -> tuple[dict, dict]:
        """Run the float-cache graph on calibration text; return per-layer (key, value) ranges shaped
        (kv_heads, head_dim) and a report."""
        import onnxruntime as ort

        c = self.config
        ids, source = self._token_ids()
        n = min(c.sequence_length, self._positions(model, nodes))
        count = min(c.samples, len(ids) // n)
        kv_heads, head_dim = self._kv_shape(model)
        half = head_dim // 2
        layers = sorted(nodes)
        k_abs = {l: np.zeros((kv_heads, head_dim), np.float32) for l in layers}
        k_pair = {l: np.zeros((kv_heads, half), np.float32) for l in layers}
        v_abs = {l: np.zeros((kv_heads, head_dim), np.float32) for l in layers}
        samples = {}  # a slice of each layer's cache, to report the quantization error
        scratch = Path(self.context.work_dir) if self.context.work_dir else None
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / "calibrate.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="calibrate.onnx.data", size_threshold=1024)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            for s in range(count):
                feed = {
                    "input_ids": np.asarray(ids[s * n:(s + 1) * n], np.int64)[None],
                    "seqlens_k": np.array([n - 1], np.int32),
                    "total_sequence_length": np.array(n, np.int32),
                    "logits_index": np.array([n - 1], np.int64),
                }
                for l in layers:
                    for kind in ("key", "value"):
                        feed[f"past_{kind}.{l}"] = np.zeros((1, kv_heads, n, head_dim), np.float32)
                result = dict(zip(names, sess.run(None, feed)))
                for l in layers:
                    k = result[f"present_key.{l}"][0, :, :n]  # (kv_heads, n, head_dim), post-rotary
                    v = result[f"present_value.{l}"][0, :, :n]
                    np.maximum(k_abs[l], np.abs(k).max(axis=1), out=k_abs[l])
                    np.maximum(k_pair[l], np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=1), out=k_pair[l])
                    np.maximum(v_abs[l], np.abs(v).max(axis=1), out=v_abs[l])
                    old = samples.get(l)
                    samples[l] = (k.copy(), v.copy()) if old is None else \
                        (np.concatenate([old[0], k], axis=1), np.concatenate([old[1], v], axis=1))
        ranges = {}
        for l in layers:
            kr = np.concatenate([k_pair[l], k_pair[l]], axis=-1) if self.k_range == "pair" else k_abs[l]
            ranges[l] = (kr, v_abs[l], samples[l])
        return ranges, {"text": source, "sequences": count, "tokens": count * n}

    @staticmethod
    def _positions(model: onnx.ModelProto, nodes: dict) -> int:
        """Rows of the rotary cos cache: the longest sequence the graph runs."""
        cos = next(iter(nodes.values())).input[7]
        for init in model.graph.initializer:
            if init.name == cos:
                return int(init.dims[0])
        raise PassError(f"kv-cache: the attention's cos_cache {cos!r} is not an initializer")

    @property
    def k_range(self) -> str:
        """The key range rule in effect (auto: pair for int8; observed for int4, whose resolution it doubles
        where it counts: SmolLM2 perplexity ratio 1.17 against 1.36 with pair ranges)."""
        if self.config.k_range != "auto":
            return self.config.k_range
        return "observed" if self.config.dtype == "int4" else "pair"

    def _clip(self, rng: np.ndarray, x: np.ndarray, layout: str, paired: bool) -> tuple[np.ndarray, float]:
        """The range, per channel (or per tensor), shrunk to the candidate fraction with the least squared
        error of quantize -> dequantize over the calibration cache ``x`` (kv_heads, tokens, head_dim).
        Paired channels (rotary pairs) keep one shared fraction. Returns (range, mean fraction)."""
        lo, hi = (-128, 127) if self.config.dtype == "int8" else (-8, 7)
        qmax = QMAX[self.config.dtype]
        errs = []
        for r in CLIP_RATIOS:
            scale = np.maximum(rng * r / qmax, 1e-8)[:, None, :]
            e = ((np.clip(np.rint(x / scale), lo, hi) * scale - x) ** 2).sum(axis=1)  # (kv_heads, head_dim)
            if layout == "per_tensor":
                e = np.full_like(e, e.sum())
            elif paired:
                half = e.shape[-1] // 2
                e = np.concatenate([e[:, :half] + e[:, half:]] * 2, axis=-1)
            errs.append(e)
        best = CLIP_RATIOS[np.argmin(np.stack(errs), axis=0)]  # (kv_heads, head_dim)
        return rng * best, float(best.mean())

    def _scales(self, rng: np.ndarray, layout: str) -> np.ndarray:
        """(kv_heads, head_dim) ranges -> the scale tensor for GroupQueryAttention."""
        qmax = QMAX[self.config.dtype]
        if layout == "per_tensor":
            return np.array([max(float(rng.max()) * self.config.headroom / qmax, 1e-8)], np.float32)
        s = np.maximum(rng * self.config.headroom / qmax, 1e-8).astype(np.float32)
        return s[None, :, None, :]  # (1, kv_heads, 1, head_dim)

    def _quantize_attention(self, model: onnx.ModelProto, ranges: dict, report: dict) -> dict:
        c = self.config
        bits = 8 if c.dtype == "int8" else 4
        nodes = _attention_nodes(model)
        errors = {"key": [], "value": []}
        clip = c.clip if c.clip != "auto" else ("mse" if c.dtype == "int4" else "none")
        fractions = {"key": [], "value": []}
        for l, node in sorted(nodes.items()):
            kr, vr, (k, v) = ranges[l]
            names = []
            for kind, rng, layout, x in (("key", kr, c.k_scale, k), ("value", vr, c.v_scale, v)):
                if clip == "mse":
                    rng, fraction = self._clip(rng, x, layout, paired=kind == "key" and self.k_range == "pair")
                    fractions[kind].append(fraction)
                scale = self._scales(rng, layout)
                name = f"kv_scale.{kind}.{l}"
                model.graph.initializer.append(numpy_helper.from_array(scale, name))
                names.append(name)
                s = scale[0] if scale.ndim == 4 else scale  # (kv_heads, 1, head_dim) against (kv_heads, n, head_dim)
                err = dequantize(quantize(x, s, c.dtype), s, c.dtype) - x
                errors[kind].append(float(np.sqrt((err ** 2).mean() / max((x ** 2).mean(), 1e-20))))
            inputs = list(node.input) + [""] * (SCALE_INPUTS[1] + 1 - len(node.input))
            inputs[SCALE_INPUTS[0]], inputs[SCALE_INPUTS[1]] = names
            del node.input[:]
            node.input.extend(inputs)
            quant = "PER_CHANNEL"
            node.attribute.extend([
                helper.make_attribute("k_quant_type", "PER_TENSOR" if c.k_scale == "per_tensor" else quant),
                helper.make_attribute("v_quant_type", "PER_TENSOR" if c.v_scale == "per_tensor" else quant),
                helper.make_attribute("kv_cache_bit_width", bits),
            ])
        kv_heads, head_dim = self._kv_shape(model)
        shape = {"per_channel": [1, kv_heads, 1, head_dim], "per_tensor": [1]}
        return {
            "bits": bits,
            "key": {"scheme": c.k_scale, "range": self.k_range, "scale_shape": shape[c.k_scale],
                    "scale_tensor": "kv_scale.key.{layer}",
                    "relative_rms_error": {"max": max(errors["key"]), "mean": float(np.mean(errors["key"]))}},
            "value": {"scheme": c.v_scale, "scale_shape": shape[c.v_scale], "scale_tensor": "kv_scale.value.{layer}",
                      "relative_rms_error": {"max": max(errors["value"]), "mean": float(np.mean(errors["value"]))}},
            "zero_point": 0 if bits == 8 else 8,
            "formula": ("q = clamp(round(x / scale), -128, 127); x = q * scale" if bits == 8 else
                        "q = clamp(round(x / scale), -8, 7) + 8, two per byte, element 2i in the low nibble; "
                        "x = (q - 8) * scale"),
            "headroom": c.headroom,
            "clip": clip,
            **({"mean_clip_fraction": {k: float(np.mean(v)) for k, v in fractions.items()}} if clip == "mse" else {}),
        }

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        if not result.modified:
            return
        dtype = self.config.dtype
        elem = STORAGE[dtype][1]
        for v in list(result.model.graph.input) + list(result.model.graph.output):
            if v.name.startswith(("past_", "present_")) and v.type.tensor_type.elem_type != elem:
                raise PassError(f"kv-cache left {v.name} as {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}")
        if dtype in QMAX:
            inits = {i.name for i in result.model.graph.initializer}
            for l, node in _attention_nodes(result.model).items():
                missing = [n for n in (f"kv_scale.key.{l}", f"kv_scale.value.{l}") if n not in inits or n not in node.input]
                if missing:
                    raise PassError(f"kv-cache: layer {l}'s attention lacks scale inputs {', '.join(missing)}")


def read_scales(model: onnx.ModelProto, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray | None:
    """The calibrated scales broadcast to (layer, 2, kv_heads, head_dim) float32, or None for float caches."""
    inits = {i.name: i for i in model.graph.initializer}
    if "kv_scale.key.0" not in inits:
        return None
    out = np.zeros((num_layers, 2, kv_heads, head_dim), np.float32)
    for l in range(num_layers):
        for j, kind in enumerate(("key", "value")):
            s = numpy_helper.to_array(inits[f"kv_scale.{kind}.{l}"]).astype(np.float32)
            out[l, j] = np.broadcast_to(s.reshape(-1) if s.size == 1 else s[0, :, 0, :], (kv_heads, head_dim))
    return out


# --------------------------------------------------------------------------------------------
# The manifest's description of the layout (a C runtime can allocate the cache from it alone)
# --------------------------------------------------------------------------------------------
SCALES_FILE = "kv_scales.f32"


def rotary_inv_freq(hf_model) -> list[float] | None:
    """The model's rotary frequencies (head_dim / 2 of them), which re-rotating shifted keys needs."""
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    return None if inv is None else [float(x) for x in inv.detach().double().cpu().numpy()]


def window_chunk(window: int) -> int:
    """Tokens evicted at once when a windowed cache is full: W/8 amortises the shift over W/8 steps."""
    return max(1, window // 8)


def manifest_entry(model: onnx.ModelProto, arch: dict, pass_log: list[dict], bundle_dir: Path,
                   window: int | None, sinks: int, inv_freq: list[float] | None, built: str = "fp32") -> dict:
    """The layout keys of the manifest's ``kv_cache`` section; writes the scales file into ``bundle_dir``.

    ``built``: the layout the target's build gives the cache when no kv-cache pass ran (gpu: fp16)."""
    layers, heads, dim = arch["num_layers"], arch["num_kv_heads"], arch["head_dim"]
    report = next((p["report"] for p in pass_log if p["pass"] == "kv-cache" and p["modified"]), None)
    kv = report["dtype"] if report else built
    row = row_elements(kv, dim)
    entry = {
        "kv_dtype": kv,
        "dtype": STORAGE[kv][0],
        "shape": ["batch=1", "kv_heads", "capacity", "head_dim" if row == dim else f"head_dim/{dim // row}"],
        "row_elements": row,
        "bytes_per_token": bytes_per_token(kv, layers, heads, dim),
        "quantization": None,
        "window": None,
    }
    quant = (report or {}).get("quantization")
    if quant:
        scales = read_scales(model, layers, heads, dim)
        (Path(bundle_dir) / SCALES_FILE).write_bytes(scales.astype("<f4").tobytes())
        entry["quantization"] = {
            **quant,
            "scales_file": SCALES_FILE,
            "scales_layout": "(layer, 2 [key, value], kv_heads, head_dim) float32 little-endian; the graph's "
                             "scale initializers broadcast to that shape",
            "calibration": report.get("calibration"),
        }
        entry["static_bytes"] = int(scales.nbytes)
    if window is not None:
        if inv_freq is None:
            raise PassError("a windowed KV cache re-rotates shifted keys and needs the model's rotary frequencies; "
                            "this model exposes none")
        entry["window"] = {
            "sinks": sinks,
            "window": window,
            "capacity": sinks + window,
            "evict_chunk": window_chunk(window),
            "positions": "cache slot: when full, the oldest non-sink tokens are evicted evict_chunk at a time, "
                         "the rest shift left and their keys are re-rotated by -evicted positions",
            "rotary_inv_freq": inv_freq,
            "rotary_layout": "non-interleaved halves: channel i pairs with i + head_dim/2",
        }
    return entry
