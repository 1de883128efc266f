"""Sink + sliding window: generate far past the window and sample resident memory as it goes.

    edgedec compile -q int4 --kv-window 1024 --kv-sinks 4 -o build/smol-window
    python benchmarks/kv_window_memory.py build/smol-window --tokens 8000 --json build/window.json

Runs the torch-free runtime alone in this process. Samples the current resident set (VmRSS) and its
peak so far (VmHWM) every ``--every`` generated tokens, and reports the peak growth between
``--from`` (default 2,000) and the end: with a windowed cache it should stay within a few percent
(the cache is allocated once, evictions shift it in place). Sampling is seeded (temperature 0.8), so
the text does not collapse into the loop greedy decoding of a small model falls into; the end of the
text is printed so a reader can judge that it is still language.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--tokens", type=int, default=8000, help="tokens to generate")
    p.add_argument("--every", type=int, default=500, help="sample memory every N tokens")
    p.add_argument("--from", dest="start", type=int, default=2000, help="compare peak memory from this token on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt", default="Write a long story about a lighthouse keeper and the sea.")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)

    from edgedec.runtime import Engine

    engine = Engine.load(a.bundle, threads=a.threads)
    kv = engine.decoder.kv
    samples, text, t0 = [], [], time.perf_counter()
    stream = engine.chat([{"role": "user", "content": a.prompt}], max_new_tokens=a.tokens, ignore_eos=True,
                         temperature=0.8, top_p=0.95, seed=0, drafter=None)
    for i, token in enumerate(stream, 1):
        text.append(token.text)
        if i % a.every == 0 or i == a.tokens:
            samples.append({"token": i, "rss_mb": _status("VmRSS") / 1e6, "peak_rss_mb": _status("VmHWM") / 1e6,
                            "cache_length": kv.length, "evicted": kv.evicted,
                            "tok_s": i / (time.perf_counter() - t0)})
            print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
    stats = engine.last_stats
    at = min((s for s in samples if s["token"] >= a.start), key=lambda s: s["token"])
    end = samples[-1]
    result = {
        "bundle": a.bundle, "generated": stats.new_tokens, "stop_reason": stats.stop_reason,
        "window": engine.manifest["kv_cache"].get("window") and {k: v for k, v in
                                                                  engine.manifest["kv_cache"]["window"].items()
                                                                  if k != "rotary_inv_freq"},
        "kv_cache_mb": kv.nbytes / 1e6, "decode_tok_s": stats.decode_tok_s,
        "rss_mb_at_start": at["rss_mb"], "rss_mb_at_end": end["rss_mb"],
        "peak_rss_mb_at_start": at["peak_rss_mb"], "peak_rss_mb_at_end": end["peak_rss_mb"],
        "peak_growth": end["peak_rss_mb"] / at["peak_rss_mb"] - 1, "from_token": at["token"],
        "samples": samples, "tail_text": "".join(text)[-600:],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
