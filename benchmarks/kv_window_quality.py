"""Sink + sliding window quality: stream one long text through a cache, teacher-forced, and score it.

    python benchmarks/kv_window_quality.py --plain build/smol-int4 --window build/smol-window \
        --text held-out.txt --tokens 4096 --from 1100

Runs the text in chunks of 64 tokens through (a) a plain bundle with a cache holding the whole text and
(b) a windowed bundle (``compile --kv-window``), which evicts as it goes, and reports the perplexity of
the tokens from ``--from`` on (past the window, so every scored token in (b) runs on a shifted cache).
``--no-rerotation`` adds a control run of (b) whose evictions shift keys without re-rotating them, to
show what slot-consistent positions are worth.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def stream_perplexity(bundle: str, ids: list[int], start: int, context: int | None, rerotate: bool = True,
                      chunk: int = 64, threads: int | None = None) -> dict:
    from edgedec.runtime import Engine

    engine = Engine.load(bundle, threads=threads, context_length=context)
    dec = engine.decoder
    if not rerotate:
        dec.kv.inv_freq = dec.kv.inv_freq * 0
    nll = []
    for c0 in range(0, len(ids) - 1, chunk):
        c1 = min(c0 + chunk, len(ids) - 1)
        rows = dec.forward(ids[c0:c1], logits_rows=range(c1 - c0))  # (c1 - c0, vocab)
        top = rows.max(-1, keepdims=True)
        logp = rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))
        nll += [-logp[i, ids[c0 + i + 1]] for i in range(c1 - c0)]
    return {"bundle": bundle, "perplexity": float(np.exp(np.mean(nll[start:]))), "scored": len(nll) - start,
            "evicted": int(getattr(dec.kv, "evicted", 0))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain", required=True, help="bundle with a plain cache (context = --tokens)")
    p.add_argument("--window", required=True, help="bundle compiled with --kv-window")
    p.add_argument("--text", required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--from", dest="start", type=int, default=1100)
    p.add_argument("--no-rerotation", action="store_true", help="add the control run without re-rotation")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)

    from edgedec.runtime import Engine

    codec = Engine.load(a.plain, threads=1, context_length=16).codec
    with open(a.text, encoding="utf-8") as f:
        ids = codec.encode(f.read())[: a.tokens]
    result = {"tokens": len(ids), "from": a.start,
              "plain": stream_perplexity(a.plain, ids, a.start, len(ids) + 8, threads=a.threads),
              "window": stream_perplexity(a.window, ids, a.start, None, threads=a.threads)}
    if a.no_rerotation:
        result["window_no_rerotation"] = stream_perplexity(a.window, ids, a.start, None, rerotate=False,
                                                           threads=a.threads)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
