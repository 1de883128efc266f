"""The Llama/Qwen2 decoder as a TVM Relax module, built directly from the source model's weights.

TVM's Relax ONNX frontend does not import ONNX Runtime's contrib ops (GroupQueryAttention), so the
``cpu-tvm`` and ``arm64`` targets do not go through the ONNX graph: they write the same computation
(the one :class:`edgedec.compiler.export.ExportDecoder` exports, verified against the source) as a
Relax module with a few hand-written TIR kernels, under the same KV-cache contract:

    functions (batch 1; ``total`` = tokens in the cache after this step, ``start = total - n``)
      prefill(input_ids int32 (1, n), logits_index int32 (m,), R.Shape([total]), caches, params)
          -> logits float32 (1, m, vocab)
      decode(input_ids int32 (1, 1), R.Shape([total]), caches, params) -> logits float32 (1, 1, vocab)
      verify{k}(input_ids int32 (1, k), R.Shape([total]), caches, params) -> logits float32 (1, k, vocab)
             for k in VERIFY_ROWS: prefill with every row's logits, at a static k, so the VM plans its
             memory once and computes no shapes (a dynamic-n prefill of one token costs ~0.4 ms more
             than decode); what a speculative verification calls
      check_params(params) -> ()   (the others skip the weights' shape checks; this does them)
    caches   tuple of 2 * layers tensors, float32 or float16 (``kv_dtype``) (1, kv_heads, capacity, head_dim):
             (key.0, value.0, key.1, value.1, ...). Written IN PLACE (call_tir_inplace) at
             positions [start, total); attention reads [0, total). Rolling back = a smaller total.
    params   tuple of the weights in :func:`param_names` order (float32, the shapes there).

Kernels: projections are hand-scheduled GEMVs over (out, in) weights (:func:`_linear_kernel`,
:mod:`.tvm_quant`); attention is one hand-written TIR kernel (scores, max, exp,
weighted values; parallel over heads and query rows), reading the cache in place; rotary embedding uses
the same cos/sin tables as the ONNX graph (computed in float64, stored in float32).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import ModelError
from ..models.arch import ArchFacts
from ..runtime.tvm_session import KV_DTYPES

log = logging.getLogger(__name__)


def param_names(arch: ArchFacts) -> list[str]:
    """The weights the module takes, in order. Linear weights are (out, in), as in Hugging Face."""
    names = ["embed_tokens.weight", "rope.cos", "rope.sin"]
    for l in range(arch.num_layers):
        p = f"layers.{l}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in ("q", "k", "v")]
        if arch.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in ("q", "k", "v")]
        names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names += ["norm.weight"]
    if not arch.tie_word_embeddings or head_rows(arch) != arch.vocab_size:
        names += ["lm_head.weight"]
    return names


def head_rows(arch) -> int:
    """Rows of the LM head: the vocabulary, or fewer for a draft model's trimmed head (VocabTrim: an
    ``arch`` with ``head_rows``, see :mod:`edgedec.compiler.draft`; its logits are the kept tokens')."""
    return getattr(arch, "head_rows", None) or arch.vocab_size


def linear_weights(arch: ArchFacts) -> list[str]:
    """The projection weights (out, in) that ``-q int4`` stores in 4 bits."""
    return [n for n in param_names(arch) if n.startswith("layers.") and n.endswith("_proj.weight")]


def table_weights(arch: ArchFacts) -> list[str]:
    """The embedding / LM head tables that ``-q int4`` stores in 8 bits."""
    return ["embed_tokens.weight"] + (["lm_head.weight"] if "lm_head.weight" in param_names(arch) else [])


QUANT_PARTS = ("words", "scale", "offset")


def quantized_bits(arch: ArchFacts, max_positions: int, quant: str | None) -> dict[str, int]:
    """{weight: bits} for the weights ``quant`` stores block-quantized (those whose shape fits the layout)."""
    if quant is None:
        return {}
    from . import tvm_quant

    shapes = param_shapes(arch, max_positions)
    wanted = {**{n: 4 for n in linear_weights(arch)}, **{n: 8 for n in table_weights(arch)}}
    if getattr(arch, "head_bits", None):  # a draft's head may be quantized harder (it only ranks tokens)
        wanted["lm_head.weight"] = arch.head_bits
    return {n: b for n, b in wanted.items() if tvm_quant.fits(shapes[n])}


def param_specs(arch: ArchFacts, max_positions: int, quant: str | None = None,
                layouts: dict[str, tuple[int, str]] | None = None) -> dict[str, tuple[tuple, str]]:
    """{name: (shape, dtype)} of the module's parameters in call order; a quantized weight ``W`` becomes
    ``W.words`` / ``W.scale`` / ``W.offset`` (layout in :mod:`edgedec.targets.tvm_quant`). ``layouts``
    ({weight: (bits, scale dtype)}, from :func:`layouts_of` once the weights are quantized) overrides the
    default of :func:`quantized_bits` bits with float16 scales (an exact source may need 8 bits or float32)."""
    shapes = param_shapes(arch, max_positions)
    chosen = resolve_layouts(arch, max_positions, quant, layouts)
    out = {}
    for name in param_names(arch):
        if name not in chosen:
            out[name] = (shapes[name], "float32")
            continue
        out.update(quant_param_specs(name, shapes[name], *chosen[name]))
    return out


def quant_param_specs(name: str, shape: tuple, bits: int, scale_dtype: str = "float16") -> dict[str, tuple[tuple, str]]:
    """{part: (shape, dtype)} of one block-quantized (out, in) weight ``name``: its words, scale and offset."""
    from . import tvm_quant

    (d_out, d_in), per, group = shape, 32 // bits, tvm_quant.GROUP
    scale, offset = tvm_quant.scale_buffers(d_out // group, d_in // 32, scale_dtype)
    return {f"{name}.words": ((d_out // group, d_in // per, group), "uint32"), f"{name}.scale": scale,
            f"{name}.offset": offset}


def resolve_layouts(arch: ArchFacts, max_positions: int, quant: str | None,
                    layouts: dict[str, tuple[int, str]] | None = None) -> dict[str, tuple[int, str]]:
    """{weight: (bits, scale dtype)} of the block-quantized weights: :func:`quantized_bits` with float16
    scales, overridden by ``layouts`` for the weights it names."""
    chosen = {n: (b, "float16") for n, b in quantized_bits(arch, max_positions, quant).items()}
    for name, layout in (layouts or {}).items():
        if name in chosen:
            chosen[name] = (int(layout[0]), str(layout[1]))
    return chosen


def layouts_of(report: dict) -> dict[str, tuple[int, str]]:
    """{weight: (bits, scale dtype)} from :func:`quantize_weights`' report."""
    return {name: (r["bits"], r["scale_dtype"]) for name, r in report.items()}


def quantize_weights(weights: dict[str, np.ndarray], bits: dict[str, int], blocks=None, widen: bool = True):
    """Replace each weight in ``bits`` by its three quantized tensors. Returns (params, reference, report):
    ``reference`` is ``weights`` with the quantized ones replaced by what the kernels compute with
    (their dequantization), for verifying the library; ``report`` lists per weight its bits, scale dtype,
    kind and max error (0.0: exact). ``blocks``: a :class:`edgedec.models.gguf_blocks.BlockIndex` of the
    source GGUF, whose exact forms are used where the layout holds them (``widen``: in 8 bits where the
    source has more than the default 4; see :func:`edgedec.targets.tvm_quant.quantize`); a weight it does
    not find is quantized from its float values, and the report says why."""
    from . import tvm_quant

    params, reference, report = {}, dict(weights), {}
    for name, w in weights.items():
        if name not in bits:
            params[name] = w
            continue
        form, why = blocks.find(np.ascontiguousarray(w.T)) if blocks is not None else (None, "")
        try:
            q = tvm_quant.quantize(w, bits[name], form, widen)
        except ValueError as exc:  # e.g. a block scale beyond float16's range
            raise ModelError(f"cannot quantize {name} to {bits[name]} bits: {exc}") from exc
        params.update({f"{name}.words": q.words, f"{name}.scale": q.scale, f"{name}.offset": q.offset})
        reference[name] = q.dequantize()
        report[name] = {"bits": q.bits, "scale_dtype": q.scale_dtype, "kind": q.kind,
                        "max_abs_error": float(np.abs(reference[name] - w).max())}
        if form is not None:
            report[name]["source"] = form.kind
        elif why:
            report[name]["source"] = f"not found in the GGUF: {why}"
            log.info("%s: no exact source form (%s); %s", name, why, q.kind)
    return params, reference, report


def rope_tables(hf_model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_positions, head_dim / 2) exactly as the ONNX export computes them."""
    import torch

    rotary = hf_model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().double()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return (freqs.cos() * scaling).float().numpy(), (freqs.sin() * scaling).float().numpy()


def weights_from_hf(hf_model, arch: ArchFacts, max_positions: int) -> dict[str, np.ndarray]:
    """The module's parameters (float32, C-contiguous) from a transformers ``*ForCausalLM``."""
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    cos, sin = rope_tables(hf_model, max_positions)
    out = {}
    for name in param_names(arch):
        if name == "rope.cos":
            out[name] = cos
        elif name == "rope.sin":
            out[name] = sin
        else:
            out[name] = np.ascontiguousarray(state[name].detach().float().numpy())
    return out


def param_shapes(arch: ArchFacts, max_positions: int) -> dict[str, tuple[int, ...]]:
    a = arch
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    shapes = {"embed_tokens.weight": (a.vocab_size, a.hidden_size), "rope.cos": (max_positions, a.head_dim // 2),
              "rope.sin": (max_positions, a.head_dim // 2), "norm.weight": (a.hidden_size,),
              "lm_head.weight": (head_rows(a), a.hidden_size)}
    for l in range(a.num_layers):
        p = f"layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (a.hidden_size,), p + "post_attention_layernorm.weight": (a.hidden_size,),
            p + "self_attn.q_proj.weight": (q, a.hidden_size), p + "self_attn.k_proj.weight": (kv, a.hidden_size),
            p + "self_attn.v_proj.weight": (kv, a.hidden_size), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (a.hidden_size, q),
            p + "mlp.gate_proj.weight": (a.intermediate_size, a.hidden_size),
            p + "mlp.up_proj.weight": (a.intermediate_size, a.hidden_size),
            p + "mlp.down_proj.weight": (a.hidden_size, a.intermediate_size),
        })
    return {n: shapes[n] for n in param_names(arch)}


# --------------------------------------------------------------------------------------------
# TIR kernels
# --------------------------------------------------------------------------------------------
def _kv_write_kernel(kv_heads: int, head_dim: int, dtype: str = "float32"):
    """cache[0, h, start + i, d] = new[0, i, h * head_dim + d]: the new keys/values, in place, stored as
    ``dtype`` (float32, or float16 rounded to nearest)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def kv_write(var_cache: T.handle, var_new: T.handle, start: T.int64):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        cap = T.int64()
        n = T.int64()
        cache = T.match_buffer(var_cache, (T.int64(1), T.int64(kv_heads), cap, T.int64(head_dim)), dtype)
        new = T.match_buffer(var_new, (T.int64(1), n, T.int64(kv_heads * head_dim)), "float32")
        for h, i, d in T.grid(T.int64(kv_heads), n, T.int64(head_dim)):
            cache[0, h, start + i, d] = T.Cast(dtype, new[0, i, h * T.int64(head_dim) + d])

    return kv_write


def _fast_exp(T, x):
    """exp(x) in float32 as plain vectorizable arithmetic (LLVM turns ``T.exp`` on a vector into one libm
    call per lane): x = n ln2 + r with |r| <= ln2 / 2 (two-part ln2), a degree-6 Taylor polynomial for
    e^r (relative error ~2e-7, float32's rounding), times 2^n built in the exponent bits; 0 below -87,
    and x is clamped at 88 (e^88 ~ 1.7e38, float32's top)."""
    f32 = lambda v: T.float32(v)  # noqa: E731
    xc = T.min(T.max(x, f32(-87.0)), f32(88.0))
    n = T.floor(xc * f32(1.4426950408889634) + f32(0.5))
    r = xc - n * f32(0.693359375) + n * f32(2.12194440e-4)
    p = f32(1.0) + r * (f32(1.0) + r * (f32(0.5) + r * (f32(1.0 / 6) + r * (f32(1.0 / 24) + r * (
        f32(1.0 / 120) + r * f32(1.0 / 720))))))
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.if_then_else(x < f32(-87.0), f32(0.0), p * two_n)


def _silu_mul_kernel(d: int):
    """out = silu(g) * u = g / (1 + exp(-g)) * u over (1, n, d), with :func:`_fast_exp` in vectors, rows in
    parallel (``T.exp`` here was a scalar libm call per element: 26 us a layer for a 4-row verification)."""
    from tvm.script import tirx as T

    vl = next(v for v in (16, 8, 4, 2, 1) if d % v == 0)

    @T.prim_func(private=True)
    def silu_mul(var_g: T.handle, var_u: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        g = T.match_buffer(var_g, (T.int64(1), n, T.int64(d)), "float32")
        u = T.match_buffer(var_u, (T.int64(1), n, T.int64(d)), "float32")
        out = T.match_buffer(var_out, (T.int64(1), n, T.int64(d)), "float32")
        for i in T.parallel(n):
            for c in range(d // vl):
                for l in T.vectorized(vl):
                    out[0, i, c * vl + l] = g[0, i, c * vl + l] \
                        / (T.float32(1) + _fast_exp(T, T.float32(0) - g[0, i, c * vl + l])) * u[0, i, c * vl + l]

    return silu_mul


def _pairwise_sum(buf, n: int):
    """buf[0] + ... + buf[n-1] as halves added lane by lane (n a power of two): a tree of depth log2(n),
    which LLVM turns into a few vector adds, where a running sum is a chain of n - 1 dependent adds."""
    vals = [buf[l] for l in range(n)]
    while len(vals) > 1:
        half = len(vals) // 2
        vals = [vals[l] + vals[l + half] for l in range(half)]
    return vals[0]


def _attention_kernel(heads: int, kv_heads: int, head_dim: int, dtype: str = "float32"):
    """Causal GQA attention of n new queries over cache[0:total], parallel over (head, query) pairs.

    q, out: (1, n, heads * head_dim); caches (1, kv_heads, capacity, head_dim) of ``dtype``, read as
    float32 (float16 halves the reads, which pay at long contexts, where the cache streams from memory).
    Query i (position start + i) attends to positions [0, start + i], in three passes with no chain from
    key to key: every
    key's score (a vector dot product over head_dim), then their max, then ``p = exp(score - max)`` and
    its sum in 16-lane vectors (:func:`_fast_exp`), then the values weighted by p, two keys at a
    time into two accumulators. (An online softmax carried max, sum and a rescale from each key to the
    next: ~60 cycles a key, 14% of an int4 decode step at 200 cached tokens.) Every query row runs the
    same code, so a row's result does not depend on how many rows the call has.
    """
    from tvm.script import tirx as T

    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    vl = next(v for v in (16, 8, 4, 2, 1) if head_dim % v == 0)
    nd = head_dim // vl
    sl = 16  # score lanes

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, total: T.int64, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        cap = T.int64()
        n = T.int64()
        q = T.match_buffer(var_q, (T.int64(1), n, T.int64(heads * head_dim)), "float32")
        kc = T.match_buffer(var_k, (T.int64(1), T.int64(kv_heads), cap, T.int64(head_dim)), dtype)
        vc = T.match_buffer(var_v, (T.int64(1), T.int64(kv_heads), cap, T.int64(head_dim)), dtype)
        out = T.match_buffer(var_out, (T.int64(1), n, T.int64(heads * head_dim)), "float32")
        score = T.alloc_buffer((T.int64(heads) * n, total + T.int64(sl)), "float32")
        for hi in T.parallel(T.int64(heads) * n):
            acc = T.decl_buffer((2, nd, vl), "float32", scope="local")
            part = T.decl_buffer((vl,), "float32", scope="local")
            lanes = T.decl_buffer((sl,), "float32", scope="local")
            st = T.decl_buffer((2,), "float32", scope="local")  # max, sum
            h = hi // n
            i = hi % n
            kvh = h // T.int64(group)
            length = total - n + i + T.int64(1)
            chunks = (length + T.int64(sl - 1)) // T.int64(sl)
            for j in range(length):
                for l in T.vectorized(vl):
                    part[l] = T.float32(0)
                for a in T.unroll(nd):
                    for l in T.vectorized(vl):
                        part[l] = part[l] + q[0, i, h * T.int64(head_dim) + a * vl + l] \
                            * T.Cast("float32", kc[0, kvh, j, a * vl + l])
                score[hi, j] = _pairwise_sum(part, vl) * T.float32(scale)
            for l in T.vectorized(sl):  # pad the last chunk: exp(pad - max) = 0
                score[hi, length + l] = T.float32(-3.4e38)
            for l in T.vectorized(sl):
                lanes[l] = T.float32(-3.4e38)
            for c in range(chunks):
                for l in T.vectorized(sl):
                    lanes[l] = T.max(lanes[l], score[hi, c * sl + l])
            st[0] = lanes[0]
            for l in T.unroll(1, sl):
                st[0] = T.max(st[0], lanes[l])
            for l in T.vectorized(sl):
                lanes[l] = T.float32(0)
            for c in range(chunks):
                for l in T.vectorized(sl):
                    score[hi, c * sl + l] = _fast_exp(T, score[hi, c * sl + l] - st[0])
                    lanes[l] = lanes[l] + score[hi, c * sl + l]
            st[1] = lanes[0]
            for l in T.unroll(1, sl):
                st[1] = st[1] + lanes[l]
            for r, a in T.grid(2, nd):
                for l in T.vectorized(vl):
                    acc[r, a, l] = T.float32(0)
            for jp in range((length + T.int64(1)) // T.int64(2)):  # the padding key's p is 0
                for r in T.unroll(2):
                    for a in T.unroll(nd):
                        for l in T.vectorized(vl):
                            acc[r, a, l] = acc[r, a, l] + score[hi, 2 * jp + r] \
                                * T.Cast("float32", vc[0, kvh, T.min(2 * jp + r, length - 1), a * vl + l])
            for a in T.unroll(nd):
                for l in T.vectorized(vl):
                    out[0, i, h * T.int64(head_dim) + a * vl + l] = (acc[0, a, l] + acc[1, a, l]) / st[1]

    return attention


# --------------------------------------------------------------------------------------------
# Tensor expressions
# --------------------------------------------------------------------------------------------
def _linear_kernel(n, d_in: int, d_out: int, bias: bool):
    """y (1, n, out) = x (1, n, in) @ W (out, in)^T (+ b), scheduled for a CPU.

    Each output row j streams W[j, :] contiguously: ``lanes`` partial sums are accumulated in a
    vector register over the input dimension, then summed (a GEMV that vectorizes and prefetches
    well); rows are split across threads. The kernel is opaque to fusion.
    """
    from tvm import s_tir, te

    lanes = next(v for v in (16, 8, 4, 2, 1) if d_in % v == 0)
    x = te.placeholder((1, n, d_in), "float32", name="x")
    w = te.placeholder((d_out, d_in), "float32", name="w")
    b = te.placeholder((d_out,), "float32", name="b") if bias else None
    ko = te.reduce_axis((0, d_in // lanes), "ko")
    part = te.compute((1, n, d_out, lanes),
                      lambda a, i, j, v: te.sum(x[a, i, ko * lanes + v] * w[j, ko * lanes + v], axis=ko), name="part")
    kv = te.reduce_axis((0, lanes), "kv")
    y = te.compute((1, n, d_out), lambda a, i, j: te.sum(part[a, i, j, kv], axis=kv), name="y")
    out = te.compute(y.shape, lambda a, i, j: y[a, i, j] + b[j], name="out") if bias else y
    func = te.create_prim_func([x, w, *([b] if bias else []), out])
    sch = s_tir.Schedule(func)
    blk_part, blk_y = sch.get_sblock("part"), sch.get_sblock("y")
    a, i, j = sch.get_loops(blk_y)[:3]
    tile = next(t for t in (16, 8, 4, 2, 1) if d_out % t == 0)
    jo, ji = sch.split(j, [None, tile])
    sch.parallel(jo)
    if bias:
        sch.reverse_compute_at(sch.get_sblock("out"), ji)
    sch.compute_at(blk_part, ji)
    loops = sch.get_loops(blk_part)
    v, k = loops[-2], loops[-1]
    sch.reorder(k, v)
    sch.set_scope(blk_part, 0, "local")
    init = sch.decompose_reduction(blk_part, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(v)  # LLVM's SLP vectorizer turns the unrolled lanes into vector FMAs
    func = sch.mod["main"].with_attr("op_pattern", 8).without_attr("global_symbol")
    return func


def _te_rms_norm(x, w, eps: float):
    """x / sqrt(mean(x^2) + eps) * w, as the ONNX graph writes it."""
    from tvm import te, tirx

    hidden = x.shape[2]
    k = te.reduce_axis((0, hidden), "k")
    ss = te.compute((x.shape[0], x.shape[1]), lambda a, i: te.sum(x[a, i, k] * x[a, i, k], axis=k), name="sumsq")
    mean = lambda a, i: ss[a, i] / tirx.const(float(int(hidden)), "float32")  # noqa: E731
    return te.compute(x.shape, lambda a, i, j: x[a, i, j] / tirx.sqrt(mean(a, i) + tirx.const(eps, "float32")) * w[j],
                      name="rms_norm")


def _te_rope(x, cos, sin, total, heads: int, head_dim: int):
    """Rotary embedding (non-interleaved, rotate_half) at positions [total - n, total)."""
    from tvm import te, tirx

    n = x.shape[1]
    half = head_dim // 2

    def f(a, i, c):
        pos = total - n + i
        d = c % head_dim
        j = tirx.if_then_else(d < half, d, d - half)
        partner = tirx.if_then_else(d < half, -x[a, i, c + half], x[a, i, c - half])
        return x[a, i, c] * cos[pos, j] + partner * sin[pos, j]

    return te.compute(x.shape, f, name="rope")


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
VERIFY_ROWS = range(2, 9)  # verify{k}: a speculative verification of k - 1 drafts, static shapes


def build_module(arch: ArchFacts, max_positions: int, quant: str | None = None, activations: str = "float",
                 kv_dtype: str = "float32", layouts: dict[str, tuple[int, str]] | None = None):
    """The Relax IRModule with ``prefill`` and ``decode`` (see the module docstring); ``quant="int4"``:
    the weights in :func:`quantized_bits` are block-quantized (:mod:`edgedec.targets.tvm_quant`);
    ``activations="int8"``: the kernels of those weights round their inputs to int8 (AVX512-VNNI);
    ``kv_dtype``: the caches' element type, float32 or float16 (written rounded, read back as float32);
    ``layouts``: per weight (bits, scale dtype) where not the default (:func:`param_specs`)."""
    import tvm
    from tvm import relax, tirx

    from . import tvm_quant

    a = arch
    specs = param_specs(a, max_positions, quant, layouts)
    names = list(specs)
    shapes = param_shapes(a, max_positions)
    chosen = resolve_layouts(a, max_positions, quant, layouts)
    bits = {n: b for n, (b, _) in chosen.items()}
    bb = relax.BlockBuilder()
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    kv_write = bb.add_func(_kv_write_kernel(a.num_kv_heads, a.head_dim, kv_dtype), "kv_write")
    attention = bb.add_func(_attention_kernel(a.num_heads, a.num_kv_heads, a.head_dim, kv_dtype), "attention")
    silu_mul = bb.add_func(_silu_mul_kernel(a.intermediate_size), "silu_mul")

    kernels: dict = {}
    params_type = relax.TupleType([relax.TensorType(*specs[p]) for p in names])

    def function(name: str, rows_static: int | None):
        """rows_static None: prefill (any n, logits of the rows in logits_index); 1: decode; k > 1: verify{k}."""
        decode = rows_static == 1
        n = tirx.IntImm("int64", rows_static) if rows_static else tirx.Var("n", "int64")
        m = tirx.Var("m", "int64")
        total = tirx.Var("total", "int64")
        cap = tirx.Var("capacity", "int64")
        ids = relax.Var("input_ids", relax.TensorType((1, n), "int32"))
        rows = None if rows_static else relax.Var("logits_index", relax.TensorType((m,), "int32"))
        shape = relax.Var("total", relax.ShapeType([total]))
        cache_t = relax.TensorType((1, a.num_kv_heads, cap, a.head_dim), kv_dtype)
        caches = relax.Var("caches", relax.TupleType([cache_t] * (2 * a.num_layers)))
        params = relax.Var("params", params_type)
        args = [ids] + ([rows] if rows is not None else []) + [shape, caches, params]
        def linear(x, wname, bias=None, rows=n):
            d_out, d_in = shapes[wname]
            if wname in bits:
                wbits, sdt = chosen[wname]
                key = ("q", decode, d_in, d_out, wbits, sdt)
                suffix = {"float16": "", "float32": "_f32s", "k": "_kq"}[sdt]  # an exact k-quant source: _kq
                if key not in kernels and activations == "int8":
                    make = tvm_quant.gemv_int8_kernel if decode else tvm_quant.gemm_int8_kernel
                    kernels[key] = bb.add_func(make(d_in, d_out, wbits, sdt), f"q{wbits}_linear_i8{suffix}")
                elif key not in kernels:
                    make = tvm_quant.gemv_kernel if decode else tvm_quant.gemm_kernel
                    kernels[key] = bb.add_func(make(d_in, d_out, wbits, sdt), f"q{wbits}_linear{suffix}")
                y = bb.emit(relax.call_tir(kernels[key], [x, *(w[f"{wname}.{part}"] for part in QUANT_PARTS)],
                                           relax.TensorType((1, rows, d_out), "float32")))
                return y if bias is None else bb.emit(relax.op.add(y, bias))
            weight = w[wname]
            key = (decode, d_in, d_out, bias is not None)  # prefill kernels take any number of rows
            if key not in kernels:
                var = tirx.IntImm("int64", 1) if decode else tirx.Var("n", "int64")
                kernels[key] = bb.add_func(_linear_kernel(var, d_in, d_out, bias is not None), "linear")
            return bb.emit(relax.call_tir(kernels[key], [x, weight, *([bias] if bias is not None else [])],
                                          relax.TensorType((1, rows, d_out), "float32")))

        # prefill and decode check only their real inputs on each call, not the ~750 weights' static
        # shapes (0.28 us each: ~4% of a SmolLM2 int4 step, and of every speculative verification);
        # check_params does, and the runtime calls it once at load
        with bb.function(name, args, attrs={"num_input": len(args) - 1}):
            with bb.dataflow():
                w = {p: bb.emit(relax.TupleGetItem(params, i)) for i, p in enumerate(names)}
                if "embed_tokens.weight" in bits:
                    embed = bb.add_func(tvm_quant.embed_kernel(a.vocab_size, a.hidden_size,
                                                               *chosen["embed_tokens.weight"]), "q_embed")
                    h = bb.emit(relax.call_tir(embed, [relax.op.reshape(ids, [n]),
                                                       *(w[f"embed_tokens.weight.{part}"] for part in QUANT_PARTS)],
                                               relax.TensorType((1, n, a.hidden_size), "float32")))
                else:
                    h = bb.emit(relax.op.take(w["embed_tokens.weight"], relax.op.reshape(ids, [n]), axis=0))
                    h = bb.emit(relax.op.reshape(h, [1, n, a.hidden_size]))
                for l in range(a.num_layers):
                    p = f"layers.{l}."
                    x = bb.emit_te(_te_rms_norm, h, w[p + "input_layernorm.weight"], a.rms_norm_eps,
                                   primfunc_name_hint="rms_norm")
                    qkv = []
                    for proj in ("q", "k", "v"):
                        bias = w.get(p + f"self_attn.{proj}_proj.bias")
                        qkv.append(linear(x, p + f"self_attn.{proj}_proj.weight", bias))
                    q = bb.emit_te(_te_rope, qkv[0], w["rope.cos"], w["rope.sin"], total, a.num_heads, a.head_dim,
                                   primfunc_name_hint="rope")
                    k = bb.emit_te(_te_rope, qkv[1], w["rope.cos"], w["rope.sin"], total, a.num_kv_heads,
                                   a.head_dim, primfunc_name_hint="rope")
                    kc = bb.emit(relax.TupleGetItem(caches, 2 * l))
                    vc = bb.emit(relax.TupleGetItem(caches, 2 * l + 1))
                    start = relax.prim_value(total - n)
                    kc = bb.emit(relax.call_tir_inplace(kv_write, [kc, k, start], [0], cache_t))
                    vc = bb.emit(relax.call_tir_inplace(kv_write, [vc, qkv[2], start], [0], cache_t))
                    att = bb.emit(relax.call_tir(attention, [q, kc, vc, relax.prim_value(total)],
                                                 relax.TensorType((1, n, a.num_heads * a.head_dim), "float32")))
                    h = bb.emit(relax.op.add(h, linear(att, p + "self_attn.o_proj.weight")))
                    x = bb.emit_te(_te_rms_norm, h, w[p + "post_attention_layernorm.weight"], a.rms_norm_eps,
                                   primfunc_name_hint="rms_norm")
                    g = linear(x, p + "mlp.gate_proj.weight")
                    u = linear(x, p + "mlp.up_proj.weight")
                    gu = bb.emit(relax.call_tir(silu_mul, [g, u],
                                                relax.TensorType((1, n, a.intermediate_size), "float32")))
                    h = bb.emit(relax.op.add(h, linear(gu, p + "mlp.down_proj.weight")))
                if rows is not None:
                    h = bb.emit(relax.op.take(h, rows, axis=1))
                x = bb.emit_te(_te_rms_norm, h, w["norm.weight"], a.rms_norm_eps, primfunc_name_hint="rms_norm")
                head = "lm_head.weight" if "lm_head.weight" in shapes else "embed_tokens.weight"
                logits = bb.emit_output(linear(x, head, rows=m if rows is not None else n))
            bb.emit_func_output(logits)

    function("prefill", None)
    function("decode", 1)
    for k in VERIFY_ROWS:
        function(f"verify{k}", k)
    with bb.function("check_params", [relax.Var("params", params_type)]):  # the VM checks the weights on entry
        bb.emit_func_output(relax.Tuple([]))
    return bb.get()


def build_library(arch: ArchFacts, max_positions: int, target, tune: bool = False, quant: str | None = None,
                  activations: str = "float", kv_dtype: str = "float32",
                  layouts: dict[str, tuple[int, str]] | None = None):
    """Compile the module for ``target`` (a tvm.target.Target) into a Relax VM executable.

    Pipeline: TVM's CPU default (legalize, fuse the small elementwise/norm kernels, lower); the
    projections and attention are hand-scheduled kernels that the pipeline leaves as they are.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    mod = build_module(arch, max_positions, quant, activations, kv_dtype, layouts)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return relax.build(mod, target=target, relax_pipeline=pipeline)
