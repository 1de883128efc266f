"""Where an int4 KV cache loses quality: fake-quantize SmolLM2's cache in torch, one variant at a time.

Each variant quantizes and dequantizes the keys (after rotary) and values that attention reads, with the
kv-cache pass's own formula, calibration and scale rules (``KvCachePass._layer_scales``; keys rotated to
positions across the context, centred), and scores held-out text in one causal pass; the perplexity
ratio is against the float cache. Layers listed by ``--int8-layers`` (default: a bundle's choice, from
``--bundle``) use int8. It runs the source model in transformers, so it is a benchmark, not runtime code.

    python benchmarks/kv_quant_sim.py --text held-out.txt --bundle bundles/smol-kv4 --tokens 8192

Variants: ``keys`` / ``values`` (only one side quantized), ``centred`` (both, keys centred: the pass
with k_rotate=off), ``rotated`` (keys times a Hadamard matrix, least-error clip: the default),
``rotated-noclip``, ``rotated-values`` (values times H instead), ``token-values`` (centred keys,
values with per-token scales, which the kernel does not offer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgedec.models.source import load
from edgedec.passes.kv_cache import KvCacheConfig, KvCachePass, dequantize, layer_ranges, quantize
from edgedec.passes.qdq import default_calibration_text
from edgedec.runtime.kv_cache import hadamard, rotate_halves

VARIANTS = ("keys", "values", "centred", "rotated", "rotated-noclip", "rotated-values", "token-values")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", required=True, help="held-out text file")
    ap.add_argument("--model", help="model to simulate (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--bundle", help="an int4-KV bundle whose int8 layers to copy")
    ap.add_argument("--int8-layers", default="", help="comma-separated layers kept int8 (overrides --bundle)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.int8_layers:
        int8 = {int(x) for x in args.int8_layers.split(",")}
    elif args.bundle:
        kv = json.loads((Path(args.bundle) / "manifest.json").read_text())["kv_cache"]
        int8 = {l for l, e in enumerate(kv.get("layers") or []) if e["kv_dtype"] == "int8"}
    else:
        int8 = set()

    source = load(args.model)
    model = source.model
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(source.tokenizer_json)
    held = tok.encode(Path(args.text).read_text()).ids[:args.tokens]
    calibration = tok.encode(default_calibration_text()).ids[:2048]
    inv_freq = model.model.rotary_emb.inv_freq.double().numpy()
    positions = model.config.max_position_embeddings
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    h = hadamard(head_dim)

    def angles(p: np.ndarray):
        a = p[:, None] * inv_freq[None]
        return np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)

    state = {"variant": None, "capture": {}}

    def attention(module, query, key, value, attention_mask, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        l, v = module.layer_idx, state["variant"]
        if v == "capture":
            state["capture"].setdefault(l, []).append((key[0].numpy().copy(), value[0].numpy().copy()))
        elif v is not None:
            k, x = fake_quant(v, l, key[0].numpy(), value[0].numpy())
            key, value = torch.from_numpy(k)[None], torch.from_numpy(x)[None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register("edgedec_fake_quant", attention)
    model.config._attn_implementation = "edgedec_fake_quant"

    def nll(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1)
        return -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()

    state["variant"] = "capture"  # calibration: 2 x 1,024 tokens, keys moved to positions across the context
    for s in range(2):
        with torch.no_grad():
            model(torch.tensor([calibration[s * 1024:(s + 1) * 1024]]))
    rng = np.random.default_rng(0)
    calib = {}
    for l, parts in state["capture"].items():
        keys, values = [], []
        for k, v in parts:
            c, s = angles(np.arange(k.shape[1], dtype=np.float64))
            c2, s2 = angles(rng.integers(0, positions, k.shape[1]).astype(np.float64))
            keys.append(rotate_halves(rotate_halves(k, c, -s), c2, s2))
            values.append(v)
        calib[l] = (keys, values)
    plain, clipped = KvCachePass(KvCacheConfig(dtype="int4", k_rotate="off")), \
        KvCachePass(KvCacheConfig(dtype="int4", clip="mse"))
    scales = {}

    def layer(variant: str, l: int):
        """(offset, key transform, key scale, value transform, value scale) of a layer in a variant."""
        if (variant, l) not in scales:
            keys, values = calib[l]
            offset = np.concatenate([k[:, 1:] for k in keys], 1).mean(1)
            kt = h if variant in ("rotated", "rotated-noclip") else np.eye(head_dim, dtype=np.float32)
            vt = h if variant == "rotated-values" else np.eye(head_dim, dtype=np.float32)
            k = (np.concatenate(keys, 1) - offset[:, None]) @ kt
            v = np.concatenate(values, 1) @ vt
            dtype = "int8" if l in int8 else "int4"
            rule = clipped if variant == "rotated" else plain
            r = rule._layer_scales(dtype, layer_ranges(k, v, offset))
            scales[(variant, l)] = (offset, kt, r["key"][0][0, :, 0, :], vt, r["value"][0][0, :, 0, :], dtype)
        return scales[(variant, l)]

    def fq(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
        return dequantize(quantize(x, scale[:, None, :], dtype), scale[:, None, :], dtype)

    def fake_quant(variant: str, l: int, k: np.ndarray, v: np.ndarray):
        kind = "centred" if variant in ("keys", "values", "token-values") else variant
        offset, kt, ks, vt, vs, dtype = layer(kind, l)
        kq = (fq((k - offset[:, None]) @ kt, ks, dtype) @ kt.T + offset[:, None]).astype(np.float32)
        vq = (fq(v @ vt, vs, dtype) @ vt.T).astype(np.float32)
        if variant == "token-values":
            qmax = 7 if dtype == "int4" else 127
            step = np.maximum(np.abs(v).max(-1, keepdims=True) / qmax, 1e-8)
            vq = (np.clip(np.rint(v / step), -qmax - 1, qmax) * step).astype(np.float32)
        return (kq if variant != "values" else k), (vq if variant != "keys" else v)

    state["variant"] = None
    ref = nll(held)
    print(json.dumps({"variant": "float", "tokens": len(held), "perplexity": round(float(np.exp(ref.mean())), 4)}))
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        state["variant"] = variant
        x = nll(held)
        print(json.dumps({"variant": variant, "perplexity": round(float(np.exp(x.mean())), 4),
                          "ratio": round(float(np.exp(x.mean() - ref.mean())), 4)}), flush=True)


if __name__ == "__main__":
    main()
