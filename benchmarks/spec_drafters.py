"""Several drafters on one target bundle, in one interleaved run (``edgedec bench`` compares bundles; this
compares drafters): plain decoding, then each drafter, every worker loaded once and one pass of each per round.

    python benchmarks/spec_drafters.py TARGET --drafters auto,model:DRAFT,ngram,ngram+model:DRAFT \\
        [--prompts benchmarks/code_prompts] [--new-tokens 64] [--runs 2] [--threads 2] [--json out.json]

``auto`` is the bundle's own drafter (``compile --spec``). Per drafter: decode tokens/s and its ratio to
plain decoding within each round (median), per prompt category too, drafts accepted per verification,
the share of decode time spent drafting (host side, which includes a draft model's own steps) and inside
the target's runs, and the adaptive draft length's measured cost of a draft token in target steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("--drafters", default="auto,ngram", help="comma-separated; plain decoding always runs first")
    ap.add_argument("--prompts", default=str(Path(__file__).parent / "code_prompts"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-len", type=int)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from edgedec import bench

    prompts, categories = bench.load_prompt_set(args.prompts)
    options = bench.BenchOptions(warmup=args.warmup, runs=args.runs, new_tokens=args.new_tokens,
                                 threads=args.threads, draft_len=args.draft_len)
    drafters = [d for d in args.drafters.split(",") if d]
    entries = [(args.target, "plain", None)] + [(args.target, d, d) for d in drafters]
    phase = lambda name: _Phase(name)
    results = bench.measure_many(entries, prompts, options, phase)
    report = bench.BenchReport(options, args.prompts, len(prompts), results, categories)
    rows = report.to_dict()["bundles"]
    print(f"{len(prompts)} prompts x {args.new_tokens} tokens, {args.runs} timed rounds, {args.threads} threads; "
          f"target {args.target}")
    cats = list(dict.fromkeys(categories or []))
    head = f"{'drafter':34s} {'tok/s':>7s} {'x plain':>8s} " + " ".join(f"{c:>9s}" for c in cats) \
        + f" {'acc/ver':>7s} {'draft%':>7s} {'model%':>7s} {'d.cost':>6s}"
    print(head)
    for r in rows:
        sp = r["speculation"] or {}
        ratio = (r["round_ratios"] or {}).get("decode_tok_s", {}).get("median", r["ratios"]["decode_tok_s"])
        per_cat = " ".join(f"{(r['categories'][c]['round_ratio'] or {}).get('median', 1.0):9.2f}"
                           for c in cats) if r["categories"] else ""
        fmt = lambda v, f: format(v, f) if v is not None else "-"
        print(f"{r['name']:34s} {r['decode_tok_s']:7.1f} {ratio:8.2f} {per_cat} "
              f"{fmt(sp.get('mean_accepted_per_step'), '7.2f')} {fmt(sp.get('draft_share'), '7.1%')} "
              f"{fmt(sp.get('model_share'), '7.1%')} {fmt(sp.get('draft_cost'), '6.2f')}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


class _Phase:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        print(f"... {self.name}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
