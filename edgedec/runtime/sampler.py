"""Samplers: pick the next token from a row of logits. Small, swappable, numpy only."""

from __future__ import annotations

import numpy as np

from ..errors import GenerationError


class Sampler:
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p (nucleus).

    ``seed`` makes sampling reproducible (numpy's PCG64).
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not np.isfinite(temperature) or temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**128):
            raise GenerationError(f"seed must be an integer in [0, 2**128), got {seed!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.greedy = self.temperature == 0.0
        self.rng = np.random.default_rng(seed)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution this sampler draws from, over the full vocabulary (float64)."""
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p) + 1)]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return p

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(logits.argmax())
        p = self.probs(logits)
        return int(self.rng.choice(p.shape[-1], p=p))
