"""A GGUF file's own quantization blocks, decoded into exact per-block forms and found again from the float
weights a compiler pass sees.

A GGUF weight (rows = outputs, each row contiguous along the inputs) is stored in blocks along its rows. For
every format this module reads, each block dequantizes, in float32 exactly as ``gguf.quants`` computes it, as

    w = fl(fl(scale * q) + offset)        (no offset: w = fl(scale * q))

with integer codes ``q`` (int8) and one float32 ``scale`` / ``offset`` per block of ``block`` inputs:

    type   block  q            scale (float32, exact)       offset                 source formula (gguf-py)
    Q4_0   32     [-8, 7]      d                            -                      d * (q4 - 8)
    Q4_1   32     [0, 15]      d                            m                      d * q + m
    Q5_0   32     [-16, 15]    d                            -                      d * (q5 - 16)
    Q5_1   32     [0, 31]      d                            m                      d * q + m
    Q8_0   32     [-127, 127]  d                            -                      q * d
    Q4_K   32     [0, 15]      d * sc  (sc 6-bit)           -(dmin * m)  (m 6-bit)  (d*sc) * q - (dmin*m)
    Q5_K   32     [0, 31]      d * sc                       -(dmin * m)            (d*sc) * q - (dmin*m)
    Q6_K   16     [-32, 31]    d * sc  (sc int8)            -                      (d*sc) * q

(d, dmin, m of the legacy formats: float16.) ``d * sc`` and ``dmin * m`` are exact in float32 (11 + 8
significant bits), so the form reproduces gguf's dequantization bit for bit, which is also what
transformers' GGUF loader hands the compiler (it calls ``gguf.dequantize``; only Llama's q/k rows are
permuted, which moves whole rows).

Matching, with no tensor names: the passes see a weight as a (K, N) MatMul initializer (transposed, maybe
q/k/v or gate/up concatenated along N, rows permuted), the TVM target as (out, in). Every such layout keeps
each GGUF row whole, as one column of the (K, N) weight. So :func:`exact_blocks` keys every row of every
quantized tensor by a 64-bit hash of its first, middle and last 32 dequantized values (only three
blocks of each row are decoded: ~0.8M rows for a 1.5B model, a few MB), and :meth:`BlockIndex.lookup`
hashes each column of a weight the same way, decodes the rows it finds and checks that the form
reproduces the column exactly (``==`` in float32; -0.0 and +0.0 compare equal). A column whose row is not
found, or found but not reproduced (a hash collision, a row that is not a GGUF row), makes the lookup
return None with the reason: the caller falls back to its own quantizer and records it.

API (what the ``int4`` pass and the TVM targets call)::

    index = exact_blocks(gguf_path)            # BlockIndex; empty when the file has no block-quantized tensor
    form = index.lookup(w_kn)                  # BlockForm | None   (w: (K, N) float32, K = inputs)
    form, why = index.find(w_kn)               # the same, with the reason when None
    form.dequantize()                          # (K, N) float32, equal to w_kn
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KEY_VALUES = 32  # values hashed at each end of a row
VERIFY_CHUNK = 4096  # columns decoded and checked at a time (bounds the memory of a 150k-row head)
RETRIES = 64  # other rows tried for a column whose key several rows share and whose first guess is wrong


# ------------------------------------------------------------------------------------------------
# Decoders: raw blocks (n, type_size) uint8 -> q (n, values) int8, scale / offset (n, sub-blocks) float32
# ------------------------------------------------------------------------------------------------
def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[:, 0]


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """gguf's nibble order: per ``group`` bytes, the low nibbles give ``group`` values, then the high ones."""
    n = qs.shape[0]
    v = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (v & np.uint8(0x0F)).reshape(n, -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """The 32 fifth bits of a Q5_0 / Q5_1 block (uint32, little endian), as 0/1 uint8 (n, 32)."""
    h = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    return (h & np.uint32(1)).astype(np.uint8)


def _q4_0(b):
    return (_nibbles(b[:, 2:], 16).astype(np.int8) - 8), _f16(b[:, 0:2])[:, None], None


def _q4_1(b):
    return _nibbles(b[:, 4:], 16).astype(np.int8), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5_0(b):
    q = _nibbles(b[:, 6:], 16) | (_high_bits(b[:, 2:6]) << np.uint8(4))
    return q.astype(np.int8) - 16, _f16(b[:, 0:2])[:, None], None


def _q5_1(b):
    q = _nibbles(b[:, 8:], 16) | (_high_bits(b[:, 4:8]) << np.uint8(4))
    return q.astype(np.int8), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, 0:2])[:, None], None


def _k_scales(b):
    """d, dmin and the eight 6-bit (sc, m) of a Q4_K / Q5_K super-block, as (d * sc, -(dmin * m)) float32."""
    from gguf.quants import Q4_K

    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return d[:, None] * sc.astype(np.float32), -(dmin[:, None] * m.astype(np.float32))


def k_factors(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of Q4_K / Q5_K super-blocks (rows, bytes) -> d, dmin (rows, K/256) float32 (float16 values) and
    the 6-bit sc, m (rows, K/32) uint8: the form's ``scale = d*sc`` and ``offset = -(dmin*m)`` in two levels."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    size = {"Q4_K": 144, "Q5_K": 176}[type_name]
    b = np.ascontiguousarray(raw).reshape(-1, size)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return (_f16(b[:, 0:2]).reshape(rows, -1), _f16(b[:, 2:4]).reshape(rows, -1),
            sc.astype(np.uint8).reshape(rows, -1), m.astype(np.uint8).reshape(rows, -1))


def _q4_k(b):
    scale, offset = _k_scales(b)
    return _nibbles(b[:, 16:], 32).astype(np.int8), scale, offset


def _q5_k(b):
    scale, offset = _k_scales(b)
    n = b.shape[0]
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = ql | ((qh & np.uint8(1)) << np.uint8(4))
    return q.reshape(n, 256).astype(np.int8), scale, offset


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    lo = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    hi = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(0x03)
    q = (lo.reshape(n, -1, 32) | (hi.reshape(n, -1, 32) << np.uint8(4))).astype(np.int8) - 32
    return q.reshape(n, 256), d[:, None] * sc, None


# type name: (values per GGUF block, values per scale, decoder)
FORMATS = {
    "Q4_0": (32, 32, _q4_0), "Q4_1": (32, 32, _q4_1), "Q5_0": (32, 32, _q5_0), "Q5_1": (32, 32, _q5_1),
    "Q8_0": (32, 32, _q8_0), "Q4_K": (256, 32, _q4_k), "Q5_K": (256, 32, _q5_k), "Q6_K": (256, 16, _q6_k),
}


def decode(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of raw GGUF blocks (rows, bytes) -> q (rows, values) int8, scale and offset (rows, values /
    block) float32 (offset None for formats without one)."""
    fn = FORMATS[type_name][2]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]
    rows = raw.shape[0]
    q, scale, offset = fn(np.ascontiguousarray(raw).reshape(-1, size))
    shape = lambda a: a.reshape(rows, -1)
    return shape(q), shape(scale).astype(np.float32), None if offset is None else shape(offset).astype(np.float32)


def reconstruct(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """fl(fl(scale * q) + offset) per block, in float32: (rows, values)."""
    rows, k = q.shape
    blocks = scale.shape[1]
    w = q.reshape(rows, blocks, k // blocks).astype(np.float32) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    return w.reshape(rows, k)


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------
_MIX = np.random.default_rng(0x9E3779B9).integers(1, 2**63, size=3 * KEY_VALUES, dtype=np.uint64) | np.uint64(1)


def _middle(K: int) -> int:
    """Where a row's middle key values start: a multiple of 256, so a block start in every format."""
    return (K // 2) // 256 * 256


def row_keys(first: np.ndarray, middle: np.ndarray, last: np.ndarray) -> np.ndarray:
    """64-bit keys of rows from their first, middle (from :func:`_middle`) and last ``KEY_VALUES`` float32
    values (n, 32) each; -0.0 and +0.0 hash alike (they compare equal)."""
    v = np.concatenate([first, middle, last], axis=1).astype(np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    bits = v.view(np.uint32).astype(np.uint64)
    h = (bits * _MIX).sum(axis=1, dtype=np.uint64)  # wraps modulo 2^64
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return h


@dataclass
class BlockForm:
    """A (K, N) weight's exact per-block form: ``W[k, n] = fl(fl(scale[n, b] * q[n, k]) + offset[n, b])`` with
    ``b = k // block``; (N, ...) layouts, blocks along K (the inputs), as MatMulNBits stores them."""

    q: np.ndarray  # (N, K) int8
    scale: np.ndarray  # (N, K // block) float32
    offset: np.ndarray | None  # (N, K // block) float32, None: no offset
    block: int
    sources: dict = field(default_factory=dict)  # GGUF type -> columns taken from it
    # Q4_K / Q5_K only: the two levels, scale = d[:, b // 8] * sc and offset = -(dmin[:, b // 8] * m):
    # (d, dmin (N, K/256) float32 holding float16 values, sc, m (N, K/32) uint8 of 6 bits), else None
    factors: tuple | None = None

    @property
    def K(self) -> int:
        return self.q.shape[1]

    @property
    def N(self) -> int:
        return self.q.shape[0]

    @property
    def q_range(self) -> tuple[int, int]:
        return int(self.q.min()), int(self.q.max())

    @property
    def bits(self) -> int | None:
        """The fewest of 4 or 8 bits that hold every code as an unsigned value, or None."""
        lo, hi = self.q_range
        return 4 if hi - lo < 16 else 8 if hi - lo < 256 else None

    @property
    def kind(self) -> str:
        return "+".join(sorted(self.sources))

    def dequantize(self) -> np.ndarray:
        """(K, N) float32, bit for bit the GGUF dequantization (up to the sign of zeros)."""
        return np.ascontiguousarray(reconstruct(self.q, self.scale, self.offset).T)

    def with_block(self, block: int) -> BlockForm:
        """The same form with smaller blocks (``block`` divides this one's): each scale repeated."""
        if block == self.block:
            return self
        if self.block % block:
            raise ValueError(f"block {block} does not divide {self.block}")
        r = self.block // block
        rep = lambda a: None if a is None else np.repeat(a, r, axis=1)
        return BlockForm(self.q, rep(self.scale), rep(self.offset), block, dict(self.sources))  # no factors


@dataclass
class _Tensor:
    name: str
    type_name: str
    rows: int
    K: int
    raw: np.ndarray  # (rows, bytes per row) uint8, a view of the file's memory map


class BlockIndex:
    """Every row of a GGUF file's block-quantized tensors, keyed by :func:`row_keys`; see the module docstring."""

    def __init__(self, path: str | Path | None = None, tensors: list[_Tensor] | None = None):
        self.path = str(path) if path is not None else None
        self.tensors = tensors or []
        keys, where = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
        for i, t in enumerate(self.tensors):
            per_block = FORMATS[t.type_name][0]
            size = t.raw.shape[1] * per_block // t.K  # bytes per GGUF block
            first = self._dequantize(t, t.raw[:, :size])[:, :KEY_VALUES]
            at = _middle(t.K) // per_block * size
            middle = self._dequantize(t, t.raw[:, at:at + size])[:, :KEY_VALUES]
            last = self._dequantize(t, t.raw[:, -size:])[:, -KEY_VALUES:]
            keys.append(row_keys(first, middle, last))
            where.append((np.int64(i) << np.int64(32)) | np.arange(t.rows, dtype=np.int64))
        keys_all, where_all = np.concatenate(keys), np.concatenate(where)
        order = np.argsort(keys_all, kind="stable")
        self.keys, self.where = keys_all[order], where_all[order]

    @staticmethod
    def _dequantize(t: _Tensor, raw: np.ndarray) -> np.ndarray:
        return reconstruct(*decode(raw, t.type_name))  # equal to gguf.dequantize (tests/passes/test_kquant.py)

    def _guess(self, cand: np.ndarray, ambiguous: np.ndarray, K: int) -> np.ndarray:
        """Rows for columns whose key several rows share: the row that continues the nearest unambiguous
        column's run (a weight's columns are runs of consecutive rows), else the first such row."""
        N = len(cand)
        sure = np.ones(N, bool)
        sure[ambiguous] = False
        if not sure.any():
            return cand[ambiguous]
        prev = np.maximum.accumulate(np.where(sure, np.arange(N), -1))[ambiguous]
        nxt = np.minimum.accumulate(np.where(sure, np.arange(N), N)[::-1])[::-1][ambiguous]
        base = np.where(prev >= 0, prev, nxt)
        guess = cand[base] + (ambiguous - base)
        rows = np.array([t.rows for t in self.tensors])[(cand[base] >> 32).astype(np.int64)]
        inside = ((guess & 0xFFFFFFFF) < rows) & (guess >> 32 == cand[base] >> 32)
        return np.where(inside, guess, cand[ambiguous])

    def __len__(self) -> int:
        return len(self.keys)

    def types(self) -> dict[str, int]:
        """{GGUF type: tensors} of the indexed tensors."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + 1
        return out

    def lookup(self, w: np.ndarray) -> BlockForm | None:
        """The exact form of a (K, N) float32 weight whose columns are rows of this GGUF, or None."""
        return self.find(w)[0]

    def lookup_out_in(self, w: np.ndarray) -> BlockForm | None:
        """:meth:`lookup` for an (out, in) weight (Hugging Face's / the TVM targets' layout)."""
        return self.find(np.asarray(w).T)[0]

    def find(self, w: np.ndarray) -> tuple[BlockForm | None, str]:
        """(form, "") or (None, why not)."""
        w = np.asarray(w)
        if w.ndim != 2 or w.dtype != np.float32:
            return None, f"not a 2-D float32 weight ({w.dtype}, shape {w.shape})"
        K, N = w.shape
        if not len(self.keys):
            return None, "the source has no block-quantized tensor"
        if K < KEY_VALUES:
            return None, f"{K} inputs is fewer than one block"
        mid = _middle(K)
        keys = row_keys(np.ascontiguousarray(w[:KEY_VALUES].T), np.ascontiguousarray(w[mid:mid + KEY_VALUES].T),
                        np.ascontiguousarray(w[-KEY_VALUES:].T))
        lo = np.searchsorted(self.keys, keys, "left")
        hi = np.searchsorted(self.keys, keys, "right")
        missing = int((lo == hi).sum())
        if missing:
            return None, f"{missing} of {N} columns are no GGUF row"
        cand = self.where[lo]
        ambiguous = np.flatnonzero(hi - lo > 1)
        if len(ambiguous):
            cand[ambiguous] = self._guess(cand, ambiguous, K)
        tid = (cand >> 32).astype(np.int64)
        lengths = np.array([t.K for t in self.tensors])[tid]
        if (lengths != K).any():
            return None, f"{int((lengths != K).sum())} columns match GGUF rows of another length"
        types = sorted({self.tensors[i].type_name for i in np.unique(tid)})
        block = min(FORMATS[t][1] for t in types)
        with_offset = any(FORMATS[t][2] in (_q4_1, _q5_1, _q4_k, _q5_k) for t in types)
        q = np.empty((N, K), np.int8)
        scale = np.empty((N, K // block), np.float32)
        offset = np.zeros((N, K // block), np.float32) if with_offset else None
        two_level = set(types) <= {"Q4_K", "Q5_K"}
        factors = (np.empty((N, K // 256), np.float32), np.empty((N, K // 256), np.float32),
                   np.empty((N, K // 32), np.uint8), np.empty((N, K // 32), np.uint8)) if two_level else None

        def fill(cols: np.ndarray, cands: np.ndarray) -> None:
            for i in np.unique(cands >> 32):
                t = self.tensors[int(i)]
                pick = cands >> 32 == i
                c, rows = cols[pick], (cands[pick] & 0xFFFFFFFF).astype(np.int64)
                for start in range(0, len(c), VERIFY_CHUNK):
                    tq, ts, to = decode(t.raw[rows[start:start + VERIFY_CHUNK]], t.type_name)
                    r = FORMATS[t.type_name][1] // block
                    cc = c[start:start + VERIFY_CHUNK]
                    q[cc] = tq
                    scale[cc] = np.repeat(ts, r, axis=1)
                    if offset is not None:
                        offset[cc] = 0.0 if to is None else np.repeat(to, r, axis=1)
                    if factors is not None:
                        for part, got in zip(factors, k_factors(t.raw[rows[start:start + VERIFY_CHUNK]], t.type_name)):
                            part[cc] = got

        def wrong(cols: np.ndarray) -> np.ndarray:
            bad = []
            for start in range(0, len(cols), VERIFY_CHUNK):
                c = cols[start:start + VERIFY_CHUNK]
                rebuilt = reconstruct(q[c], scale[c], None if offset is None else offset[c])
                bad.append(c[(rebuilt != w[:, c].T).any(axis=1)])
            return np.concatenate(bad) if bad else np.zeros(0, np.int64)

        fill(np.arange(N), cand)
        bad = wrong(np.arange(N))
        retry = bad[np.isin(bad, ambiguous)]
        for j in range(RETRIES):  # the other rows sharing the key, in file order
            retry = retry[lo[retry] + j < hi[retry]]
            if not len(retry):
                break
            options = self.where[lo[retry] + j]
            fits = np.array([self.tensors[int(o >> 32)].K == K
                             and FORMATS[self.tensors[int(o >> 32)].type_name][1] % block == 0 for o in options], bool)
            retry, options = retry[fits], options[fits]
            cand[retry] = options
            fill(retry, options)
            retry = wrong(retry)
        bad = wrong(bad)
        if len(bad):
            return None, f"{len(bad)} of {N} columns found in the GGUF are not reproduced exactly"
        tid = cand >> 32
        sources: dict[str, int] = {}
        for i in np.unique(tid):
            name = self.tensors[int(i)].type_name
            sources[name] = sources.get(name, 0) + int((tid == i).sum())
        form = BlockForm(q, scale, offset, block, sources, factors)
        return form, ""


def tensor_table(gguf_path: str | Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, GGML type name, shape as ``ne`` (ne[0] = the contiguous inputs), byte offset in the file) of every
    tensor. The same table ``gguf.GGUFReader`` builds, without decoding the metadata's values (a 150k-token
    vocabulary takes GGUFReader ~35 s to parse; this walk skips it in well under a second)."""
    import struct

    from gguf import GGMLQuantizationType

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(gguf_path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        buf, pos = bytearray(head), 24

        def need(n):
            nonlocal buf
            while len(buf) < pos + n:
                more = f.read(max(1 << 20, n))
                if not more:
                    raise ValueError(f"{gguf_path} is truncated")
                buf += more

        def u(fmt, n):
            nonlocal pos
            need(n)
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += n
            return v

        def string():
            nonlocal pos
            n = u("<Q", 8)
            need(n)
            v = bytes(buf[pos:pos + n])
            pos += n
            return v

        def skip(vtype):
            nonlocal pos
            if vtype == 8:
                string()
            elif vtype == 9:
                item, count = u("<I", 4), u("<Q", 8)
                if item in sizes:
                    need(sizes[item] * count)
                    pos += sizes[item] * count
                else:
                    for _ in range(count):
                        skip(item)
            elif vtype in sizes:
                need(sizes[vtype])
                pos += sizes[vtype]
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        alignment = 32
        for _ in range(n_kv):
            key, vtype = string(), u("<I", 4)
            if key == b"general.alignment" and vtype == 4:
                alignment = u("<I", 4)
            else:
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string().decode()
            dims = tuple(u("<Q", 8) for _ in range(u("<I", 4)))
            ttype, offset = u("<I", 4), u("<Q", 8)
            infos.append((name, GGMLQuantizationType(ttype).name, dims, offset))
    start = pos + (-pos) % alignment
    return [(n, t, d, start + o) for n, t, d, o in infos]


def exact_blocks(gguf_path: str | Path) -> BlockIndex:
    """Index the block-quantized tensors of a GGUF file (types in :data:`FORMATS`; others, F32/F16 included,
    are left out). The tensors stay memory-mapped: keep the index only while it is used."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    data = np.memmap(str(gguf_path), np.uint8, mode="r")
    tensors = []
    for name, type_name, shape, offset in tensor_table(gguf_path):
        if type_name not in FORMATS or not shape:
            continue
        K = int(shape[0])
        per_block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
        if K % per_block:
            continue
        rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        nbytes = rows * K // per_block * size
        if offset + nbytes > data.size:
            raise ValueError(f"{gguf_path}: tensor {name} runs past the end of the file")
        tensors.append(_Tensor(name, type_name, rows, K, data[offset:offset + nbytes].reshape(rows, -1)))
    index = BlockIndex(gguf_path, tensors)
    log.info("indexed %d rows of %d block-quantized tensors in %s (%s)", len(index), len(tensors),
             Path(gguf_path).name, ", ".join(f"{k} {v}" for k, v in sorted(index.types().items())))
    return index
