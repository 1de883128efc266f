"""Placeholder; the search follows."""

from __future__ import annotations

from pathlib import Path

SPEED_CHECK_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SPEED_CHECK_TOKENS = 32


def speed_check(bundle: str | Path, new_tokens: int = SPEED_CHECK_TOKENS, threads: int | None = None) -> dict:
    """A quick decode-speed figure for a freshly built bundle: load it, decode 8 tokens to warm up, then
    ``new_tokens`` greedy tokens (end of sequence ignored). A few seconds; ``edgedec bench`` measures properly."""
    from .runtime import Engine

    engine = Engine.load(bundle, threads=threads)
    for _ in engine.generate(SPEED_CHECK_PROMPT, max_new_tokens=8, ignore_eos=True):
        pass
    for _ in engine.generate(SPEED_CHECK_PROMPT, max_new_tokens=new_tokens, ignore_eos=True):
        pass
    st = engine.last_stats
    return {"decode_tok_s": st.decode_tok_s, "new_tokens": st.new_tokens, "ttft_ms": st.ttft_s * 1000,
            "threads": engine.threads, "drafter": st.drafter or None}
