"""The KV cache: one flat buffer in the bundle's layout, optionally a sink + sliding window (StreamingLLM).

Torch-free. The buffer is ``(layer, 2, 1, kv_heads, capacity, row)``: ``[l, 0]`` holds layer l's keys and
``[l, 1]`` its values, each bound to the decoder graph as both ``past_*`` and ``present_*`` so that
GroupQueryAttention writes new entries in place. ``row`` and the element type come from the manifest's
``kv_cache`` section: float32/float16 rows of ``head_dim``, int8 rows of ``head_dim``, or uint8 rows of
``head_dim / 2`` (int4, two per byte, element 2i in the low nibble, stored as ``q + 8``). ``length`` is
the number of valid positions; shrinking it rolls entries back without touching memory.

Mixed precision (an int4 cache whose most sensitive layers stay int8): the manifest's ``layers`` lists each
layer's layout; the buffer is then one flat byte array and layer l's ``(2, 1, kv_heads, capacity, row_l)``
block a view of its own type into it (``layers[l]``, which is ``buffer[l]`` for uniform layouts).

Sink + window: with ``window`` set the capacity is ``sinks + window``. When a step would overflow it,
the oldest non-sink tokens are evicted ``evict_chunk`` at a time: the rest of the window shifts left
over them. GroupQueryAttention rotates keys at the cache slot they are written to (positions come from
``seqlens_k``), and stores them rotated, so shifted keys are re-rotated by minus the shift: every token
keeps the slot's position, as in StreamingLLM. Rotation is exact for float caches; quantized keys are
dequantized, rotated and requantized with the calibrated scales (with pair ranges, the int8 default,
the rotation keeps them in range; int4's ranges are taken over the window's slots). A cache whose keys are centred
(the manifest's ``key_offsets_file``: it stores rotary(key) - offset) adds the offset back before the
rotation and subtracts it after; rotated keys (``key_rotation``: it stores (rotary(key) - offset) @ H, H a
normalised Hadamard matrix, its own inverse) are multiplied by H on the way out and on the way back.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import BundleError, GenerationError

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}
KV_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "int4": "uint8"}


class KVCache:
    """The whole KV cache in one buffer ``(layer, 2, 1, kv_heads, capacity, row)`` of the bundle's dtype."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype=np.float32,
                 kv_dtype: str = "fp32", scales: np.ndarray | None = None, sinks: int = 0,
                 window: int | None = None, evict_chunk: int = 1, inv_freq: np.ndarray | None = None,
                 layer_dtypes: list[str] | None = None, key_offsets: np.ndarray | None = None,
                 key_rotation: np.ndarray | None = None):
        import onnxruntime as ort

        self.kv_dtype = kv_dtype
        self.layer_dtypes = list(layer_dtypes) if layer_dtypes else [kv_dtype] * num_layers
        self.head_dim = head_dim
        self.capacity = capacity
        if len(set(self.layer_dtypes)) == 1:
            row = head_dim // 2 if kv_dtype == "int4" else head_dim
            self.buffer = np.zeros((num_layers, 2, 1, kv_heads, capacity, row), dtype=dtype)
            self.layers = [self.buffer[l] for l in range(num_layers)]
        else:  # one flat byte buffer, a typed view per layer
            shapes = [(2, 1, kv_heads, capacity, head_dim // 2 if d == "int4" else head_dim) for d in self.layer_dtypes]
            types = [np.dtype(STORAGE_DTYPES[KV_DTYPES[d]]) for d in self.layer_dtypes]
            sizes = [int(np.prod(sh)) * t.itemsize for sh, t in zip(shapes, types)]
            self.buffer = np.zeros(sum(sizes), np.uint8)
            offsets = np.cumsum([0] + sizes)
            self.layers = [self.buffer[offsets[l]:offsets[l + 1]].view(types[l]).reshape(shapes[l])
                           for l in range(num_layers)]
        self.values = [[ort.OrtValue.ortvalue_from_numpy(self.layers[l][j]) for j in (0, 1)] for l in range(num_layers)]
        self.length = 0
        self.scales = scales  # (layer, 2, kv_heads, head_dim) float32, quantized layouts only
        self.key_offsets = key_offsets  # (layer, kv_heads, head_dim) float32, centred keys only
        self.key_rotation = key_rotation  # (head_dim, head_dim) symmetric orthonormal, rotated keys only
        self.sinks, self.window, self.evict_chunk = sinks, window, evict_chunk
        self.inv_freq = inv_freq  # (head_dim / 2,) float64, windowed caches only
        self.evicted = 0  # tokens evicted so far (windowed caches)

    @classmethod
    def from_manifest(cls, bundle, capacity: int) -> "KVCache":
        kv, arch = bundle.manifest["kv_cache"], bundle.arch
        storage = kv.get("dtype", "float32")
        kv_dtype = kv.get("kv_dtype", "fp32")
        layers, heads, dim = arch["num_layers"], arch["num_kv_heads"], arch["head_dim"]
        per_layer = kv.get("layers") or [{"kv_dtype": kv_dtype, "dtype": storage}]
        if kv.get("layers") is not None and len(per_layer) != layers:
            raise BundleError(f"manifest kv_cache.layers has {len(per_layer)} entries for {layers} layers")
        for entry in per_layer:
            d, st = entry.get("kv_dtype"), entry.get("dtype")
            if st not in STORAGE_DTYPES or KV_DTYPES.get(d) != st:
                raise BundleError(f"manifest kv_cache layout {d!r} with dtype {st!r} is not one this runtime "
                                  f"knows ({', '.join(f'{k}/{v}' for k, v in KV_DTYPES.items())})")
        layer_dtypes = [e["kv_dtype"] for e in per_layer] if kv.get("layers") else None
        scales = offsets = rotation = None
        quant = kv.get("quantization")
        window = kv.get("window")
        if quant and window:  # only re-rotation needs the scales (and key offsets) on the host
            scales = _static_file(bundle, quant["scales_file"], (layers, 2, heads, dim))
            if quant.get("key_offsets_file"):
                offsets = _static_file(bundle, quant["key_offsets_file"], (layers, heads, dim))
            rotation = _key_rotation(quant.get("key_rotation"), dim)
        if window:
            sinks, size = int(window["sinks"]), int(window["window"])
            inv = np.asarray(window["rotary_inv_freq"], np.float64)
            if inv.shape != (dim // 2,):
                raise BundleError(f"manifest kv_cache.window.rotary_inv_freq must have {dim // 2} entries")
            return cls(layers, heads, dim, sinks + size, STORAGE_DTYPES[storage], kv_dtype, scales, sinks, size,
                       int(window.get("evict_chunk", 1)), inv, layer_dtypes, offsets, rotation)
        return cls(layers, heads, dim, capacity, STORAGE_DTYPES[storage], kv_dtype, layer_dtypes=layer_dtypes)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def is_full(self) -> bool:
        """No room for one more token (a windowed cache always makes room)."""
        return self.window is None and self.length + 1 > self.capacity

    def make_room(self, n: int) -> None:
        """Before writing ``n`` tokens: a windowed cache evicts what it must; a plain one checks the fit."""
        if self.length + n <= self.capacity:
            return
        if self.window is None:
            raise GenerationError(f"{self.length + n} tokens do not fit the context of {self.capacity} tokens")
        if n > self.window:
            raise GenerationError(f"a step of {n} tokens does not fit the window of {self.window} tokens")
        self.evict(min(max(self.evict_chunk, self.length + n - self.capacity), self.length - self.sinks))

    def evict(self, e: int) -> None:
        """Drop the ``e`` oldest tokens after the sinks; shift the rest left and re-rotate their keys."""
        s, n = self.sinks, self.length
        if e <= 0:
            return
        angle = e * self.inv_freq  # (head_dim / 2,)
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        for l, layer in enumerate(self.layers):
            v = layer[1, 0]  # (kv_heads, capacity, row)
            v[:, s:n - e] = v[:, s + e:n]  # numpy copies through a temporary when the ranges overlap
            k = layer[0, 0]
            x = self._load_keys(k[:, s + e:n], l)  # (kv_heads, n - s - e, head_dim) float32
            k[:, s:n - e] = self._store_keys(rotate_halves(x, cos, -sin), l)  # R(-e)
        self.length = n - e
        self.evicted += e

    def _load_keys(self, q: np.ndarray, layer: int) -> np.ndarray:
        kv_dtype = self.layer_dtypes[layer]
        if kv_dtype in ("fp32", "fp16"):
            return q.astype(np.float32)
        scale = self.scales[layer, 0][:, None, :]  # (kv_heads, 1, head_dim)
        if kv_dtype == "int8":
            x = q.astype(np.float32) * scale
        else:
            x = np.empty(q.shape[:-1] + (self.head_dim,), np.float32)
            x[..., 0::2] = (q & 15).astype(np.float32) - 8
            x[..., 1::2] = (q >> 4).astype(np.float32) - 8
            x *= scale
        if self.key_rotation is not None:
            x = x @ self.key_rotation
        return x if self.key_offsets is None else x + self.key_offsets[layer][:, None, :]

    def _store_keys(self, x: np.ndarray, layer: int) -> np.ndarray:
        kv_dtype = self.layer_dtypes[layer]
        if kv_dtype in ("fp32", "fp16"):
            return x.astype(self.layers[layer].dtype)
        if self.key_offsets is not None:
            x = x - self.key_offsets[layer][:, None, :]
        if self.key_rotation is not None:
            x = x @ self.key_rotation
        q = np.rint(x / self.scales[layer, 0][:, None, :])
        if kv_dtype == "int8":
            return np.clip(q, -128, 127).astype(np.int8)
        q = (np.clip(q, -8, 7) + 8).astype(np.uint8)
        return q[..., 0::2] | (q[..., 1::2] << 4)


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two) divided by sqrt(n): orthonormal and
    symmetric, hence its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two order, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def rotate_halves(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary rotation as GroupQueryAttention does it (channel i pairs with i + head_dim/2) by the angles
    whose cosines and sines are given (broadcast against x's halves); negate ``sin`` to rotate back."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _key_rotation(entry: dict | None, head_dim: int) -> np.ndarray | None:
    """The matrix the manifest's ``quantization.key_rotation`` names (stored keys are rotated by it), or None."""
    if entry is None:
        return None
    if entry.get("kind") != "hadamard" or entry.get("order") != head_dim:
        raise BundleError(f"manifest kv_cache.quantization.key_rotation {entry!r} is not one this runtime knows "
                          f"(kind 'hadamard' of order {head_dim})")
    return hadamard(head_dim)


def _static_file(bundle, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 little-endian file of the bundle that the manifest hashes, checked against ``shape``."""
    if name not in bundle.manifest["files"]:
        raise BundleError(f"manifest refers to {name!r}, which is not among its hashed files")
    data = np.fromfile(bundle.file(name), dtype="<f4")
    if data.size != int(np.prod(shape)):
        raise BundleError(f"{name} has {data.size} values, expected {int(np.prod(shape))}")
    return data.reshape(shape)
