"""Block-wise weight quantization in ONNX Runtime's ``MatMulNBits`` layout, in numpy.

A MatMul weight ``W`` of shape ``(K, N)`` (K inputs, N outputs) is cut, for each output column n, into
``k_blocks = ceil(K / block_size)`` blocks of consecutive rows; block ``(n, b)`` covers
``W[b*bs : (b+1)*bs, n]`` (K is zero-padded to a whole number of blocks). Each block stores integers
``q`` in ``[0, 2^bits)`` and dequantizes as

    W[b*bs + j, n] = (q[n, b, j] - zero_point[n, b]) * scale[n, b] + offset[n, b]

``offset`` is not part of any ONNX Runtime kernel: it carries a float zero point (the exact
re-expression of a GGUF Q4_1 source ``w = d*q + m``, or HQQ's optimised zero point), and the pass adds
``sum_j x[b*bs+j] * offset[n, b]`` back through a block-sum correction (see
:mod:`edgedec.passes.nbits`). Without a zero point the kernels assume ``2^(bits-1)``.

Layouts, as ``MatMulNBits`` (and, for a tied embedding, ``GatherBlockQuantized``) read them:

    q             (N, k_blocks, block_size)              uint8, unpacked, values in [0, 2^bits)
    packed B      (N, k_blocks, block_size * bits / 8)   uint8; 4 bits: element 2i in the low nibble of
                                                         byte i, element 2i+1 in the high nibble
    scales        (N, k_blocks)                          float32
    zero points   (N, ceil(k_blocks * bits / 8))         uint8, packed like B (omitted: 2^(bits-1))
    offsets       (N, k_blocks)                          float32 (exact source grids only)

Quantizers: ``rtn`` (round to nearest, ORT's conventions), ``k_quant`` and ``hqq`` (ONNX Runtime's
implementations; HQQ's float zero points travel as offsets), ``recover_grid``, which finds the
GGUF Q4_0 / Q4_1 / Q8_0 grid a dequantized tensor lies on and re-expresses it without loss, and
``from_form``, which re-expresses the exact per-block form read from the GGUF's own blocks
(:mod:`edgedec.models.gguf_blocks`: k-quants, Q5_0, ...), in 8 bits where the source has more than 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALGORITHMS = ("rtn", "k_quant", "hqq")
BLOCK_SIZES = (16, 32, 64, 128)  # what MatMulNBits and GatherBlockQuantized take (powers of two >= 16)
GGUF_BLOCK = 32  # every GGUF legacy format (Q4_0, Q4_1, Q8_0) uses blocks of 32 along the input dim


@dataclass
class BlockQuant:
    """A (K, N) weight quantized block-wise along K; see the module docstring for the layouts."""

    q: np.ndarray  # (N, k_blocks, block_size) uint8
    scales: np.ndarray  # (N, k_blocks) float32
    zero_points: np.ndarray | None  # (N, k_blocks) uint8, None: 2^(bits-1)
    bits: int
    K: int
    offsets: np.ndarray | None = None  # (N, k_blocks) float32, None: no offset
    kind: str = ""  # what produced it: "rtn", "k_quant", "hqq", "Q4_1", "Q8_0", ...

    @property
    def N(self) -> int:
        return self.q.shape[0]

    @property
    def block_size(self) -> int:
        return self.q.shape[2]

    @property
    def k_blocks(self) -> int:
        return self.q.shape[1]

    def zero_point_values(self) -> np.ndarray:
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)
        return self.zero_points

    def dequantize(self) -> np.ndarray:
        """The (K, N) float32 weight this represents."""
        zp = self.zero_point_values().astype(np.float32)
        w = (self.q.astype(np.float32) - zp[..., None]) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return np.ascontiguousarray(w.reshape(self.N, -1)[:, : self.K].T)

    def packed_b(self) -> np.ndarray:
        """B for MatMulNBits: (N, k_blocks, block_size * bits / 8) uint8."""
        return pack(self.q, self.bits)

    def packed_zero_points(self) -> np.ndarray | None:
        """zero_points for MatMulNBits / GatherBlockQuantized: (N, ceil(k_blocks * bits / 8)) uint8."""
        if self.zero_points is None:
            return None
        zp = self.zero_points
        per_byte = 8 // self.bits
        pad = (-zp.shape[1]) % per_byte
        if pad:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], pad), np.uint8)], axis=1)
        return pack(zp, self.bits)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (packed B, scales, zero points, offsets)."""
        n = self.packed_b().nbytes + self.scales.nbytes
        zp = self.packed_zero_points()
        n += 0 if zp is None else zp.nbytes
        n += 0 if self.offsets is None else self.offsets.nbytes
        return n


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values of ``bits`` bits along the last axis, the first element in the lowest bits."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    per_byte = 8 // bits
    if q.shape[-1] % per_byte:
        raise ValueError(f"last axis {q.shape[-1]} is not a multiple of {per_byte}")
    out = np.zeros(q.shape[:-1] + (q.shape[-1] // per_byte,), np.uint8)
    for i in range(per_byte):
        out |= (q[..., i::per_byte].astype(np.uint8) & ((1 << bits) - 1)) << (bits * i)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`."""
    if bits == 8:
        return packed.astype(np.uint8)
    per_byte = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per_byte,)).astype(np.uint8)


def blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """(K, N) -> (N, k_blocks, block_size) float32, K zero-padded to whole blocks."""
    K, N = w.shape
    pad = (-K) % block_size
    wt = np.asarray(w, np.float32).T
    if pad:
        wt = np.concatenate([wt, np.zeros((N, pad), np.float32)], axis=1)
    return wt.reshape(N, -1, block_size)


# ------------------------------------------------------------------------------------------------
# Quantizers: (K, N) float -> BlockQuant
# ------------------------------------------------------------------------------------------------
def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool, algorithm: str = "rtn") -> BlockQuant:
    if algorithm == "rtn":
        return rtn(w, bits, block_size, symmetric)
    if algorithm == "k_quant":
        return k_quant(w, bits, block_size)
    if algorithm == "hqq":
        return hqq(w, bits, block_size)
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuant:
    """Round to nearest with ONNX Runtime's conventions (``quantize_matmul_4bits``).

    symmetric: the value of largest magnitude maps to ``-2^(bits-1)``, zero point ``2^(bits-1)`` (omitted).
    asymmetric: the range ``[min(w, 0), max(w, 0)]`` maps onto ``[0, 2^bits - 1]``, integer zero point.
    """
    b = blocks(w, block_size)
    top = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        idx = np.abs(b).argmax(-1)
        vmax = np.take_along_axis(b, idx[..., None], -1)[..., 0]  # signed value of largest magnitude
        scale = vmax / -mid
        safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(b / safe[..., None]) + mid, 0, top).astype(np.uint8)
        return BlockQuant(q, scale.astype(np.float32), None, bits, w.shape[0], kind="rtn")
    vmin = np.minimum(b.min(-1), 0.0)
    vmax = np.maximum(b.max(-1), 0.0)
    scale = (vmax - vmin) / top
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(np.rint(-vmin / safe), 0, top)
    q = np.clip(np.rint(b / safe[..., None]) + zp[..., None], 0, top).astype(np.uint8)
    return BlockQuant(q, scale.astype(np.float32), zp.astype(np.uint8), bits, w.shape[0], kind="rtn")


def k_quant(w: np.ndarray, bits: int, block_size: int) -> BlockQuant:
    """llama.cpp's k-quant search (weighted least squares over candidate scales), as ONNX Runtime ships it."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    b = blocks(w, block_size)
    N, kb, bs = b.shape
    q, scale, zp = quant_tensor_k_quant_cpu(b.reshape(N, kb * bs), bits, bs)
    return BlockQuant(q.reshape(N, kb, bs).astype(np.uint8), scale.reshape(N, kb).astype(np.float32),
                      zp.reshape(N, kb).astype(np.uint8), bits, w.shape[0], kind="k_quant")


def hqq(w: np.ndarray, bits: int, block_size: int) -> BlockQuant:
    """Half-quadratic quantization (ONNX Runtime's implementation, which needs torch).

    HQQ optimises a float zero point z per block. ONNX Runtime's CPU kernel only prepacks weights whose
    zero points are uint8; with float ones it dequantizes the whole weight at every call (about 20x slower
    per MatMul, measured), and rounding z to an integer gives plain RTN back. So the block keeps q with the
    default zero point ``2^(bits-1)`` and carries ``(2^(bits-1) - z) * scale`` as its offset, which the
    pass adds back exactly through the block-sum correction: ``(q - mid) s + (mid - z) s = (q - z) s``.
    """
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    b = blocks(w, block_size)
    N, kb, bs = b.shape
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=bs, bits=bits))
    q, scale, zero = quantizer.quantize_internal(torch.from_numpy(b.reshape(N, kb * bs).copy()), bits=bits,
                                                 group_size=bs)
    scale = scale.numpy().reshape(N, kb).astype(np.float32)
    zero = zero.numpy().reshape(N, kb).astype(np.float32)
    offsets = ((1 << (bits - 1)) - zero) * scale
    return BlockQuant(q.numpy().reshape(N, kb, bs).astype(np.uint8), scale, None, bits, w.shape[0],
                      offsets=offsets.astype(np.float32), kind="hqq")


# ------------------------------------------------------------------------------------------------
# Exact source grids (GGUF legacy formats), recovered from the dequantized float weights
# ------------------------------------------------------------------------------------------------
def _snap_fp16(d: np.ndarray) -> np.ndarray:
    """GGUF stores block scales as float16; snapping a recovered scale to it removes fp32 round-off."""
    with np.errstate(over="ignore"):
        snapped = d.astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(snapped), snapped, d)


def _on_grid(b: np.ndarray, rebuilt: np.ndarray) -> np.ndarray:
    """Per block: does ``rebuilt`` reproduce ``b`` up to float32 round-off of the block's magnitude?"""
    tol = 4 * np.finfo(np.float32).eps * np.abs(b).max(-1) + 1e-30
    return np.abs(rebuilt - b).max(-1) <= tol


def recover_q8_0(w: np.ndarray) -> BlockQuant | None:
    """``w = d * q`` with q in [-127, 127] per block of 32 (GGUF Q8_0): 8-bit, zero point 128, exact."""
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = blocks(w, GGUF_BLOCK)
    d = _snap_fp16(np.abs(b).max(-1) / 127.0)  # Q8_0 maps the block's largest magnitude to +-127
    safe = np.where(d == 0, 1.0, d)
    qs = np.rint(b / safe[..., None])
    if np.abs(qs).max() > 127 or not _on_grid(b, qs * d[..., None]).all():
        return None
    return BlockQuant((qs + 128).astype(np.uint8), d.astype(np.float32), None, 8, w.shape[0], kind="Q8_0")


def recover_q4_0(w: np.ndarray) -> BlockQuant | None:
    """``w = d * (q - 8)`` with q in [0, 15] per block of 32 (GGUF Q4_0): 4-bit, default zero point, exact."""
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = blocks(w, GGUF_BLOCK)
    idx = np.abs(b).argmax(-1)
    vmax = np.take_along_axis(b, idx[..., None], -1)[..., 0]
    d = _snap_fp16(vmax / -8.0)  # Q4_0 maps the value of largest magnitude to q = 0, i.e. -8 * d
    safe = np.where(d == 0, 1.0, d)
    qs = np.rint(b / safe[..., None])
    if qs.min() < -8 or qs.max() > 7 or not _on_grid(b, qs * d[..., None]).all():
        return None
    return BlockQuant((qs + 8).astype(np.uint8), d.astype(np.float32), None, 4, w.shape[0], kind="Q4_0")


def recover_q4_1(w: np.ndarray) -> BlockQuant | None:
    """``w = d * q + m`` with q in [0, 15] per block of 32 (GGUF Q4_1), re-expressed without loss.

    Q4_1 maps a block's minimum to q = 0 and its maximum to q = 15, so ``d = (max - min) / 15`` (snapped
    to float16, as GGUF stores it) and ``m = min``; blocks where that does not reproduce every value
    (a hand-made grid whose extremes are not 0 and 15) retry with the smallest gap between the block's
    distinct values. The result keeps q as stored, no zero point (ORT's default 8), and the per-block
    ``offset = m + 8 d``, which the pass adds back with a block-sum correction:
    ``(q - 8) * d + (m + 8 d) = d * q + m``.
    """
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = blocks(w, GGUF_BLOCK)
    lo = b.min(-1)
    d = _snap_fp16((b.max(-1) - lo) / 15.0)

    def fit(d):
        safe = np.where(d == 0, 1.0, d)
        qs = np.rint((b - lo[..., None]) / safe[..., None])
        ok = (qs.max(-1) <= 15) & _on_grid(b, lo[..., None] + qs * d[..., None])
        return qs, ok

    qs, ok = fit(d)
    if not ok.all():
        srt = np.sort(b[~ok], axis=-1)
        gaps = np.diff(srt, axis=-1)
        gaps = np.where(gaps > 0, gaps, np.inf).min(-1)
        d2 = d.copy()
        d2[~ok] = _snap_fp16(np.where(np.isfinite(gaps), gaps, 0.0))
        qs2, ok2 = fit(d2)
        qs[~ok], d[~ok], ok = qs2[~ok], d2[~ok], ok | ok2
        if not ok.all():
            return None
    d = d.astype(np.float32)
    offsets = (lo + 8.0 * d).astype(np.float32)
    return BlockQuant(qs.astype(np.uint8), d, None, 4, w.shape[0], offsets=offsets, kind="Q4_1")


def round_offsets(q: BlockQuant) -> BlockQuant:
    """``q`` with its per-block float offsets folded into the nearest integer zero point: no block-sum
    correction, at the price of a per-block shift of the weights (at most half a step).

    With ``(q - mid) s + o = (q - z) s`` the exact zero point is ``z = mid - o / s``; it is rounded and
    clipped to ``[0, 2^bits - 1]``. For a GGUF Q4_1 block (``w = d q + m``, ``o = m + 8 d``) this is what
    round-to-nearest re-quantization gives, since Q4_1 already spans the block's minimum to maximum.
    """
    if q.offsets is None:
        return q
    top = (1 << q.bits) - 1
    safe = np.where(q.scales == 0, 1.0, q.scales)
    z = np.clip(np.rint(q.zero_point_values().astype(np.float32) - q.offsets / safe), 0, top)
    return BlockQuant(q.q, q.scales, z.astype(np.uint8), q.bits, q.K, kind=f"{q.kind} rounded zero point")


GRID_RECOVERERS = {"Q4_0": recover_q4_0, "Q4_1": recover_q4_1, "Q8_0": recover_q8_0}


def recover_grid(w: np.ndarray, formats: tuple[str, ...] = ("Q4_0", "Q4_1", "Q8_0")) -> BlockQuant | None:
    """The first of ``formats`` whose grid ``w`` lies on exactly, re-expressed; None if none fits."""
    for fmt in formats:
        found = GRID_RECOVERERS[fmt](w)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------------------------
# Exact source forms read from the GGUF's own blocks (k-quants, Q5_0, ...): edgedec.models.gguf_blocks
# ------------------------------------------------------------------------------------------------
def from_form(form, bits: int) -> BlockQuant | None:
    """A :class:`edgedec.models.gguf_blocks.BlockForm` (``w = fl(fl(scale * q) + offset)`` per block) as a
    ``bits``-bit BlockQuant that dequantizes to the same float32 values, or None where it cannot.

    ``(u - z) * scale + offset`` with ``u - z = q`` exactly: signed codes that fit ``[-2^(bits-1),
    2^(bits-1))`` take ``u = q + 2^(bits-1)`` and the default zero point (Q4_0, Q5_0 and Q6_K in 8 bits,
    Q8_0); non-negative ones take ``u = q`` and uint8 zero points 0 (Q4_1 and Q4_K in 4 bits, Q5_1 and Q5_K
    in 8). Scales stay float32 (MatMulNBits' scales are float32: ``d * sc`` needs no rounding), offsets
    travel through the block-sum correction. The block is the form's (32, or 16 for Q6_K)."""
    if form.block not in BLOCK_SIZES:
        return None
    lo, hi = form.q_range
    mid, top = 1 << (bits - 1), (1 << bits) - 1
    q = form.q.astype(np.int16)
    if -mid <= lo and hi < mid:
        u, zp = q + mid, None
    elif lo >= 0 and hi <= top:
        u, zp = q, np.zeros(form.scale.shape, np.uint8)
    else:
        return None
    N, K = form.q.shape
    return BlockQuant(u.astype(np.uint8).reshape(N, K // form.block, form.block), form.scale.astype(np.float32), zp,
                      bits, K, offsets=None if form.offset is None else form.offset.astype(np.float32),
                      kind=form.kind)
