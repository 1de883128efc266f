"""Greedy parity and decode speed of a gpu bundle against the cpu bundle, on a machine with a CUDA GPU.

Needs onnxruntime-gpu (matching the pinned onnxruntime version) and a visible GPU:

    pip install onnxruntime-gpu==1.31.1   # replaces the CPU-only onnxruntime wheel
    edgedec compile -o bundles/smol-cpu
    edgedec compile --target gpu -o bundles/smol-gpu
    python benchmarks/gpu_parity.py bundles/smol-cpu bundles/smol-gpu --tokens 64 --json

For every prompt both bundles decode greedily; the script reports per prompt the length of the common
prefix of the two token streams and whether they are identical (float16 vs float32 may part on a near
tie; the first differing position and the top-2 logit gap of the cpu bundle there are reported so a tie
can be told from a bug), and the decode tokens/s of each bundle (median over prompts). Exit code 1 when
less than --min-agreement of the generated tokens agree before the first near-tie divergence.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

PROMPTS = [
    "The capital of France is",
    "def quicksort(xs):\n    ",
    "Write a haiku about the sea.",
    "In 1969, the first humans",
    "The three laws of thermodynamics are",
    "Once upon a time, in a small village,",
]


def run(bundle: str, prompts: list[str], tokens: int, threads: int | None):
    from edgedec.runtime import Engine

    engine = Engine.load(bundle, threads=threads)
    out = []
    for p in prompts:
        ids = [t.id for t in engine.generate(p, max_new_tokens=tokens, ignore_eos=True, drafter=None)]
        out.append({"ids": ids, "decode_tok_s": engine.last_stats.decode_tok_s})
    return engine, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cpu_bundle")
    ap.add_argument("gpu_bundle")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-agreement", type=float, default=0.9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("error: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)",
              file=sys.stderr)
        return 2
    cpu_engine, cpu = run(args.cpu_bundle, PROMPTS, args.tokens, args.threads)
    gpu_engine, gpu = run(args.gpu_bundle, PROMPTS, args.tokens, args.threads)
    rows, agree, total = [], 0, 0
    for p, a, b in zip(PROMPTS, cpu, gpu):
        n = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), len(a["ids"]))
        row = {"prompt": p, "identical": a["ids"] == b["ids"], "common_prefix": n,
               "cpu_tok_s": a["decode_tok_s"], "gpu_tok_s": b["decode_tok_s"]}
        if n < len(a["ids"]):  # the cpu bundle's top-2 gap at the first difference: a near tie or a bug?
            ids = cpu_engine.encode(p) + a["ids"][:n]
            cpu_engine.decoder.kv.length = 0
            logits = cpu_engine.decoder.forward(ids)[-1]
            top = np.sort(logits)[-2:]
            row["gap_at_divergence"] = float(top[1] - top[0])
        rows.append(row)
        agree += n
        total += len(a["ids"])
    report = {
        "device": gpu_engine.decoder.provider,
        "agreement_before_divergence": agree / total,
        "identical_prompts": sum(r["identical"] for r in rows),
        "prompts": len(rows),
        "cpu_decode_tok_s_median": statistics.median(r["cpu_tok_s"] for r in rows),
        "gpu_decode_tok_s_median": statistics.median(r["gpu_tok_s"] for r in rows),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in rows:
            print(f"{r['common_prefix']:4d}/{args.tokens} identical={r['identical']!s:5} "
                  f"cpu {r['cpu_tok_s']:7.1f} tok/s  gpu {r['gpu_tok_s']:7.1f} tok/s  {r['prompt']!r}")
        print(f"agreement {report['agreement_before_divergence']:.3f}; median decode cpu "
              f"{report['cpu_decode_tok_s_median']:.1f} / gpu {report['gpu_decode_tok_s_median']:.1f} tok/s")
    return 0 if report["agreement_before_divergence"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
