"""Export a Llama/Qwen2 model to a static-shape ONNX decoder of standard ONNX ops only (for NPUs).

NPU runtimes (ONNX Runtime's QNN, NNAPI and CoreML execution providers) compile a graph ahead of time
for fixed tensor shapes and take only standard ONNX operators: no ``GroupQueryAttention``, no in-place
cache, no dynamic dims. So this graph processes a fixed chunk of ``C`` tokens against a fixed cache
of ``T`` positions, and attention is spelled out with MatMul / Softmax / Concat::

    inputs
      input_ids        int32  (1, C)                    the new tokens (padding: any valid id)
      position_ids     int32  (1, C)                    position of each new token (rotary)
      attention_mask   float  (1, 1, C, T + C)          additive: 0 attends, MASK_VALUE does not;
                                                        columns [0, T) are the cache, [T, T + C) the chunk
      past_key.{i}     float  (1, kv_heads, T, head_dim)   layer i's cache (slots not yet written: masked)
      past_value.{i}   float  (1, kv_heads, T, head_dim)
    outputs
      logits           float  (1, C, vocab)
      new_key.{i}      float  (1, kv_heads, C, head_dim)   rotated keys of the chunk
      new_value.{i}    float  (1, kv_heads, C, head_dim)

The graph never writes the cache: the host copies the valid rows of ``new_*`` into its cache buffer
at the chunk's positions (:mod:`edgedec.runtime.static`). Every tensor has rank <= 4 (NNAPI's
limit); grouped-query heads are handled by folding each group's query heads into the row axis, so
keys and values are never repeated.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..models.arch import ArchFacts
from .export import IR_VERSION, OPSET, tidy_names

log = logging.getLogger(__name__)

MASK_VALUE = -10000.0  # finite (fits float16 and quantizes); exp(-1e4) is 0 in float32


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "position_ids", "attention_mask"]
    for i in range(num_layers):
        names += [f"past_key.{i}", f"past_value.{i}"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"new_key.{i}", f"new_value.{i}"]
    return names


class _RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight  # Mul, not Pow


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticDecoder(nn.Module):
    """Functional Llama/Qwen2 decoder with explicit attention over a fixed-size cache."""

    def __init__(self, hf_model: nn.Module, arch: ArchFacts, max_positions: int):
        super().__init__()
        self.arch = arch
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        eps = arch.rms_norm_eps
        self.norm = _RMSNorm(inner.norm.weight, eps)
        self.input_norms = nn.ModuleList(_RMSNorm(l.input_layernorm.weight, eps) for l in inner.layers)
        self.post_norms = nn.ModuleList(_RMSNorm(l.post_attention_layernorm.weight, eps) for l in inner.layers)
        self.lm_head = hf_model.lm_head
        rotary = inner.rotary_emb
        inv_freq = rotary.inv_freq.detach().double()
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos_table", (freqs.cos() * scaling).float(), persistent=False)
        self.register_buffer("sin_table", (freqs.sin() * scaling).float(), persistent=False)
        self.scale = 1.0 / math.sqrt(arch.head_dim)

    def forward(self, input_ids, position_ids, attention_mask, past: list[torch.Tensor]):
        a = self.arch
        h_, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
        g = h_ // kv
        h = self.embed_tokens(input_ids)  # (1, C, hidden)
        cos = nn.functional.embedding(position_ids, self.cos_table).unsqueeze(2)  # Gather: (1, C, 1, D)
        sin = nn.functional.embedding(position_ids, self.sin_table).unsqueeze(2)
        # rows of a kv head's group: query head j of the group, chunk position c -> row j * C + c
        mask = torch.cat([attention_mask] * g, dim=2) if g > 1 else attention_mask  # (1, 1, g*C, T+C)
        news = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self.input_norms[i](h)
            q = attn.q_proj(x).view(1, -1, h_, d)  # -1, never C: the graph re-declares for any chunk
            k = attn.k_proj(x).view(1, -1, kv, d)
            v = attn.v_proj(x).view(1, -1, kv, d)
            q = (q * cos + _rotate_half(q) * sin).transpose(1, 2)  # (1, H, C, D)
            k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)  # (1, kv, C, D)
            v = v.transpose(1, 2)
            news += [k, v]
            keys = torch.cat([past[2 * i], k], dim=2)  # (1, kv, T+C, D)
            values = torch.cat([past[2 * i + 1], v], dim=2)
            qg = q.contiguous().view(1, kv, -1, d)  # heads are ordered kv-major: head = kv_idx * g + j
            scores = (qg @ keys.transpose(2, 3)) * self.scale + mask  # (1, kv, g*C, T+C)
            out = scores.softmax(-1) @ values  # (1, kv, g*C, D)
            out = out.view(1, h_, -1, d).transpose(1, 2).contiguous().view(1, -1, h_ * d)
            h = h + attn.o_proj(out)
            x = self.post_norms[i](h)
            h = h + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return (self.lm_head(self.norm(h)), *news)


def export_static_decoder(hf_model: nn.Module, arch: ArchFacts, out_path: Path, max_positions: int,
                          chunk: int) -> Path:
    """Export ``hf_model`` with static shapes: a chunk of ``chunk`` tokens over a cache of ``max_positions``."""
    module = StaticDecoder(hf_model, arch, max_positions).eval()
    c, t = chunk, max_positions
    args = (
        torch.zeros((1, c), dtype=torch.int32),
        torch.arange(c, dtype=torch.int32)[None],
        torch.zeros((1, 1, c, t + c)),
        [torch.zeros((1, arch.num_kv_heads, t, arch.head_dim)) for _ in range(2 * arch.num_layers)],
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names(arch.num_layers),
                                    output_names=output_names(arch.num_layers), opset_version=OPSET,
                                    optimize=True, verbose=False)
    model = program.model_proto
    tidy_names(model)
    model.ir_version = IR_VERSION
    model = onnx.shape_inference.infer_shapes(model)  # every intermediate shape is static: record them
    onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_path.name + ".data", size_threshold=1024)
    return out_path


def verify_static_against_source(hf_model: nn.Module, model_path: Path, arch: ArchFacts, chunk: int,
                                 capacity: int, seed: int = 0) -> dict:
    """Run the static graph through the runtime's static session against the source model's logits.

    Covers a prefill longer than one chunk, a single-token step and a two-token step on the cache.
    """
    from ..runtime.static import StaticDecoderSession

    rng = np.random.default_rng(seed)
    n_ids = min(chunk + 5, capacity)
    ids = rng.integers(0, arch.vocab_size, size=n_ids, dtype=np.int64)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids)[None]).logits[0].float().numpy()  # (n_ids, vocab)
    sess = StaticDecoderSession.from_file(model_path, arch.to_dict(), capacity, threads=1)
    diffs, start = [], 0
    for n in (n_ids - 3, 1, 2):
        logits = sess.forward(ids[start:start + n].tolist(), logits_rows=range(n))
        diffs.append(float(np.abs(logits - ref[start:start + n]).max()))
        start += n
    return {"max_abs_logit_diff": max(diffs), "tokens": int(n_ids), "reference": "transformers",
            "logit_scale": float(np.abs(ref).max())}
