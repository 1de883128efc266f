"""Drafters for speculative decoding: small objects that guess the next tokens; the model verifies them.

Torch-free. A drafter sees the token history (prompt + generated, one int32 buffer) and proposes up to
``k`` tokens as a chain. After each verification the engine tells it what the model produced at every
verified position (``observe``), which is how Token Recycling learns. Drafters here are deterministic
(their proposal distribution q is a point mass), which keeps rejection sampling simple and exact.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class Drafter(Protocol):
    name: str
    width: int  # candidates per verified position that ``observe`` wants (0: don't call it)

    def reset(self, prompt: np.ndarray) -> None:
        """Start a new sequence whose prompt is ``prompt`` (int32)."""

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        """Up to ``k`` draft tokens continuing ``history`` (int32, prompt + generated so far)."""

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        """After a verification: ``inputs[i]`` was fed at verified position i and ``candidates[i]``
        holds the model's top next-token candidates there, best first (shape (positions, c))."""


class PromptLookupDrafter:
    """Prompt lookup / n-gram drafting: find the latest earlier occurrence of the last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it. Costs no weights;
    strong when the output repeats the input (summaries, rewrites, code edits)."""

    name = "ngram"
    width = 0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def reset(self, prompt: np.ndarray) -> None:
        pass

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        n_hist = len(history)
        for n in range(min(self.max_ngram, n_hist - 1), self.min_ngram - 1, -1):
            windows = sliding_window_view(history[: n_hist - 1], n)  # every earlier n-gram start
            hits = np.flatnonzero((windows == history[n_hist - n :]).all(axis=1))
            # latest occurrence that has a continuation
            for start in hits[::-1]:
                follow = history[start + n : start + n + k]
                if len(follow):
                    return follow.tolist()
        return []

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        pass


class TokenRecyclingDrafter:
    """Token Recycling: the model's top candidates at every verified position are kept in an
    adjacency table ``table[token] -> candidates`` and reused as drafts: from the last token, follow
    the best candidate ``k`` times. Costs no weights; the table is ``(vocab, width)`` int32.

    After "Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token
    Recycling" (which drafts a tree; this runtime verifies chains, so it follows the top-1 path).
    """

    name = "recycling"

    def __init__(self, vocab_size: int, width: int = 4):
        self.table = np.full((vocab_size, width), -1, np.int32)  # (vocab, width) candidates, -1 = unknown
        self.width = width

    def reset(self, prompt: np.ndarray) -> None:
        pass  # the table carries over between sequences: what it learned stays useful

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        out, tok = [], int(history[-1])
        for _ in range(k):
            tok = int(self.table[tok, 0])
            if tok < 0:
                break
            out.append(tok)
        return out

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        c = min(self.width, candidates.shape[1])
        self.table[inputs, :c] = candidates[:, :c]


class CombinedDrafter:
    """Try drafters in order; the first non-empty proposal wins; every drafter observes."""

    def __init__(self, *drafters):
        self.drafters = drafters
        self.name = "+".join(d.name for d in drafters)
        self.width = max(getattr(d, "width", 0) for d in drafters)  # candidates per position it wants

    def reset(self, prompt: np.ndarray) -> None:
        for d in self.drafters:
            d.reset(prompt)

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        for d in self.drafters:
            if draft := d.propose(history, k):
                return draft
        return []

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        for d in self.drafters:
            d.observe(inputs, candidates)


DRAFTER_NAMES = ("ngram", "recycling", "ngram+recycling")


def make_drafter(name: str, vocab_size: int):
    """A drafter by name: ``ngram``, ``recycling`` or ``ngram+recycling``."""
    from ..errors import GenerationError

    parts = {"ngram": lambda: PromptLookupDrafter(), "recycling": lambda: TokenRecyclingDrafter(vocab_size)}
    names = name.split("+")
    if not names or any(n not in parts for n in names):
        raise GenerationError(f"unknown drafter {name!r}; valid: ngram, recycling, ngram+recycling")
    drafters = [parts[n]() for n in names]
    return drafters[0] if len(drafters) == 1 else CombinedDrafter(*drafters)
