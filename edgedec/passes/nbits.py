"""Rewrite float weight MatMuls (and embedding Gathers on a tied table) into ONNX Runtime's block-wise
quantized contrib ops, from a per-weight plan. Shared by the ``int4`` and ``int8`` passes.

For a weight ``W`` (K, N) quantized as :class:`~edgedec.passes.blockwise.BlockQuant`:

    MatMul(x, W)                  ->  MatMulNBits(x, B, scales[, zero_points])     K, N, bits, block_size,
                                                                                   accuracy_level
    MatMul(h, Transpose(E))       ->  the same, with W = E^T (E (vocab, hidden) is a tied LM head)
    Gather(E, ids)                ->  GatherBlockQuantized(Reshape(B, (vocab, -1)), ids, scales[, zp])
                                      gather_axis 0, quantize_axis 1: the head's quantized table, shared

A weight with per-block ``offsets`` (a float zero point: an exact GGUF Q4_1 grid, or HQQ) also gets its
block-sum correction:

    y = MatMulNBits(x, ...) + (x @ S) @ O        S (K, k_blocks): 1 where row k lies in block b
                                                 O (k_blocks, N): the offsets
    e = GatherBlockQuantized(...) + Gather(O^T, ids) @ S^T

since ``sum_k x_k (w_kn + o_{b(k),n}) = sum_k x_k w_kn + sum_b (sum_{k in b} x_k) o_bn``. ``x @ S``
(the block sums of x) is computed once per activation and shared by the MatMuls that read it (q, k, v;
gate, up). All of it is exact in float32 up to summation order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import blockwise as bw
from .base import PassError
from .quant_graph import (CORRECTION_ROLE, MS_DOMAIN, GraphIndex, embedding_gathers, ensure_ms_opset, rewrite_nodes,
                          set_role, unique_name, weight_matmuls)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightPlan:
    """How to quantize one weight: a fresh quantizer, unless ``grids`` finds the source's exact grid."""

    bits: int
    block_size: int
    symmetric: bool = False
    algorithm: str = "rtn"
    grids: tuple[str, ...] = ()  # GGUF grids to look for first ("Q4_0", "Q4_1", "Q8_0"), in this order
    round_offsets: bool = False  # fold float offsets into integer zero points (no block-sum correction)
    widen: bool = True  # an exact source form with more bits than ``bits`` is stored in 8 bits (else re-rounded)


@dataclass
class WeightUse:
    """One float weight initializer and every node reading it."""

    name: str
    matmuls: list  # [WeightMatMul]
    gathers: list  # [NodeProto] embedding lookups on the same table
    K: int
    N: int

    @property
    def is_head(self) -> bool:
        return any(m.is_head for m in self.matmuls)

    @property
    def is_table(self) -> bool:
        """The LM head or an embedding table (what a pass's ``lm_head`` setting governs)."""
        return self.is_head or bool(self.gathers) or any(m.transposed for m in self.matmuls)


def weight_uses(idx: GraphIndex) -> list[WeightUse]:
    """Group the graph's float weight MatMuls and embedding Gathers by initializer, in graph order.

    A table read only by Gathers (an untied embedding) is not listed: quantizing it saves disk but no
    decode time, and the passes leave it as it is.
    """
    uses: dict[str, WeightUse] = {}
    for m in weight_matmuls(idx):
        t = idx.inits[m.weight]
        K, N = (t.dims[1], t.dims[0]) if m.transposed else (t.dims[0], t.dims[1])
        use = uses.setdefault(m.weight, WeightUse(m.weight, [], [], K, N))
        if (use.K, use.N) != (K, N):  # one table read both as (in, out) and transposed: two layouts
            raise PassError(f"initializer {m.weight} is read by MatMuls both as it is and transposed; "
                            "quantize it once per layout by giving each its own initializer")
        use.matmuls.append(m)
    for g in embedding_gathers(idx):
        if g.input[0] in uses and all(m.transposed for m in uses[g.input[0]].matmuls):
            uses[g.input[0]].gathers.append(g)
    return list(uses.values())


def quantize_weights(model: onnx.ModelProto, plan: Callable[[WeightUse], WeightPlan | None],
                     accuracy_level: int, means: dict[str, np.ndarray] | None = None, blocks=None
                     ) -> tuple[onnx.ModelProto, list[dict]]:
    """Return a rewritten copy of ``model`` and one record per quantized weight.

    ``blocks``: a :class:`edgedec.models.gguf_blocks.BlockIndex` of the source GGUF. A weight on none of the
    plan's legacy grids is looked up there, and its exact form re-expressed (:func:`blockwise.from_form`, in
    ``max(bits, the form's)`` bits when the plan widens, its source's blocks of 32 or 16); a weight it does
    not find is quantized from its float values, and the record says why (``source``).

    ``plan(use)`` says how to quantize each weight, or None to leave it in float. ``means`` maps
    activations to their mean over calibration tokens (K,): a weight whose offsets are rounded away
    (``round_offsets``) gets the bias ``mean @ (W - W_rounded)`` on each MatMul whose input is listed, so
    the rounding shifts its outputs by nothing on average (MatMulNBits' bias input: no extra node).
    """
    rw = _Rewriter(model)
    records = []
    for use in weight_uses(rw.idx):
        p = plan(use)
        if p is None:
            continue
        stored = rw.idx.array(use.name)
        w = stored.T if use.matmuls[0].transposed else stored  # (K, N)
        gathers, block_size, notes = _table_blocks(use, p.block_size)
        q = bw.recover_grid(w, p.grids) if p.grids else None
        source = q.kind if q is not None and q.bits == p.bits else None
        missed = ""
        if source is None and blocks is not None:
            form, missed = blocks.find(w)
            q = None
            if form is not None and (form.bits or 8) > p.bits and not p.widen:
                missed = f"its {form.kind} codes need {form.bits or 'more than 8'} bits, the plan has {p.bits}"
            elif form is not None and (not gathers or use.K % form.block == 0):
                q = bw.from_form(form, max(p.bits, form.bits or 8))
                missed = "" if q is not None else f"its {form.kind} form has codes {form.q_range}"
            source = q.kind if q is not None else None
        if source is None:
            q = bw.quantize(w, p.bits, block_size, p.symmetric, p.algorithm)
        biased = 0
        shift = None
        if p.round_offsets and q.offsets is not None:
            exact = q.dequantize()
            q = bw.round_offsets(q)
            shift = exact.astype(np.float64) - q.dequantize()  # (K, N): what rounding took away
        t = rw.add_tensors(use.name, q)
        attrs = dict(K=use.K, N=use.N, bits=q.bits, block_size=q.block_size, accuracy_level=accuracy_level)
        for m in use.matmuls:
            bias = ""
            if shift is not None and means and m.node.input[0] in means:
                bias = rw.constant(f"{use.name}.rounding_bias", (means[m.node.input[0]] @ shift).astype(np.float32))
                biased += 1
            rw.replace(m.node, rw.matmul_nodes(m.node, t, attrs, bias))
        rw.gather_nodes(use, gathers, t)
        record = {
            "weight": use.name, "shape_kn": [use.K, use.N], "bits": q.bits, "block_size": q.block_size,
            "method": q.kind if shift is not None else f"exact {source} grid" if source else
            q.kind + (" symmetric" if q.zero_points is None and q.kind == "rtn" else ""),
            "zero_points": "float (block-sum correction)" if t.offsets else ("uint8" if t.zero_points else "default"),
            "matmuls": len(use.matmuls), "gathers": len(gathers),
            "bytes_before": int(stored.nbytes), "bytes_after": int(q.nbytes()),
            "max_abs_error": float(np.abs(q.dequantize().astype(np.float64) - w).max()),
        }
        if shift is not None:
            record["bias_correction"] = f"{biased} of {len(use.matmuls)} MatMuls"
        if missed:
            record["source"] = f"no exact source form: {missed}"
            log.info("%s: no exact source form (%s); %s", use.name, missed, record["method"])
        if notes:
            record["notes"] = notes
            for note in notes:
                log.warning("%s: %s", use.name, note)
        records.append(record)
        log.debug("quantized %s as %s (max |error| %.3g)", use.name, record["method"], record["max_abs_error"])
    if records:
        rw.finish()
    return rw.out, records


def _table_blocks(use: WeightUse, block_size: int) -> tuple[list, int, list[str]]:
    """The embedding reads the head's packed table row by row, so a shared table's blocks must not pad
    K: fall back to the largest block size that divides it, or leave the Gather on the float table."""
    if not use.gathers or use.K % block_size == 0:
        return use.gathers, block_size, []
    fits = [b for b in bw.BLOCK_SIZES if b <= block_size and use.K % b == 0]
    if fits:
        return use.gathers, fits[-1], [f"block_size {block_size} does not divide {use.K}; "
                                        f"the shared table uses {fits[-1]}"]
    return [], block_size, [f"no block size divides {use.K}; the embedding Gather keeps the float table"]


@dataclass
class _Tensors:
    """Initializer names of one quantized weight ("" when absent), and what building its nodes needs."""

    base: str  # the float weight's name, the prefix of everything derived from it
    b: str  # packed B (N, k_blocks, blob)
    scales: str  # (N, k_blocks)
    zero_points: str  # (N, ceil(k_blocks * bits / 8))
    offsets: str  # (k_blocks, N), for the block-sum correction of MatMuls
    q: bw.BlockQuant


class _Rewriter:
    """Accumulates new initializers and node replacements over a copy of the model."""

    def __init__(self, model: onnx.ModelProto):
        self.out = onnx.ModelProto()
        self.out.CopyFrom(model)
        self.idx = GraphIndex.of(self.out)
        self.replacements: dict[str, list] = {}  # first output of a replaced node -> its replacement
        self.inits: list = []
        self.taken: set = set()
        self.block_sums: dict = {}  # (activation, K, block) -> name of x @ S
        self.indicators: dict = {}  # (K, block, transposed) -> name of S (K, k_blocks) or S^T

    def name(self, base: str) -> str:
        return unique_name(self.idx, base, self.taken)

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def replace(self, node: onnx.NodeProto, nodes: list) -> None:
        self.replacements[node.output[0]] = nodes

    def finish(self) -> None:
        ensure_ms_opset(self.out)
        rewrite_nodes(self.out, self.replacements, self.inits)

    def add_tensors(self, base: str, q: bw.BlockQuant) -> _Tensors:
        zp = q.packed_zero_points()
        return _Tensors(
            base=base,
            b=self.constant(f"{base}.q{q.bits}", q.packed_b()),
            scales=self.constant(f"{base}.scales", q.scales),
            zero_points=self.constant(f"{base}.zero_points", zp) if zp is not None else "",
            offsets=self.constant(f"{base}.block_offsets", q.offsets.T) if q.offsets is not None else "",
            q=q,
        )

    def indicator(self, K: int, bs: int, transposed: bool = False) -> str:
        """S (K, k_blocks), or S^T (k_blocks, K): 1 where row k lies in block b."""
        key = (K, bs, transposed)
        if key not in self.indicators:
            s = np.zeros((K, -(-K // bs)), np.float32)
            s[np.arange(K), np.arange(K) // bs] = 1.0
            kind = "spread" if transposed else "indicator"
            self.indicators[key] = self.constant(f"block_{kind}.{K}x{bs}", s.T if transposed else s)
        return self.indicators[key]

    def matmul_nodes(self, node: onnx.NodeProto, t: _Tensors, attrs: dict, bias: str = "") -> list:
        """MatMulNBits for ``node`` (with ``bias``, an initializer name, if given), plus its block-sum
        correction when the weight has offsets."""
        x, y = node.input[0], node.output[0]
        inputs = [x, t.b, t.scales] + ([t.zero_points] if t.zero_points else [])
        if bias:  # inputs 3 (zero points) and 4 (g_idx) are positional: empty names skip them
            inputs += [""] * (5 - len(inputs)) + [bias]
        base, K, bs = t.base, t.q.K, t.q.block_size
        if not t.offsets:
            return [helper.make_node("MatMulNBits", inputs, [y], domain=MS_DOMAIN,
                                     name=self.name(f"{base}.matmul_nbits"), **attrs)]
        nodes = []
        key = (x, K, bs)
        if key not in self.block_sums:  # x @ S, shared by every weight reading x
            bsum = self.name(f"{x}.block_sums")
            nodes.append(set_role(helper.make_node("MatMul", [x, self.indicator(K, bs)], [bsum],
                                                   name=self.name(f"{bsum}.matmul")), CORRECTION_ROLE))
            self.block_sums[key] = bsum
        y0, corr = self.name(f"{y}.nbits"), self.name(f"{y}.offset")
        return nodes + [
            helper.make_node("MatMulNBits", inputs, [y0], domain=MS_DOMAIN, name=self.name(f"{base}.matmul_nbits"),
                             **attrs),
            set_role(helper.make_node("MatMul", [self.block_sums[key], t.offsets], [corr],
                                      name=self.name(f"{base}.offset_matmul")), CORRECTION_ROLE),
            helper.make_node("Add", [y0, corr], [y], name=self.name(f"{base}.offset_add")),
        ]

    def gather_nodes(self, use: WeightUse, gathers: list, t: _Tensors) -> None:
        """GatherBlockQuantized on the head's packed table for each embedding Gather on it."""
        if not gathers:
            return
        base, q = use.name, t.q
        table = self.name(f"{base}.q{q.bits}.table")  # (vocab, hidden * bits / 8): B's bytes, reshaped
        shape = self.constant(f"{base}.table_shape", np.array([use.N, -1], np.int64))
        nodes = [helper.make_node("Reshape", [t.b, shape], [table], name=self.name(f"{table}.reshape"))]
        rows = self.constant(f"{base}.block_offsets.rows", q.offsets) if t.offsets else ""  # (vocab, k_blocks)
        for g in gathers:
            ids, e = g.input[1], g.output[0]
            e0 = self.name(f"{e}.nbits") if rows else e
            nodes.append(helper.make_node(
                "GatherBlockQuantized", [table, ids, t.scales] + ([t.zero_points] if t.zero_points else []), [e0],
                domain=MS_DOMAIN, name=self.name(f"{base}.gather_block_quantized"),
                bits=q.bits, block_size=q.block_size, gather_axis=0, quantize_axis=1))
            if rows:  # e = GBQ + Gather(O^T, ids) @ S^T: every element gets its block's offset
                picked, wide = self.name(f"{e}.offsets"), self.name(f"{e}.offsets_wide")
                nodes += [
                    helper.make_node("Gather", [rows, ids], [picked], axis=0, name=self.name(f"{picked}.gather")),
                    set_role(helper.make_node("MatMul", [picked, self.indicator(use.K, q.block_size, True)], [wide],
                                              name=self.name(f"{wide}.matmul")), CORRECTION_ROLE),
                    helper.make_node("Add", [e0, wide], [e], name=self.name(f"{e}.offset_add")),
                ]
            self.replace(g, nodes)
            nodes = []
