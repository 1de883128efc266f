"""Export a Hugging Face Llama/Qwen2 model to one ONNX decoder graph with an in-place KV cache.

The graph serves prefill (many tokens) and decode (one or a few tokens) alike, batch 1:

    inputs
      input_ids              int64  (1, S)               the new tokens
      seqlens_k              int32  (1,)                 total tokens after this step, minus one
      total_sequence_length  int32  ()                   total tokens after this step
      logits_index           int64  (N,)                 which of the S positions get logits
      past_key.{i}           float  (1, kv_heads, capacity, head_dim)   layer i, written in place
      past_value.{i}         float  (1, kv_heads, capacity, head_dim)
    outputs
      logits                 float  (1, N, vocab)
      present_key.{i}        same buffer as past_key.{i} when bound together through IOBinding
      present_value.{i}

Attention is ONNX Runtime's ``com.microsoft.GroupQueryAttention`` with rotary embedding inside the
op: given past and present bound to one buffer, it writes the new keys and values at positions
``[total - S, total)`` and attends over ``[0, total)`` causally, so the runtime never copies or
concatenates the cache. Rolling back rejected tokens is just a smaller ``total`` next step.

The exporter is ``torch.onnx.export`` (dynamo). GroupQueryAttention enters as a torch custom op whose
eager implementation is the reference semantics and whose translation emits the contrib op.
"""

from __future__ import annotations

import ast
import logging
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..models.arch import ArchFacts

log = logging.getLogger(__name__)

OPSET = 18
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; 10 is what opset 18 needs


# --------------------------------------------------------------------------------------------
# GroupQueryAttention as a torch custom op
# --------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.library.custom_op("edgedec::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,  # (1, S, heads * head_dim)
    key: torch.Tensor,  # (1, S, kv_heads * head_dim)
    value: torch.Tensor,  # (1, S, kv_heads * head_dim)
    past_key: torch.Tensor,  # (1, kv_heads, capacity, head_dim)
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,  # (1,) int32 = total - 1
    total_sequence_length: torch.Tensor,  # () int32
    cos_cache: torch.Tensor,  # (max_positions, head_dim / 2)
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics of com.microsoft.GroupQueryAttention (do_rotary=1, non-interleaved)."""
    s = query.shape[1]
    total = int(total_sequence_length)
    d = past_key.shape[-1]
    pos = torch.arange(total - s, total)
    cos = torch.cat([cos_cache[pos]] * 2, dim=-1)[None, :, None, :]  # (1, S, 1, D)
    sin = torch.cat([sin_cache[pos]] * 2, dim=-1)[None, :, None, :]
    q = query.view(1, s, num_heads, d)
    k = key.view(1, s, kv_num_heads, d)
    q = (q * cos + _rotate_half(q) * sin).transpose(1, 2)  # (1, H, S, D)
    k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
    v = value.view(1, s, kv_num_heads, d).transpose(1, 2)
    present_key = past_key.clone()
    present_value = past_value.clone()
    present_key[:, :, total - s : total] = k
    present_value[:, :, total - s : total] = v
    kk = present_key[:, :, :total].repeat_interleave(num_heads // kv_num_heads, dim=1)
    vv = present_value[:, :, :total].repeat_interleave(num_heads // kv_num_heads, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale  # (1, H, S, total)
    causal = torch.arange(total)[None, :] > (total - s + torch.arange(s))[:, None]
    scores = scores.masked_fill(causal, float("-inf"))
    out = scores.softmax(-1) @ vv  # (1, H, S, D)
    return out.transpose(1, 2).reshape(1, s, num_heads * d), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      num_heads, kv_num_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _register_gqa_schema() -> None:
    """Declare com.microsoft.GroupQueryAttention to onnx so the exporter can emit it.

    onnx ships no schemas for ONNX Runtime's contrib ops; this declares the subset of the
    signature edgedec uses (ONNX Runtime validates the node against its own schema on load).
    """
    from onnx.defs import OpSchema, has

    if has("GroupQueryAttention", "com.microsoft"):
        return
    fp = OpSchema.FormalParameter
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale"]
    # the cache may be float16/int8/packed-int4 with float scales (the kv-cache pass sets them)
    types = {"seqlens_k": "M", "total_sequence_length": "M", "past_key": "T_CACHE", "past_value": "T_CACHE",
             "position_ids": "P", "k_scale": "T_KV_SCALE", "v_scale": "T_KV_SCALE"}
    optional = set(names) - {"query", "seqlens_k", "total_sequence_length"}  # key/value: packed QKV
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[fp(n, types.get(n, "T"), param_option=OpSchema.FormalParameterOption.Optional
                   if n in optional else OpSchema.FormalParameterOption.Single) for n in names],
        outputs=[fp("output", "T"), fp("present_key", "T_CACHE"), fp("present_value", "T_CACHE")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("T_CACHE", ["tensor(float)", "tensor(float16)", "tensor(int8)", "tensor(uint8)"], ""),
                          ("T_KV_SCALE", ["tensor(float)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, required=True),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, required=True),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, required=False),
            OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, required=False),
            OpSchema.Attribute("k_quant_type", OpSchema.AttrType.STRING, required=False),
            OpSchema.Attribute("v_quant_type", OpSchema.AttrType.STRING, required=False),
            OpSchema.Attribute("kv_cache_bit_width", OpSchema.AttrType.INT, required=False),
        ],
    )
    onnx.defs.register_schema(schema)


def _gqa_translation(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                     cos_cache, sin_cache, num_heads: int, kv_num_heads: int, scale: float):
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1,
    )


# --------------------------------------------------------------------------------------------
# The decoder module: the HF model's weights, our graph layout
# --------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        # written as x / sqrt(...) (not x * rsqrt(...)) so ONNX Runtime fuses it into
        # (Skip)SimplifiedLayerNormalization: one kernel instead of seven
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ExportDecoder(nn.Module):
    """Functional Llama/Qwen2 decoder over the weights of a transformers ``*ForCausalLM``."""

    def __init__(self, hf_model: nn.Module, arch: ArchFacts, max_positions: int):
        super().__init__()
        self.arch = arch
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = _RMSNorm(inner.norm.weight, arch.rms_norm_eps)
        self.input_norms = nn.ModuleList(_RMSNorm(l.input_layernorm.weight, arch.rms_norm_eps) for l in inner.layers)
        self.post_norms = nn.ModuleList(
            _RMSNorm(l.post_attention_layernorm.weight, arch.rms_norm_eps) for l in inner.layers
        )
        self.lm_head = hf_model.lm_head
        rotary = inner.rotary_emb
        inv_freq = rotary.inv_freq.detach().double()
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos_cache", (freqs.cos() * scaling).float(), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * scaling).float(), persistent=False)
        self.scale = 1.0 / math.sqrt(arch.head_dim)

    def forward(self, input_ids, seqlens_k, total_sequence_length, logits_index, past: list[torch.Tensor]):
        a = self.arch
        h = self.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self.input_norms[i](h)
            out, pk, pv = group_query_attention(
                attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), past[2 * i], past[2 * i + 1],
                seqlens_k, total_sequence_length, self.cos_cache, self.sin_cache,
                a.num_heads, a.num_kv_heads, self.scale,
            )
            presents += [pk, pv]
            h = h + attn.o_proj(out)
            x = self.post_norms[i](h)
            h = h + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = self.norm(h.index_select(1, logits_index))
        return (self.lm_head(h), *presents)


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "seqlens_k", "total_sequence_length", "logits_index"]
    for i in range(num_layers):
        names += [f"past_key.{i}", f"past_value.{i}"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present_key.{i}", f"present_value.{i}"]
    return names


def export_decoder(hf_model: nn.Module, arch: ArchFacts, out_path: Path, max_positions: int) -> Path:
    """Export ``hf_model`` to ``out_path`` (weights as external data beside it)."""
    if arch.head_dim % 16:
        from ..errors import UnsupportedError

        raise UnsupportedError(
            f"head_dim {arch.head_dim} is not a multiple of 16, which ONNX Runtime's GroupQueryAttention "
            "requires for rotary embedding"
        )
    _register_gqa_schema()
    module = ExportDecoder(hf_model, arch, max_positions).eval()
    s, cap, n = 3, 16, 2
    args = (
        torch.zeros((1, s), dtype=torch.int64),
        torch.tensor([s - 1], dtype=torch.int32),
        torch.tensor(s, dtype=torch.int32),
        torch.arange(s - n, s, dtype=torch.int64),
        [torch.zeros((1, arch.num_kv_heads, cap, arch.head_dim)) for _ in range(2 * arch.num_layers)],
    )
    seq = torch.export.Dim("sequence", min=1, max=max_positions)
    capacity = torch.export.Dim("capacity", min=1, max=max_positions)
    keep = torch.export.Dim("num_logits", min=1, max=max_positions)
    dynamic_shapes = {
        "input_ids": {1: seq},
        "seqlens_k": None,
        "total_sequence_length": None,
        "logits_index": {0: keep},
        "past": [{2: capacity}] * (2 * arch.num_layers),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names(arch.num_layers),
            output_names=output_names(arch.num_layers),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={torch.ops.edgedec.group_query_attention.default: _gqa_translation},
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    model = tidy(program.model_proto, arch)
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_path.name + ".data", size_threshold=1024)
    return out_path


def tidy(model: onnx.ModelProto, arch: ArchFacts) -> onnx.ModelProto:
    """Make the exported graph readable: weight names from the torch module, named symbolic dims,
    no bulky exporter metadata (stack traces, fx nodes)."""
    tidy_names(model)
    dims = {
        "input_ids": [1, "sequence"],
        "logits_index": ["num_logits"],
        "logits": [1, "num_logits", getattr(arch, "head_rows", None) or arch.vocab_size],  # a trimmed draft: fewer
    }
    kv_shape = [1, arch.num_kv_heads, "capacity", arch.head_dim]
    for v in list(model.graph.input) + list(model.graph.output):
        shape = dims.get(v.name, kv_shape if v.name.startswith(("past_", "present_")) else None)
        if shape is None:
            continue
        for d, s in zip(v.type.tensor_type.shape.dim, shape):
            if isinstance(s, str):
                d.dim_param = s
            else:
                d.dim_value = s
    return model


def tidy_names(model: onnx.ModelProto) -> None:
    """Weight names from the torch module's scopes; drop exporter metadata and value_info (in place)."""
    renames: dict[str, str] = {}
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            scopes = meta.get("pkg.torch.onnx.name_scopes", "")
            try:
                scope = ast.literal_eval(scopes)[-2]  # ['', 'layers.0.self_attn.q_proj', 'linear']
            except (ValueError, SyntaxError, IndexError):
                scope = ""
            if scope and node.input[1] not in renames:
                renames[node.input[1]] = f"{scope}.weight"
        del node.metadata_props[:]
    for init in model.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    del model.metadata_props[:]
    del model.graph.value_info[:]
    model.producer_name = "edgedec"


def verify_against_source(hf_model: nn.Module, model_path: Path, arch: ArchFacts, seed: int = 0) -> dict:
    """Run the exported graph on ONNX Runtime against the source model on fixed token ids.

    Covers a multi-token prefill, one single-token decode and one multi-token step on top of a cache.
    Returns the max absolute logit difference over all of them.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, arch.vocab_size, size=12, dtype=np.int64)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids)[None]).logits[0].float().numpy()  # (12, vocab)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    cap = 16
    past = [np.zeros((1, arch.num_kv_heads, cap, arch.head_dim), np.float32) for _ in range(2 * arch.num_layers)]
    names = input_names(arch.num_layers)
    diffs, start = [], 0
    for n in (9, 1, 2):
        feed = dict(zip(names[4:], past))
        feed.update(
            input_ids=ids[None, start : start + n],
            seqlens_k=np.array([start + n - 1], np.int32),
            total_sequence_length=np.array(start + n, np.int32),
            logits_index=np.arange(n, dtype=np.int64),
        )
        logits, *past = sess.run(None, feed)
        diffs.append(float(np.abs(logits[0] - ref[start : start + n]).max()))
        start += n
    return {"max_abs_logit_diff": max(diffs), "tokens": int(len(ids)), "reference": "transformers",
            "logit_scale": float(np.abs(ref).max())}
