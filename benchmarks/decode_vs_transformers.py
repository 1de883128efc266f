"""Decode speed of an edgedec bundle against transformers eager ``generate`` on the same weights.

    python benchmarks/decode_vs_transformers.py [--bundle DIR] [--prompts N] [--new-tokens N]
                                                [--threads 2] [--json OUT]

The bundle defaults to ``bundles/smollm2-135m-fp32``, compiled from the registry default (float32)
when it does not exist. The transformers reference loads the bundle's source (``manifest.source.path``)
through ``edgedec.models.source.load``, so both sides run the same float32 weights.

Method (one process, one run, both sides under the same conditions):
- Threads: ``torch.set_num_threads(T)`` and ``Engine.load(threads=T)``, T = ``--threads`` (default 2).
- Greedy, end-of-sequence disabled on both sides (edgedec ``ignore_eos=True``, transformers
  ``eos_token_id=None``), so every prompt produces exactly ``--new-tokens`` tokens on both; whether
  the token ids agree is reported as a sanity check.
- One untimed warm-up generation per side before the timed prompts.
- Decode tokens/s = (new tokens - 1) / (time of the last new token - time of the first new token), the
  prefill and first token excluded. edgedec reports these times in ``engine.last_stats``; for
  transformers a streamer records ``time.perf_counter()`` at every ``put`` (``generate`` puts the
  prompt first, then each new token as it is chosen). Time to first token is reported separately.
- The summary is the median over prompts of each side's decode tokens/s, and their ratio.

Absolute numbers drift between machines; compare the two columns of one run, on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France, and why is it famous?",
    "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Here is a shopping list:\n1. Eggs\n2.",
    "Once upon a time, in a small village at the edge of a dark forest,",
    "Explain the difference between a process and a thread.",
    "The first ten prime numbers are 2, 3, 5, 7,",
    "La vie est belle quand on prend le temps de",
    "Write a haiku about the sea.",
]
DEFAULT_BUNDLE = Path("bundles/smollm2-135m-fp32")


class _TokenClock:
    """A transformers streamer that timestamps each new token (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.extend([now] * int(value.numel()))

    def end(self):
        pass


def _transformers_run(model, ids: list[int], new_tokens: int) -> dict:
    import torch

    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id or 0, streamer=clock)
    tokens = out[0, len(ids):].tolist()
    decode_s = clock.times[-1] - clock.times[0]
    return {"tokens": tokens, "ttft_s": clock.times[0] - t0, "decode_s": decode_s,
            "decode_tok_s": (len(tokens) - 1) / decode_s if decode_s > 0 else 0.0}


def _edgedec_run(engine, ids: list[int], new_tokens: int) -> dict:
    tokens = [t.id for t in engine.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)]
    s = engine.last_stats
    return {"tokens": tokens, "ttft_s": s.ttft_s, "decode_s": s.decode_s, "decode_tok_s": s.decode_tok_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                    help=f"bundle directory (compiled from the default model if absent; default {DEFAULT_BUNDLE})")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"number of prompts (1-{len(PROMPTS)})")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=2, help="threads for both ONNX Runtime and torch")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed needs two tokens)")

    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from edgedec.runtime import Engine

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if not (args.bundle / "manifest.json").is_file():
        from edgedec.compiler.pipeline import CompileOptions, compile_model

        print(f"compiling the default model into {args.bundle} ...", file=sys.stderr)
        args.bundle.parent.mkdir(parents=True, exist_ok=True)
        compile_model(None, args.bundle, CompileOptions())
    engine = Engine.load(args.bundle, threads=args.threads)
    manifest = engine.manifest
    if manifest["passes"]:
        print(f"note: the bundle ran passes {[p['pass'] for p in manifest['passes']]}; it is not plain fp32",
              file=sys.stderr)

    from edgedec.models import source

    model = source.load(manifest["source"]["path"]).model

    prompts = PROMPTS[: args.prompts]
    prompt_ids = [engine.codec.encode(p) for p in prompts]
    _edgedec_run(engine, prompt_ids[0], args.new_tokens)  # warm-up
    _transformers_run(model, prompt_ids[0], args.new_tokens)

    rows = []
    for prompt, ids in zip(prompts, prompt_ids):
        ours = _edgedec_run(engine, ids, args.new_tokens)
        ref = _transformers_run(model, ids, args.new_tokens)
        rows.append({
            "prompt": prompt, "prompt_tokens": len(ids), "new_tokens": len(ours["tokens"]),
            "same_tokens": ours["tokens"] == ref["tokens"],
            "edgedec": {k: v for k, v in ours.items() if k != "tokens"},
            "transformers": {k: v for k, v in ref.items() if k != "tokens"},
        })

    med = {side: statistics.median(r[side]["decode_tok_s"] for r in rows) for side in ("edgedec", "transformers")}
    ttft = {side: statistics.median(r[side]["ttft_s"] for r in rows) for side in ("edgedec", "transformers")}
    ratio = med["edgedec"] / med["transformers"] if med["transformers"] else float("inf")

    print(f"bundle {args.bundle} ({manifest['source']['name']}), {args.threads} threads, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"{'#':>2}  {'prompt':<32} {'tokens':>6}  {'edgedec tok/s':>13}  {'transformers tok/s':>18}  same")
    for i, r in enumerate(rows):
        short = r["prompt"].replace("\n", " ")[:32]
        print(f"{i:>2}  {short:<32} {r['prompt_tokens']:>6}  {r['edgedec']['decode_tok_s']:>13.1f}  "
              f"{r['transformers']['decode_tok_s']:>18.1f}  {'yes' if r['same_tokens'] else 'NO'}")
    print(f"median decode: edgedec {med['edgedec']:.1f} tok/s, transformers {med['transformers']:.1f} tok/s, "
          f"ratio {ratio:.2f}x")
    print(f"median time to first token: edgedec {ttft['edgedec'] * 1000:.0f} ms, "
          f"transformers {ttft['transformers'] * 1000:.0f} ms")
    if not all(r["same_tokens"] for r in rows):
        print("warning: greedy tokens differ between the two on some prompts", file=sys.stderr)

    if args.json:
        import onnxruntime
        import transformers

        result = {
            "bundle": str(args.bundle), "source": manifest["source"], "threads": args.threads,
            "new_tokens": args.new_tokens, "prompts": len(rows),
            "median_decode_tok_s": med, "median_ttft_s": ttft, "ratio": ratio, "rows": rows,
            "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
