"""What speculation costs on a TVM bundle: a pass over M rows against one decode step (T(M)/T(1), M = 1..8),
and a draft model's step against the target's, in one interleaved run.

    python benchmarks/verify_cost.py TARGET [--draft DRAFT] [--rows 1-8] [--context 200] [--rounds 30]
    python benchmarks/verify_cost.py --kernels           # no bundle: the 1.5B's int4 kernels alone
                                     [--alpha 0.88] [--json out.json]

Both bundles are loaded once in this process with ``--context`` random tokens in their caches. Each round
times every M on the target (and one decode step of the draft) with the same random ids, rolling the cache
back after each pass; a figure is the median over the rounds. Printed beside T(M)/T(1): llama.cpp's on
Qwen2.5-Coder-1.5B Q4_K_M on this machine (issue 20: 1.6x at 2 rows, 2.5x at 4, 5.6x at 8).

With ``--draft`` and ``--alpha`` (the chance that the draft's greedy token is the target's; 0.88 for the
Qwen2.5-Coder 0.5B/1.5B pair on code, measured with llama.cpp), it prints what drafting k tokens would give
at these costs, if acceptance were independent per token (the model the adaptive draft length uses):

    tokens per round = (1 - alpha^(k+1)) / (1 - alpha),   cost = k * draft_step + T(k+1)   (in target steps)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

LLAMA_CPP = {1: 1.0, 2: 1.6, 4: 2.5, 8: 5.6}  # T(M)/T(1), llama.cpp, Qwen2.5-Coder-1.5B Q4_K_M, 2 threads
# Qwen2.5-Coder-1.5B: (in, out, bits, per step) of every block-quantized weight a step reads with -q int4
QWEN15_WEIGHTS = {"q/o": (1536, 1536, 4, 56), "k/v": (1536, 256, 4, 56), "gate/up": (1536, 8960, 4, 56),
                  "down": (8960, 1536, 4, 28), "head": (1536, 151936, 8, 1)}


def kernels_only(args, rows) -> dict:
    """``--kernels``: no bundle, the 1.5B's block-quantized kernels alone (float and int8 activations), each
    over distinct weight copies of at least ``--mb`` MB so that they stream from memory as in the model; a
    step's T(M) is the sum over its weights (attention and the small kernels left out)."""
    import numpy as np
    import tvm

    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_cpu_flags, host_llvm_target

    target = tvm.target.Target(host_llvm_target(args.threads))
    kinds = ["float"] + (["int8"] if tvm_quant.VNNI_FLAG in host_cpu_flags() else [])
    build = lambda f: tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target)["main"]
    rng = np.random.default_rng(0)
    total = {kind: {m: 0.0 for m in rows} for kind in kinds}
    for name, (k, n, bits, count) in QWEN15_WEIGHTS.items():
        q = tvm_quant.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), bits)
        mb = (q.words.nbytes + q.scale.nbytes + q.offset.nbytes) / 1e6
        copies = max(1, int(args.mb / mb))
        weights = [[tvm.runtime.tensor(a.copy()) for a in (q.words, q.scale, q.offset)] for _ in range(copies)]
        fns = {}
        for kind in kinds:
            one = tvm_quant.gemv_kernel if kind == "float" else tvm_quant.gemv_int8_kernel
            many = tvm_quant.gemm_kernel if kind == "float" else tvm_quant.gemm_int8_kernel
            fns[kind] = (build(one(k, n, bits)), build(many(k, n, bits)))
        xs = {m: tvm.runtime.tensor(rng.standard_normal((1, m, k)).astype(np.float32)) for m in rows}
        ys = {m: tvm.runtime.tensor(np.zeros((1, m, n), np.float32)) for m in rows}
        times = {(kind, m): [] for kind in kinds for m in rows}
        for r in range(args.rounds + 1):
            for m in (rows if r % 2 == 0 else rows[::-1]):
                for kind in kinds:
                    f = fns[kind][0 if m == 1 else 1]
                    t = time.perf_counter()
                    for w in weights:
                        f(xs[m], *w, ys[m])
                    if r:
                        times[kind, m].append((time.perf_counter() - t) / copies)
        line = []
        for kind in kinds:
            for m in rows:
                total[kind][m] += count * statistics.median(times[kind, m])
            t1 = statistics.median(times[kind, 1])
            line.append(f"{kind}: 1 row {t1 * 1e6:7.0f} us ({mb / t1 / 1e3:4.1f} GB/s), 8 rows "
                        f"{statistics.median(times[kind, rows[-1]]) / t1:4.2f}x")
        print(f"{name:8s} {k:5d}->{n:<6d} {bits}-bit x{count:<3d} " + "; ".join(line), flush=True)
    out = {}
    print("   M  " + "  ".join(f"{kind:>8s}" for kind in kinds) + "  llama.cpp   (T(M)/T(1), the weights of one step)")
    for m in rows:
        ref = f"{LLAMA_CPP[m]:.1f}" if m in LLAMA_CPP else "-"
        print(f"  {m:2d}  " + "  ".join(f"{total[kind][m] / total[kind][1]:8.2f}" for kind in kinds) + f"  {ref:>9s}")
    for kind in kinds:
        out[kind] = {"step_ms": round(total[kind][1] * 1e3, 2),
                     "t_m_over_t_1": {str(m): round(total[kind][m] / total[kind][1], 3) for m in rows}}
        print(f"{kind}: the weights of one step take {total[kind][1] * 1e3:.1f} ms")
    return {"kernels": out, "threads": args.threads, "llama_cpp": {str(m): v for m, v in LLAMA_CPP.items()}}


def _rows(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return sorted({int(m) for m in text.split(",")})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?", help="a TVM bundle (or none, with --kernels)")
    ap.add_argument("--kernels", action="store_true", help="no bundle: time the Qwen2.5-Coder-1.5B's int4 kernels "
                                                           "alone (float and int8 activations)")
    ap.add_argument("--mb", type=float, default=100.0, help="--kernels: MB of distinct weight copies per kernel")
    ap.add_argument("--draft", action="append", default=[],
                    help="a draft bundle (or a bundle with one in draft/): time its decode step too (repeatable: "
                         "several drafts in the same rounds, e.g. before and after VocabTrim)")
    ap.add_argument("--rows", default="1-8", help="M to measure: a range 1-8 or a list 1,2,4,8 (1 always)")
    ap.add_argument("--context", type=int, default=200, help="tokens in the cache before each pass")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.88, help="per-token acceptance for the printed bound")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts

    from pathlib import Path

    import numpy as np

    from edgedec.runtime.bundle import Bundle
    from edgedec.runtime.tvm_session import TvmDecoderSession

    rows = sorted({1, *_rows(args.rows)})
    if args.kernels:
        result = kernels_only(args, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    if not args.target:
        ap.error("give a TVM bundle, or --kernels")
    rng = np.random.default_rng(0)

    def session(path):
        s = TvmDecoderSession(Bundle.open(path), args.threads, args.context + max(rows) + 1)
        s.forward(rng.integers(0, s.vocab, args.context).tolist())
        return s

    target = session(args.target)
    drafts = {}
    for name in args.draft:
        d = Path(name)
        drafts[name] = session(d / "draft" if (d / "draft" / "manifest.json").is_file() else d)

    def one_pass(s, ids) -> float:
        t = time.perf_counter()
        if len(ids) == 1:
            s.decode_one(ids[0])
        else:
            s.forward(ids, list(range(len(ids))))
        s.kv.length = args.context
        return time.perf_counter() - t

    times: dict = {m: [] for m in rows}
    times.update({name: [] for name in drafts})
    for r in range(args.rounds + 3):  # three warm-up rounds
        for m in (rows if r % 2 == 0 else rows[::-1]):
            dt = one_pass(target, rng.integers(0, target.vocab, m).tolist())
            if r >= 3:
                times[m].append(dt)
            if m == 1:
                for name, draft in drafts.items():
                    dt = one_pass(draft, rng.integers(0, target.vocab, 1).tolist())
                    if r >= 3:
                        times[name].append(dt)
    step = statistics.median(times[1])
    curve = {m: statistics.median(times[m]) / step for m in rows}
    print(f"target {Path(args.target).name}: one step {step * 1e3:.2f} ms ({1 / step:.1f} steps/s), "
          f"context {args.context}, {args.threads} threads")
    print("   M  T(M)/T(1)  llama.cpp")
    for m in rows:
        ref = f"{LLAMA_CPP[m]:.1f}" if m in LLAMA_CPP else "-"
        print(f"  {m:2d}  {curve[m]:9.2f}  {ref:>9s}")
    result = {"target": args.target, "context": args.context, "threads": args.threads, "step_ms": step * 1e3,
              "t_m_over_t_1": {str(m): round(v, 3) for m, v in curve.items()},
              "llama_cpp": {str(m): v for m, v in LLAMA_CPP.items()}}
    result["drafts"] = {}
    for name in drafts:
        c = statistics.median(times[name]) / step
        a = args.alpha
        print(f"draft {name}: one step {statistics.median(times[name]) * 1e3:.2f} ms = {c:.3f} target steps")
        bound = {}
        for k in range(1, max(rows)):
            tokens = (1 - a ** (k + 1)) / (1 - a)
            bound[str(k)] = round(tokens / (k * c + curve[k + 1]), 3)
        best = max(bound, key=bound.get)
        print(f"  at alpha {a}: speed-up by draft length " + ", ".join(f"k={k} {v:.2f}x" for k, v in bound.items())
              + f"; best k={best}")
        result["drafts"][name] = {"step_ms": statistics.median(times[name]) * 1e3, "draft_cost": round(c, 3),
                                  "alpha": a, "bound_by_k": bound}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
