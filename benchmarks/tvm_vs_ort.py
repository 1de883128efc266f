"""cpu-tvm vs cpu (ONNX Runtime): greedy identity on 8 prompts and decode speed, in one run.

    python benchmarks/tvm_vs_ort.py TVM_BUNDLE CPU_BUNDLE [--tokens 32] [--threads 2] [--rounds 3] [--json out.json]

Both bundles must come from the same source (e.g. `edgedec compile --target cpu-tvm` and a float32
`edgedec compile`). Greedy tokens must match exactly (exit 1 otherwise). Speed: decode tokens/s of
each engine, alternating the two engines per prompt and round, the median over all generations;
the ratio is what to compare across machines (absolute figures drift with load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a short poem about the sea.",
    "List three uses of a paperclip:",
    "In 1969, the first person to walk on the Moon",
    "import numpy as np\n\n# compute the mean of an array\n",
    "Explain what a hash table is in one paragraph.",
    "Once upon a time, in a small village,",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tvm_bundle")
    ap.add_argument("cpu_bundle")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds over the prompts (after the identity check)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from edgedec.runtime import Engine

    engines = {"tvm": Engine.load(args.tvm_bundle, threads=args.threads, context_length=args.context,
                                  trust=True),
               "ort": Engine.load(args.cpu_bundle, threads=args.threads, context_length=args.context)}
    mismatches = []
    for i, prompt in enumerate(PROMPTS):
        ids = {k: [t.id for t in e.generate(prompt, max_new_tokens=args.tokens, ignore_eos=True, drafter=None)]
               for k, e in engines.items()}
        same = ids["tvm"] == ids["ort"]
        if not same:
            first = next(j for j, (a, b) in enumerate(zip(ids["tvm"], ids["ort"])) if a != b)
            mismatches.append({"prompt": i, "first_difference": first})
        print(f"prompt {i}: {'identical' if same else 'DIFFERENT'} ({len(ids['ort'])} tokens)", flush=True)
    speed = {k: [] for k in engines}
    for _ in range(args.rounds):
        for prompt in PROMPTS:
            for k, e in engines.items():
                for _tok in e.generate(prompt, max_new_tokens=args.tokens, ignore_eos=True, drafter=None):
                    pass
                speed[k].append(e.last_stats.decode_tok_s)
    result = {
        "prompts": len(PROMPTS), "tokens": args.tokens, "threads": args.threads,
        "greedy_identical": not mismatches, "mismatches": mismatches,
        "decode_tok_s": {k: round(statistics.median(v), 1) for k, v in speed.items()},
    }
    result["tvm_over_ort"] = round(result["decode_tok_s"]["tvm"] / result["decode_tok_s"]["ort"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
