"""The TVM int4 kernels one by one: float activations vs int8 activations (AVX512-VNNI), SmolLM2's shapes.

    python benchmarks/tvm_int4_kernels.py [--threads 2] [--rounds 7] [--mb 100] [--json out.json]

Each kernel runs over ``--mb`` megabytes of distinct copies of one random 4-bit weight, so its weights
stream from memory as in the model (a single copy would sit in cache and flatter the float kernel).
Rounds alternate the kernels; the figure is the median per call and the ratio float / int8 is what to
compare across machines. Also reports the int8 kernel's error relative to the exact product. Without
AVX512-VNNI only the float kernels run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}  # (in, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mb", type=float, default=100.0, help="megabytes of distinct weight copies per kernel")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts

    import numpy as np
    import tvm

    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_cpu_flags, host_llvm_target

    target = tvm.target.Target(host_llvm_target(args.threads))
    vnni = tvm_quant.VNNI_FLAG in host_cpu_flags()
    build = lambda f: tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target)["main"]  # noqa: E731
    rng = np.random.default_rng(0)
    results = {}
    for name, (k, n) in SHAPES.items():
        q = tvm_quant.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), 4)
        mb = (q.words.nbytes + q.scale.nbytes + q.offset.nbytes) / 1e6
        copies = max(2, int(args.mb / mb))
        weights = [[tvm.runtime.tensor(a.copy()) for a in (q.words, q.scale, q.offset)] for _ in range(copies)]
        kernels = {"float": build(tvm_quant.gemv_kernel(k, n, 4))}
        if vnni:
            kernels["int8"] = build(tvm_quant.gemv_int8_kernel(k, n))
        x_np = rng.standard_normal((1, 1, k)).astype(np.float32)
        x = tvm.runtime.tensor(x_np)
        ys = {kind: tvm.runtime.tensor(np.zeros((1, 1, n), np.float32)) for kind in kernels}
        times = {kind: [] for kind in kernels}
        for _ in range(args.rounds):
            for kind, f in kernels.items():
                t = time.perf_counter()
                for w in weights:
                    f(x, *w, ys[kind])
                times[kind].append((time.perf_counter() - t) / copies * 1e6)
        exact = x_np[0] @ q.dequantize().T
        row = {"in": k, "out": n, "weight_mb": round(mb, 3), "copies": copies}
        for kind in kernels:
            us = statistics.median(times[kind])
            row[f"{kind}_us"] = round(us, 2)
            row[f"{kind}_gb_s"] = round(mb / us * 1e3, 1)
            row[f"{kind}_rel_error"] = float(np.abs(ys[kind].numpy()[0] - exact).max() / np.abs(exact).max())
        if vnni:
            row["float_over_int8"] = round(row["float_us"] / row["int8_us"], 2)
        results[name] = row
        print(f"{name:8s} {k:5d}->{n:<5d} " + "  ".join(
            f"{kind} {row[f'{kind}_us']:7.1f} us ({row[f'{kind}_gb_s']:5.1f} GB/s, "
            f"rel. error {row[f'{kind}_rel_error']:.1e})"
            for kind in kernels) + (f"  float/int8 {row['float_over_int8']:.2f}x" if vnni else ""))
    if not vnni:
        print("this CPU lacks AVX512-VNNI: the int8-activation kernels were not run", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "vnni": vnni, "kernels": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
