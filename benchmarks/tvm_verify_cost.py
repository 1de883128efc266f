"""What a pass over M rows (a speculative verification) costs on TVM bundles, against a one-row decode step.

    python benchmarks/tvm_verify_cost.py BUNDLE [BUNDLE ...] [--rows 1,2,3,4,8] [--context 200] [--rounds 40]

Each bundle is loaded once in this process with ``--context`` random tokens in its cache. Every round
runs each M on every bundle (the bundles' order alternating from round to round) with the same random
ids, and rolls the cache back after each pass; the figure is the median time per pass, and its ratio to
the same bundle's one-row step. Speculation with M - 1 drafts pays only when a verification accepts
more than (ratio - 1) of them on average. Compare bundles within one run: this machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rows", default="1,2,3,4,8", help="comma-separated M (1 is always measured)")
    ap.add_argument("--context", type=int, default=200, help="tokens in the cache before each pass")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts

    import numpy as np

    from edgedec.runtime.bundle import Bundle
    from edgedec.runtime.tvm_session import TvmDecoderSession

    rows = sorted({1, *(int(m) for m in args.rows.split(","))})
    rng = np.random.default_rng(0)
    sessions = []
    for path in args.bundles:
        s = TvmDecoderSession(Bundle.open(path), args.threads, args.context + max(rows) + 1, trust=True)
        s.forward(rng.integers(0, s.vocab, args.context).tolist())
        sessions.append(s)

    def one_pass(s, ids) -> float:
        t = time.perf_counter()
        if len(ids) == 1:
            s.decode_one(ids[0])
        else:
            s.forward(ids, list(range(len(ids))))
        s.kv.length = args.context
        return time.perf_counter() - t

    times = {(k, m): [] for k in range(len(sessions)) for m in rows}
    for r in range(args.rounds + 3):  # three warm-up rounds
        for m in rows:
            ids = rng.integers(0, sessions[0].vocab, m).tolist()
            order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
            for k in order:
                dt = one_pass(sessions[k], ids)
                if r >= 3:
                    times[k, m].append(dt)
    result = {}
    for k, path in enumerate(args.bundles):
        step = statistics.median(times[k, 1])
        result[path] = {str(m): {"ms": round(statistics.median(times[k, m]) * 1e3, 3),
                                 "x_step": round(statistics.median(times[k, m]) / step, 3)} for m in rows}
        print(f"{os.path.basename(os.path.normpath(path))}: " + "  ".join(
            f"M={m} {result[path][str(m)]['ms']:.2f} ms ({result[path][str(m)]['x_step']:.2f}x)" for m in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "threads": args.threads, "bundles": result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
