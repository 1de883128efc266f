"""Block-quantized weights for the TVM targets: the layout, the packing, and the TIR kernels that read it.

``compile --target cpu-tvm -q int4`` stores every projection in 4 bits and the embedding / LM head table
in 8 bits. ONNX Runtime's ``MatMulNBits`` has no float zero point on its fast path, so a GGUF Q4_1 weight
(``w = d*q + m``) needs extra correction nodes there; a TVM kernel is ours to write, so it takes the
per-block offset directly and a Q4_0 / Q4_1 / Q8_0 source is re-expressed without loss.

Layout of a (out, in) weight with ``bits`` in {4, 8}, blocks of 32 along ``in`` (``per = 32 // bits``
values in one uint32 word; ``out % 32 == 0``, ``in % 32 == 0``)::

    words   uint32  (out / 32, in / per, 32)  words[o, kw, j] holds, in bit field [bits*p, bits*(p+1)),
                                              the unsigned value q of W[32*o + j, per*kw + p]
    scale   float16 (out / 32, in / 32, 32)   d of block (32*o + j, b)
    offset  float16 (out / 32, in / 32, 32)   m of block (32*o + j, b)

    W[n, k] = d * q + m,   q in [0, 2^bits)

or, where float16 cannot hold a GGUF source's own scales exactly (:func:`scale_buffers`): float32 d and m,
or a k-quant's two levels, ``scale`` uint16 (sc | m << 8 per block) and ``offset`` float16
(out / 32, in / 256, 2, 32) (d, -dmin per 256 inputs), with d = d*sc and m = (-dmin)*m computed in
float32 by the kernels (exact, as gguf computes them).

A kernel task owns 32 consecutive outputs: four AVX2 registers of eight lanes, four independent FMA chains.
For each input value it broadcasts the value, extracts 32 fields with a shift and a mask and accumulates;
the block's offset is applied once per block through the sum of its 32 inputs (``y += d * sum(q x) +
m * sum(x)``). Everything a task reads lies in one sequential run per tensor, in the order it reads it,
which is what lets the hardware prefetcher stream it (measured: 1.9x faster from memory than eight outputs
per task, ``(out/8, in/per, 8)``). Scale and offset are float16, as GGUF stores them.

GGUF re-expression: Q4_1 ``d*q + m`` as it is; Q4_0 ``d*(q-8)`` -> ``m = -8d``; Q8_0 ``d*v`` (v signed)
-> ``q = v + 128``, ``m = -128d``; all exact in float16. Sources with other formats are read from the
GGUF's own blocks (:mod:`edgedec.models.gguf_blocks`, :func:`from_form`): Q4_K in 4 bits with its two
levels, Q5_0 / Q5_1 / Q5_K (and Q8_0) in 8 bits, exact; Q6_K, whose scales change every 16 inputs, cannot
be held by blocks of 32 and is rounded to 8 bits (docs/quantization.md). Weights on no source grid are rounded to
nearest, asymmetric for 4 bits and symmetric for 8 (ONNX Runtime's conventions,
:mod:`edgedec.passes.blockwise`), with d and m then rounded to float16 (the kernels compute with those).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.gguf_blocks import BlockForm
from ..passes import blockwise as bw

BLOCK = 32  # inputs per block (one scale and one offset)
LANES = 8  # outputs per vector register
GROUP = 32  # outputs per kernel task: GROUP // LANES independent accumulators
DIRECT_ROWS = 4  # up to this many rows, the multi-row kernel unpacks per row pair instead of once per block


@dataclass
class QuantLinear:
    """One weight in the layout above."""

    words: np.ndarray  # (out/32, in/per, 32) uint32
    scale: np.ndarray  # (out/32, in/32, 32) float16, or float32 (an exact k-quant source)
    offset: np.ndarray  # (out/32, in/32, 32) like scale
    bits: int
    kind: str  # "Q4_1", "Q8_0", "rtn", "exact Q4_K", ...

    @property
    def scale_dtype(self) -> str:
        """float16, float32, or k (two levels: see :func:`scale_buffers`)."""
        return "k" if self.scale.dtype == np.uint16 else str(self.scale.dtype)

    def dequantize(self) -> np.ndarray:
        """The (out, in) float32 weight the kernels compute with."""
        return dequantize(self.words, self.scale, self.offset, self.bits)


def fits(shape: tuple[int, ...]) -> bool:
    """Can an (out, in) weight take this layout?"""
    return len(shape) == 2 and shape[0] % GROUP == 0 and shape[1] % BLOCK == 0


def quantize(w: np.ndarray, bits: int, form: BlockForm | None = None, widen: bool = True) -> QuantLinear:
    """An (out, in) float weight in ``bits`` bits: its source's exact form (``form``, from
    :mod:`edgedec.models.gguf_blocks`) when this layout holds it, else its GGUF legacy grid re-expressed when
    it lies on one, else rounded to nearest. ``widen``: a source with more than ``bits`` bits per code
    (Q5_0, Q8_0, Q6_K as a projection) is stored in 8 bits instead (exact where its blocks are 32 wide)."""
    if not fits(w.shape):
        raise ValueError(f"a {w.shape} weight does not fit blocks of {BLOCK} inputs x groups of {GROUP} outputs")
    note = ""
    if form is not None:
        want = max(bits, form.bits or 8) if widen else bits
        exact = from_form(form, want, w)
        if exact is not None:
            return exact
        note = f" ({form.kind} source: {why_not_exact(form, want)})"
        bits = want
    wt = np.ascontiguousarray(w.T, dtype=np.float32)  # blockwise works on (K, N) MatMul weights
    grids = ("Q4_0", "Q4_1") if bits == 4 else ("Q8_0",)
    q = bw.recover_grid(wt, grids) or _rtn(wt, bits)
    # (q - z) s + o = s q + (o - z s): in float64, so that a GGUF grid's m comes back exactly
    d = q.scales.astype(np.float64)
    m = (0.0 if q.offsets is None else q.offsets.astype(np.float64)) - q.zero_point_values() * d
    with np.errstate(over="ignore"):
        d16, m16 = d.astype(np.float16), m.astype(np.float16)
    if not (np.isfinite(d16).all() and np.isfinite(m16).all()):
        raise ValueError("a block scale or offset is beyond float16's range")
    out, kb = q.scales.shape
    return QuantLinear(pack(q.q.astype(np.int32).reshape(out, kb * BLOCK), bits), _lanes(d16, out), _lanes(m16, out),
                       bits, q.kind + note)


def _rtn(wt: np.ndarray, bits: int) -> bw.BlockQuant:
    """Round to nearest (asymmetric for 4 bits, symmetric for 8); a symmetric block is rounded against the
    float16 scale the kernels use, so that its offset ``-2^(bits-1) d`` is exact too."""
    q = bw.rtn(wt, bits, BLOCK, symmetric=bits == 8)
    if q.zero_points is not None:
        return q
    with np.errstate(over="ignore"):
        d16 = q.scales.astype(np.float16).astype(np.float32)
    if not np.isfinite(d16).all():
        return q  # refused below
    safe = np.where(d16 == 0, 1.0, d16).astype(np.float32)
    mid = 1 << (bits - 1)
    codes = np.clip(np.rint(bw.blocks(wt, BLOCK) / safe[..., None]) + mid, 0, (1 << bits) - 1)
    return bw.BlockQuant(codes.astype(np.uint8), d16, None, bits, wt.shape[0], kind="rtn")


def _lanes(a: np.ndarray, out: int) -> np.ndarray:
    """(out, in/32) per-block values -> (out/32, in/32, 32), the kernels' order."""
    return np.ascontiguousarray(a.reshape(out // GROUP, GROUP, -1).transpose(0, 2, 1))


def why_not_exact(form: BlockForm, bits: int) -> str:
    if form.block != BLOCK:
        return f"blocks of {form.block}, this layout has {BLOCK}"
    if form.bits is None or form.bits > bits:
        return f"codes {form.q_range} need more than {bits} bits"
    return "its scale and offset do not give it back exactly"


def from_form(form: BlockForm, bits: int, w: np.ndarray | None = None) -> QuantLinear | None:
    """An exact source form (K = in, N = out) in this layout, or None where it cannot be held exactly.

    Codes become unsigned: ``u = q - lo`` with ``lo = 0`` for a form with non-negative codes (Q4_1, Q4_K:
    ``d = scale``, ``m = offset``, the kernel's ``d*u + m`` is the source's float32 arithmetic) and
    ``lo = -2^(bits-1)`` for signed ones (Q4_0, Q5_0, Q8_0: ``m = -2^(bits-1) * scale``, a power of two times
    a float16 value, exact, and ``d*u + m`` is exact too). Scale and offset are stored as float16 where that
    holds them exactly (every legacy format); a k-quant's (``d*sc`` has up to 17 significant bits) in its two
    levels (:func:`scale_buffers`' ``k``: 4.625 bits per weight, as the source), else as float32. The result
    is checked against ``w`` (out, in), or against the form's own dequantization."""
    if form.block != BLOCK or form.bits is None or form.bits > bits or not fits((form.N, form.K)):
        return None
    lo, _ = form.q_range
    lo = 0 if lo >= 0 else -(1 << (bits - 1))
    u = form.q.astype(np.int32) - lo
    if u.min() < 0 or u.max() >= 1 << bits:
        return None
    d = form.scale
    m = (np.zeros_like(d) if form.offset is None else form.offset) + np.float32(lo) * d  # d*(u + lo) + offset
    with np.errstate(over="ignore"):
        small = (d.astype(np.float16).astype(np.float32) == d).all() and (m.astype(np.float16).astype(np.float32) == m).all()
    out = form.N
    if small:
        scale, offset = _lanes(d.astype(np.float16), out), _lanes(m.astype(np.float16), out)
    elif form.factors is not None and lo == 0 and form.K % (SUPER * BLOCK) == 0:  # a k-quant: its two levels
        dd, dmin, sc, mm = form.factors
        scale = _lanes(sc.astype(np.uint16) | (mm.astype(np.uint16) << np.uint16(8)), out)
        offset = np.ascontiguousarray(np.stack([_lanes(dd.astype(np.float16), out),
                                                _lanes((-dmin).astype(np.float16), out)], axis=2))
    else:
        scale, offset = _lanes(d, out), _lanes(m, out)  # float32
    q = QuantLinear(pack(u, bits), scale, offset, bits, form.kind)  # as the legacy grids: the source type
    ref = form.dequantize().T if w is None else w
    if not np.array_equal(q.dequantize(), ref):
        return None
    return q


def pack(v: np.ndarray, bits: int) -> np.ndarray:
    """(out, in) values in [0, 2^bits) -> words (out/32, in/per, 32) uint32."""
    out, k = v.shape
    per = 32 // bits
    fields = v.astype(np.uint32).reshape(out // GROUP, GROUP, k // per, per)  # o, j, kw, p
    words = np.zeros((out // GROUP, k // per, GROUP), np.uint32)
    for p in range(per):
        words |= fields[:, :, :, p].transpose(0, 2, 1) << np.uint32(bits * p)
    return words


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: (out, in) int32."""
    groups, kw, _ = words.shape
    per = 32 // bits
    v = np.stack([(words >> np.uint32(bits * p)) & np.uint32((1 << bits) - 1) for p in range(per)], -1)
    v = v.astype(np.int32)  # o, kw, j, p
    return np.ascontiguousarray(v.transpose(0, 2, 1, 3).reshape(groups * GROUP, kw * per))


def dequantize(words: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    """The (out, in) float32 weight: ``fl(fl(d * q) + m)`` per block, d and m as the kernels compute them."""
    v = unpack(words, bits).astype(np.float32)
    out, k = v.shape
    per_block = lambda a: a.astype(np.float32).transpose(0, 2, 1).reshape(out, k // BLOCK)  # noqa: E731
    if scale.dtype == np.uint16:  # two levels: d * sc and (-dmin) * m, in float32
        def sup(a):  # (out/32, in/256, 32) per super-block -> (out, in/32)
            return np.repeat(a.astype(np.float32).transpose(0, 2, 1).reshape(out, -1), SUPER, axis=1)

        d = sup(offset[:, :, 0]) * per_block(scale & np.uint16(0xFF))
        c = sup(offset[:, :, 1]) * per_block(scale >> np.uint16(8))
    else:
        d, c = per_block(scale), per_block(offset)
    return (v.reshape(out, k // BLOCK, BLOCK) * d[..., None] + c[..., None]).reshape(out, k)


# --------------------------------------------------------------------------------------------
# TIR kernels
# --------------------------------------------------------------------------------------------
SCALE_DTYPES = ("float16", "float32", "k")  # the scale / offset layouts below
SUPER = 8  # blocks of 32 per k-quant super-block (256 inputs): one d and one dmin


def scale_buffers(tasks: int, kb: int, scale_dtype: str) -> tuple[tuple[tuple, str], tuple[tuple, str]]:
    """((shape, dtype) of W.scale, (shape, dtype) of W.offset) for a weight of ``tasks`` groups of 32 outputs
    and ``kb`` blocks of 32 inputs: float16 / float32 d and m per block, or ``k``, the two levels of a k-quant
    source (``scale`` uint16: sc | m << 8 per block; ``offset`` float16 (tasks, kb/8, 2, 32): d, -dmin per
    super-block of 256 inputs)."""
    if scale_dtype == "k":
        return ((tasks, kb, GROUP), "uint16"), ((tasks, kb // SUPER, 2, GROUP), "float16")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    return ((tasks, kb, GROUP), scale_dtype), ((tasks, kb, GROUP), scale_dtype)


def _scale(T, scale_dtype: str, d, c, t, b, j, lanes: int = 1):
    """float32 (x lanes): block ``b``'s scale for output lane(s) ``j`` of task ``t``; a k-quant source's is
    ``d * sc``, exact in float32 (11 + 6 significant bits), which is gguf's own arithmetic."""
    ft = "float32" if lanes == 1 else f"float32x{lanes}"
    if scale_dtype != "k":
        return T.Cast(ft, d[t, b, j])
    mask = T.uint16(0xFF) if lanes == 1 else T.broadcast(T.uint16(0xFF), lanes)
    return T.Cast(ft, c[t, b // SUPER, 0, j]) * T.Cast(ft, T.bitwise_and(d[t, b, j], mask))


def _offset(T, scale_dtype: str, d, c, t, b, j, lanes: int = 1):
    """float32 (x lanes): block ``b``'s offset; a k-quant source's is ``(-dmin) * m``, exact in float32."""
    ft = "float32" if lanes == 1 else f"float32x{lanes}"
    if scale_dtype != "k":
        return T.Cast(ft, c[t, b, j])
    eight = T.uint16(8) if lanes == 1 else T.broadcast(T.uint16(8), lanes)
    return T.Cast(ft, c[t, b // SUPER, 1, j]) * T.Cast(ft, T.shift_right(d[t, b, j], eight))


def _field(T, word, bits: int, p):
    """Bit field p of a uint32 word, as float32. ``p`` is an unrolled loop variable, so the shift is a
    constant; the field is converted as a signed int (x86 has no vector unsigned convert before AVX-512)."""
    field = T.bitwise_and(T.shift_right(word, T.Cast("uint32", bits * p)), T.uint32((1 << bits) - 1))
    return T.Cast("float32", T.reinterpret("int32", field))


def _block_sums(T):
    """A TVMScript macro, ``block_sums(rows)``: ``sums[i, b]`` = the sum of ``x[0, i, 32b : 32b + 32]``, as
    eight lane sums added in one fixed order. Both kernels use it (with their own ``x``, ``sums``, ``part``
    and ``kb``), so a row's offset term has the same bits in either."""

    @T.macro(hygienic=False)
    def block_sums(rows):
        for i, b in T.grid(rows, kb):
            for l in T.vectorized(LANES):
                part[l] = x[0, i, b * BLOCK + l] + x[0, i, b * BLOCK + LANES + l] \
                    + x[0, i, b * BLOCK + 2 * LANES + l] + x[0, i, b * BLOCK + 3 * LANES + l]
            sums[i, b] = part[0] + part[1] + part[2] + part[3] + part[4] + part[5] + part[6] + part[7]

    return block_sums


def gemv_kernel(d_in: int, d_out: int, bits: int, scale_dtype: str = "float16"):
    """Decode: y (1, 1, out) = x (1, 1, in) @ W^T, W in the layout above.

    Parallel over groups of 32 outputs (4 registers of 8 lanes: four independent FMA chains hide the FMA
    latency); each group walks the input once, block by block. The blocks' input sums (for the offsets)
    are computed once per call, before the tasks split.
    """
    from tvm.script import tirx as T

    per, kb, tasks = 32 // bits, d_in // BLOCK, d_out // GROUP
    words_per_block = BLOCK // per
    g_n = GROUP // LANES
    block_sums = _block_sums(T)
    (d_shape, d_dtype), (c_shape, c_dtype) = scale_buffers(tasks, kb, scale_dtype)

    @T.prim_func(private=True)
    def qgemv(x: T.Buffer((1, 1, d_in), "float32"), w: T.Buffer((tasks, d_in // per, GROUP), "uint32"),
              d: T.Buffer(d_shape, d_dtype), c: T.Buffer(c_shape, c_dtype),
              y: T.Buffer((1, 1, d_out), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        sums = T.alloc_buffer((1, kb), "float32")  # each block's input sum, once, before the tasks split
        part = T.alloc_buffer((LANES,), "float32")
        block_sums(1)
        for t in T.parallel(tasks):
            tot = T.decl_buffer((g_n, LANES), "float32", scope="local")
            acc = T.decl_buffer((g_n, LANES), "float32", scope="local")
            for g in T.unroll(g_n):
                for l in T.vectorized(LANES):
                    tot[g, l] = T.float32(0)
            for b in range(kb):
                for g in T.unroll(g_n):
                    for l in T.vectorized(LANES):
                        acc[g, l] = T.float32(0)
                for kw in T.unroll(words_per_block):
                    for p in T.unroll(per):
                        for g in T.unroll(g_n):
                            for l in T.vectorized(LANES):
                                acc[g, l] = acc[g, l] + _field(T, w[t, b * words_per_block + kw, g * LANES + l], bits, p) \
                                    * x[0, 0, b * BLOCK + kw * per + p]
                for g in T.unroll(g_n):
                    for l in T.vectorized(LANES):
                        tot[g, l] = tot[g, l] + acc[g, l] * _scale(T, scale_dtype, d, c, t, b, g * LANES + l) \
                            + _offset(T, scale_dtype, d, c, t, b, g * LANES + l) * sums[0, b]
            for g in T.unroll(g_n):
                for l in T.vectorized(LANES):
                    y[0, 0, t * GROUP + g * LANES + l] = tot[g, l]

    return qgemv


def gemm_kernel(d_in: int, d_out: int, bits: int, scale_dtype: str = "float16"):
    """Prefill / verification: y (1, n, out) = x (1, n, in) @ W^T for any n.

    Each task unpacks a block of its 32 outputs' weights once into a small float buffer and runs the rows
    over it two at a time (eight accumulators), so the unpacking is shared by all rows and each weight
    load by two; up to ``DIRECT_ROWS`` rows (a verification) it unpacks per row pair straight into
    registers instead, which is cheaper than the buffer's stores and loads there. Per row, the arithmetic
    is the decode kernel's, in the same order (block sums included), so a row gives the same bits
    whichever kernel computes it.
    """
    from tvm.script import tirx as T

    per, kb, tasks = 32 // bits, d_in // BLOCK, d_out // GROUP
    words_per_block = BLOCK // per
    g_n = GROUP // LANES
    block_sums = _block_sums(T)
    (d_shape, d_dtype), (c_shape, c_dtype) = scale_buffers(tasks, kb, scale_dtype)

    @T.macro(hygienic=False)
    def zero_pair():
        for r in T.unroll(2):
            for g in T.unroll(g_n):
                for l in T.vectorized(LANES):
                    acc[r, g, l] = T.float32(0)

    @T.macro(hygienic=False)
    def add_pair(sdt):  # y[row] += acc * d + m * (the row's block sum), for the pair's rows that exist
        for r in T.unroll(2):
            if 2 * ip + r < n:
                for g in T.unroll(g_n):
                    for l in T.vectorized(LANES):
                        y[0, 2 * ip + r, t * GROUP + g * LANES + l] = y[0, 2 * ip + r, t * GROUP + g * LANES + l] \
                            + acc[r, g, l] * _scale(T, sdt, d, c, t, b, g * LANES + l) \
                            + _offset(T, sdt, d, c, t, b, g * LANES + l) * sums[2 * ip + r, b]

    @T.prim_func(private=True)
    def qgemm(var_x: T.handle, w: T.Buffer((tasks, d_in // per, GROUP), "uint32"),
              d: T.Buffer(d_shape, d_dtype), c: T.Buffer(c_shape, c_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (T.int64(1), n, T.int64(d_in)), "float32")
        y = T.match_buffer(var_y, (T.int64(1), n, T.int64(d_out)), "float32")
        sums = T.alloc_buffer((n, kb), "float32")
        part = T.alloc_buffer((LANES,), "float32")
        block_sums(n)
        for t in T.parallel(tasks):
            wf = T.decl_buffer((BLOCK, g_n, LANES), "float32", scope="local")
            acc = T.decl_buffer((2, g_n, LANES), "float32", scope="local")
            wv = T.decl_buffer((g_n, LANES), "float32", scope="local")
            for i in range(n):
                for g in T.unroll(g_n):
                    for l in T.vectorized(LANES):
                        y[0, i, t * GROUP + g * LANES + l] = T.float32(0)
            for b in range(kb):
                if n <= DIRECT_ROWS:  # few rows (verification): unpack per row pair, straight into registers
                    for ip in range((n + 1) // 2):
                        zero_pair()
                        for kw in T.unroll(words_per_block):
                            for p in T.unroll(per):
                                for g in T.unroll(g_n):
                                    for l in T.vectorized(LANES):
                                        wv[g, l] = _field(T, w[t, b * words_per_block + kw, g * LANES + l], bits, p)
                                for r in T.unroll(2):
                                    for g in T.unroll(g_n):
                                        for l in T.vectorized(LANES):
                                            acc[r, g, l] = acc[r, g, l] + wv[g, l] \
                                                * x[0, T.min(2 * ip + r, n - 1), b * BLOCK + kw * per + p]
                        add_pair(scale_dtype)  # a macro sees only its caller's names: pass the layout
                    continue
                for kw in T.unroll(words_per_block):
                    for p in T.unroll(per):
                        for g in T.unroll(g_n):
                            for l in T.vectorized(LANES):
                                wf[kw * per + p, g, l] = _field(T, w[t, b * words_per_block + kw, g * LANES + l], bits, p)
                for ip in range((n + 1) // 2):
                    zero_pair()
                    for j in T.unroll(BLOCK):
                        for r in T.unroll(2):
                            for g in T.unroll(g_n):
                                for l in T.vectorized(LANES):
                                    acc[r, g, l] = acc[r, g, l] + wf[j, g, l] * x[0, T.min(2 * ip + r, n - 1), b * BLOCK + j]
                    add_pair(scale_dtype)

    return qgemm


# --------------------------------------------------------------------------------------------
# int8 activations (AVX512-VNNI): the 4-bit projections and the 8-bit head
# --------------------------------------------------------------------------------------------
VNNI_FLAG = "avx512_vnni"  # /proc/cpuinfo's name for what these kernels need
VNNI_DOT = "llvm.x86.avx512.vpdpbusd.512"  # 16 lanes: lane += sum of 4 products of u8 (weight) by s8 (input)


def _quantize_rows(T, d_in: int, bits: int):
    """A TVMScript macro, ``quantize_rows(x, rows, xq, dx)``: each row's blocks of 32 inputs rounded to int8
    with their own scale ``dx[i, b] = max|x| / 127``. For 4-bit weights, within a word's 8 inputs the even
    ones come first, then the odd ones, which is how :func:`_dot` finds them (low nibbles, then high
    ones); for 8-bit weights they stay in order (a word's four bytes are four consecutive inputs)."""
    kb = d_in // BLOCK
    at = (lambda o: o // 8 * 8 + o % 4 * 2 + o % 8 // 4) if bits == 4 else (lambda o: o)

    @T.macro
    def quantize_rows(x, rows, xq, dx):
        for i, b in T.grid(rows, kb):
            m16 = T.decl_buffer((16,), "float32", scope="local")
            mx = T.decl_buffer((1,), "float32", scope="local")
            for l in T.vectorized(16):
                m16[l] = T.max(T.abs(x[0, i, b * BLOCK + l]), T.abs(x[0, i, b * BLOCK + 16 + l]))
            mx[0] = m16[0]
            for l in T.unroll(1, 16):
                mx[0] = T.max(mx[0], m16[l])
            dx[i, b] = mx[0] / T.float32(127)
            for o in T.vectorized(BLOCK):  # 4 bits: o = 8 kw + 4 h + j takes input 8 kw + 2 j + h
                xq[i, b * BLOCK + o] = T.Cast("int8", T.round(
                    x[0, i, b * BLOCK + at(o)]
                    * T.if_then_else(mx[0] > T.float32(0), T.float32(127) / mx[0], T.float32(0))))

    return quantize_rows


def _dot(T, bits: int, w, t, b, xq, row, half):
    """int32x16: block ``b``'s exact integer dot products of outputs ``32 t + 16 half + [0, 16)`` with row
    ``row`` of ``xq``, one VNNI instruction per word. 4 bits: per word, the low nibbles (inputs 0, 2, 4, 6)
    and the high ones (1, 3, 5, 7) each meet four packed inputs; 8 bits: a word's four bytes meet four
    consecutive inputs as they are. One expression, not a buffer updated word by word: the compiler cannot
    tell a local buffer from the inputs it reads, and stored every partial sum (one store per VNNI op)."""
    from tvm import tirx

    per = 32 // bits
    lanes = tirx.Ramp(half * 16, 1, 16)
    acc = T.broadcast(T.int32(0), 16)
    for kw in range(BLOCK // per):
        word = tirx.BufferLoad(w, [t, b * (BLOCK // per) + kw, lanes])
        for h in range(per // 4):  # 2 nibble planes, or the bytes
            plane = word if bits == 8 else T.bitwise_and(T.shift_right(word, T.broadcast(T.uint32(4 * h), 16)),
                                                         T.broadcast(T.uint32(0x0F0F0F0F), 16))
            four = tirx.BufferLoad(xq, [row, tirx.Ramp(b * BLOCK + kw * per + h * 4, 1, 4)])
            acc = T.call_llvm_pure_intrin("int32x16", VNNI_DOT, acc, T.reinterpret("int8x64", plane),
                                          T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", four), 16)))
    return acc


def _add_block(T, y, acc, d, c, dx, total):
    """float32x16: ``y + acc * (d * dx) + m * sum(x)``, a block's share of 16 outputs (``d``, ``m``: float32x16
    from :func:`_scale` / :func:`_offset`). Both kernels use it, so a row gives the same bits in either."""
    return y + T.Cast("float32x16", acc) * (d * T.broadcast(dx, 16)) + c * T.broadcast(total, 16)


def gemv_int8_kernel(d_in: int, d_out: int, bits: int = 4, scale_dtype: str = "float16"):
    """Decode with int8 activations: y (1, 1, out) ~= x @ W^T for 4- or 8-bit W in the layout above.

    x is rounded to int8 per block of 32 (:func:`_quantize_rows`), the block's dot products are exact
    int32 (:func:`_dot`), and the block adds ``acc * d * dx + m * sum(x)`` (the offset term uses the exact
    float sum). About ten times fewer instructions per weight than the float kernel, whose 4-bit path is
    bound by arithmetic on one core; this one is bound by memory. Needs AVX512-VNNI.
    """
    from tvm.script import tirx as T

    kb, tasks = d_in // BLOCK, d_out // GROUP
    block_sums, quantize_rows = _block_sums(T), _quantize_rows(T, d_in, bits)
    (d_shape, d_dtype), (c_shape, c_dtype) = scale_buffers(tasks, kb, scale_dtype)

    @T.prim_func(private=True)
    def qgemv_i8(x: T.Buffer((1, 1, d_in), "float32"), w: T.Buffer((tasks, d_in * bits // 32, GROUP), "uint32"),
                 d: T.Buffer(d_shape, d_dtype), c: T.Buffer(c_shape, c_dtype),
                 y: T.Buffer((1, 1, d_out), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        sums = T.alloc_buffer((1, kb), "float32")
        part = T.alloc_buffer((LANES,), "float32")
        xq = T.alloc_buffer((1, d_in), "int8")
        dx = T.alloc_buffer((1, kb), "float32")
        block_sums(1)
        quantize_rows(x, 1, xq, dx)
        for t in T.parallel(tasks):
            tot = T.decl_buffer((GROUP,), "float32", scope="local")
            for l in T.vectorized(GROUP):
                tot[l] = T.float32(0)
            for b in range(kb):
                for half in T.unroll(2):
                    tot[T.ramp(half * 16, 1, 16)] = _add_block(
                        T, tot[T.ramp(half * 16, 1, 16)], _dot(T, bits, w, t, b, xq, 0, half),
                        _scale(T, scale_dtype, d, c, t, b, T.ramp(half * 16, 1, 16), 16),
                        _offset(T, scale_dtype, d, c, t, b, T.ramp(half * 16, 1, 16), 16), dx[0, b], sums[0, b])
            for l in T.vectorized(GROUP):
                y[0, 0, t * GROUP + l] = tot[l]

    return qgemv_i8


def gemm_int8_kernel(d_in: int, d_out: int, bits: int = 4, scale_dtype: str = "float16"):
    """Prefill / verification with int8 activations, any number of rows: per row, exactly the arithmetic
    of :func:`gemv_int8_kernel` in the same order, so a row gives the decode kernel's bits. Rows go through
    each block in pairs, in one basic block, so a pair shares each word's load and unpacking (an odd last
    row pairs with itself; four rows at a time kept 16 unpacked planes live and spilled: slower, measured)."""
    from tvm.script import tirx as T

    kb, tasks = d_in // BLOCK, d_out // GROUP
    block_sums, quantize_rows = _block_sums(T), _quantize_rows(T, d_in, bits)
    (d_shape, d_dtype), (c_shape, c_dtype) = scale_buffers(tasks, kb, scale_dtype)

    @T.prim_func(private=True)
    def qgemm_i8(var_x: T.handle, w: T.Buffer((tasks, d_in * bits // 32, GROUP), "uint32"),
                 d: T.Buffer(d_shape, d_dtype), c: T.Buffer(c_shape, c_dtype),
                 var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (T.int64(1), n, T.int64(d_in)), "float32")
        y = T.match_buffer(var_y, (T.int64(1), n, T.int64(d_out)), "float32")
        sums = T.alloc_buffer((n, kb), "float32")
        part = T.alloc_buffer((LANES,), "float32")
        xq = T.alloc_buffer((n, d_in), "int8")
        dx = T.alloc_buffer((n, kb), "float32")
        block_sums(n)
        quantize_rows(x, n, xq, dx)
        for t in T.parallel(tasks):
            for i in range(n):
                for l in T.vectorized(GROUP):
                    y[0, i, t * GROUP + l] = T.float32(0)
            acc = T.decl_buffer((2 * GROUP,), "int32", scope="local")
            for b, ip in T.grid(kb, (n + 1) // 2):
                for r in T.unroll(2):  # one basic block: the pair shares the loads and the unpacking
                    for half in T.unroll(2):
                        acc[T.ramp(r * GROUP + half * 16, 1, 16)] = _dot(
                            T, bits, w, t, b, xq, T.min(2 * ip + r, n - 1), half)
                for r in T.unroll(2):
                    if 2 * ip + r < n:
                        for half in T.unroll(2):
                            y[0, 2 * ip + r, T.ramp(t * GROUP + half * 16, 1, 16)] = _add_block(
                                T, y[0, 2 * ip + r, T.ramp(t * GROUP + half * 16, 1, 16)],
                                acc[T.ramp(r * GROUP + half * 16, 1, 16)],
                                _scale(T, scale_dtype, d, c, t, b, T.ramp(half * 16, 1, 16), 16),
                                _offset(T, scale_dtype, d, c, t, b, T.ramp(half * 16, 1, 16), 16),
                                dx[2 * ip + r, b], sums[2 * ip + r, b])

    return qgemm_i8


def embed_kernel(vocab: int, hidden: int, bits: int, scale_dtype: str = "float16"):
    """out (1, n, hidden) = the dequantized rows ``ids`` (n,) of a (vocab, hidden) table in the layout above."""
    from tvm.script import tirx as T

    per, kb, groups = 32 // bits, hidden // BLOCK, vocab // GROUP
    (d_shape, d_dtype), (c_shape, c_dtype) = scale_buffers(groups, kb, scale_dtype)

    @T.prim_func(private=True)
    def qembed(var_ids: T.handle, w: T.Buffer((groups, hidden // per, GROUP), "uint32"),
               d: T.Buffer(d_shape, d_dtype), c: T.Buffer(c_shape, c_dtype),
               var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        ids = T.match_buffer(var_ids, (n,), "int32")
        out = T.match_buffer(var_out, (T.int64(1), n, T.int64(hidden)), "float32")
        for i, k in T.grid(n, T.int64(hidden)):
            row = T.Cast("int64", ids[i])
            word = w[row // GROUP, k // per, row % GROUP]
            field = T.bitwise_and(T.shift_right(word, T.Cast("uint32", (k % per) * bits)), T.uint32((1 << bits) - 1))
            out[0, i, k] = T.Cast("float32", T.reinterpret("int32", field)) \
                * _scale(T, scale_dtype, d, c, row // GROUP, k // BLOCK, row % GROUP) \
                + _offset(T, scale_dtype, d, c, row // GROUP, k // BLOCK, row % GROUP)

    return qembed
