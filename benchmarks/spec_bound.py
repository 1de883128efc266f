"""How far speculation with a drafter can go on a bundle, whatever the verification costs.

    python benchmarks/spec_bound.py BUNDLE [--drafter ngram+recycling] [--draft-len 8] [--slopes 0,0.18]

Runs the prompt set (``benchmarks/prompts/*.jsonl``, one category per file) greedily with the drafter at a
fixed draft length (no adaptation, so every verification checks as many drafts as the drafter gives) and
counts, per category, the drafts accepted per verification. Timing plays no part: the speed-up is computed
from the counts for a pass over M rows that costs ``1 + slope * (M - 1)`` one-row steps, so slope 0 (a free
verification) gives the most any verification kernel could get out of this drafter on this model:

    speed-up = decode tokens / (plain steps + verifications + slope * drafted tokens
                                + draft_cost * drafted tokens)

``benchmarks/tvm_verify_cost.py`` measures the slope of a bundle (SmolLM2 int4 on TVM: ~0.16-0.18 here);
``benchmarks/verify_cost.py TARGET --draft DRAFT`` measures the slope and, for a draft model
(``--drafter model:PATH``), ``--draft-cost``: one draft step in target steps (n-gram drafters: ~0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--drafter", default="ngram+recycling")
    ap.add_argument("--draft-len", type=int, default=8)
    ap.add_argument("--slopes", default="0,0.18", help="comma-separated verification cost per extra row")
    ap.add_argument("--draft-cost", type=float, default=0.0,
                    help="target steps one drafted token costs (a draft model's step over the target's)")
    ap.add_argument("--prompts", default=str(Path(__file__).parent / "prompts"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from edgedec.runtime import Engine

    engine = Engine.load(args.bundle, threads=args.threads, trust=True)  # the bundle you built and named
    slopes = [float(s) for s in args.slopes.split(",")]
    result = {}
    for path in sorted(Path(args.prompts).glob("*.jsonl")):
        counts = {"decode_tokens": 0, "verifications": 0, "drafted": 0, "accepted": 0}
        for line in path.read_text().splitlines():
            engine.forget_drafters()  # every prompt starts cold, as in `edgedec bench`
            tokens = list(engine.chat(json.loads(line)["messages"], max_new_tokens=args.new_tokens, ignore_eos=True,
                                      drafter=args.drafter, draft_len=args.draft_len, adaptive_draft=False))
            st = engine.last_stats
            counts["decode_tokens"] += len(tokens) - 1  # the first token comes from the prompt's pass
            counts["verifications"] += st.verify_steps
            counts["drafted"] += st.drafted_tokens
            counts["accepted"] += st.accepted_tokens
        plain = counts["decode_tokens"] - counts["accepted"] - counts["verifications"]
        cost = lambda slope, plain=plain, counts=counts: (plain + counts["verifications"]  # noqa: E731
                                                          + (slope + args.draft_cost) * counts["drafted"])
        speedups = {str(s): round(counts["decode_tokens"] / cost(s), 3) for s in slopes}
        per = max(counts["verifications"], 1)
        result[path.stem] = {**counts, "accepted_per_verification": round(counts["accepted"] / per, 3),
                             "drafted_per_verification": round(counts["drafted"] / per, 3), "speedup": speedups}
        print(f"{path.stem:10s} accepted/verification {counts['accepted'] / per:.2f} of {counts['drafted'] / per:.2f} "
              "drafted; speed-up " + ", ".join(f"{v:.2f}x at slope {k}" for k, v in speedups.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": args.bundle, "drafter": args.drafter,
                                               "draft_len": args.draft_len, "draft_cost": args.draft_cost,
                                               "categories": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
