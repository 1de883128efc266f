"""Perplexity of a bundle on the user's text, and agreement with a reference bundle.

Torch-free: it runs the bundle through the runtime (:class:`edgedec.runtime.Engine`).

Sliding window, the strided method of the Hugging Face perplexity guide. The token sequence of a
text is covered by windows of ``window`` tokens that start every ``stride`` tokens; each window runs
from an empty KV cache, and scores only the tokens the previous window did not score, so every token
after the first is scored exactly once, with at least ``window - stride`` tokens of context (all of
them in the first window)::

    tokens     t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        window 6, stride 3
    window 1   [t0 .. t5]          scores t1..t5   (t0 has nothing to be predicted from)
    window 2            [t3 .. t8] scores t6..t8
    window 3                  [t6 .. t9] scores t9

With ``stride == window`` the windows are disjoint and the first token of each window is not scored
(it has no context in its window).

``perplexity = exp(sum of -log p(token | context) / scored tokens)`` over all texts together. Each
text is tokenized on its own (with the tokenizer's special tokens, as the runtime does for a
prompt); windows never span two texts.

With a reference bundle the same windows run through it: ``reference_perplexity`` on the same
tokens, ``perplexity_ratio = perplexity / reference_perplexity``, and ``greedy_agreement``, the
fraction of scored positions where both bundles' most likely next token is the same. The two
bundles must share the vocabulary and tokenize the text identically.

A window runs in chunks of at most ``CHUNK`` tokens on the growing cache, asking only for the logits
rows it scores, so memory stays at ``CHUNK × vocab`` floats whatever the window.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

CHUNK = 128  # tokens per forward call inside a window


def _ppl(nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood); inf rather than an OverflowError for a hopeless model."""
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class EvalOptions:
    window: int = 512  # tokens per window, each run from an empty cache
    stride: int = 256  # tokens between window starts; the tokens scored per window after the first
    max_tokens: int | None = None  # read at most this many tokens over all texts (the last text truncated)
    threads: int | None = None  # ONNX Runtime threads (default: physical cores)
    trust: object = None  # Engine.load's trust: True, or a TrustPolicy, lets bundles with native code (TVM) load

    def __post_init__(self):
        if self.window < 2:
            raise ConfigError(f"window must be >= 2 tokens, got {self.window}")
        if not 1 <= self.stride <= self.window:
            raise ConfigError(f"stride must be in [1, window={self.window}], got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass
class TextScore:
    """Per-text figures (the ``texts`` entries of the JSON)."""

    name: str
    tokens: int  # tokens read from the text (after --max-tokens truncation)
    scored: int = 0  # tokens scored (tokens - 1 when stride < window)
    nll: float = 0.0  # sum of -log p over the scored tokens, natural log
    reference_nll: float | None = None
    agree: int | None = None  # scored positions where both argmaxes agree

    @property
    def perplexity(self) -> float:
        return _ppl(self.nll, self.scored)

    def to_dict(self) -> dict:
        d = {"name": self.name, "tokens": self.tokens, "scored": self.scored, "perplexity": self.perplexity}
        if self.reference_nll is not None:
            d["reference_perplexity"] = _ppl(self.reference_nll, self.scored)
            d["greedy_agreement"] = self.agree / self.scored
        return d


@dataclass
class EvalResult:
    bundle: str
    options: EvalOptions
    texts: list[TextScore]
    windows: int
    reference: str | None = None

    @property
    def tokens(self) -> int:
        """Scored tokens over all texts (what the perplexity averages over)."""
        return sum(t.scored for t in self.texts)

    @property
    def perplexity(self) -> float:
        return _ppl(sum(t.nll for t in self.texts), self.tokens)

    @property
    def reference_perplexity(self) -> float | None:
        if self.reference is None:
            return None
        return _ppl(sum(t.reference_nll for t in self.texts), self.tokens)

    @property
    def perplexity_ratio(self) -> float | None:
        ref = self.reference_perplexity
        return None if ref is None else self.perplexity / ref

    @property
    def greedy_agreement(self) -> float | None:
        if self.reference is None:
            return None
        return sum(t.agree for t in self.texts) / self.tokens

    def to_dict(self) -> dict:
        """JSON shape: ``perplexity``, ``tokens`` and, with a reference, ``reference_perplexity``,
        ``perplexity_ratio``, ``greedy_agreement``; plus ``bundle``, ``window``, ``stride``, ``windows``
        and per-text figures in ``texts``."""
        d = {"perplexity": self.perplexity, "tokens": self.tokens}
        if self.reference is not None:
            d.update(reference_perplexity=self.reference_perplexity, perplexity_ratio=self.perplexity_ratio,
                     greedy_agreement=self.greedy_agreement, reference=self.reference)
        d.update(bundle=self.bundle, window=self.options.window, stride=self.options.stride, windows=self.windows,
                 texts=[t.to_dict() for t in self.texts])
        return d


def read_texts(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """Read the user's text files as (name, text); refuse missing, unreadable or empty ones."""
    if not paths:
        raise ConfigError("no text to evaluate on: give at least one --text FILE")
    texts = []
    for p in map(Path, paths):
        if p.is_dir():
            raise ConfigError(f"text file {p} is a directory; give a file (repeat --text for several)")
        if not p.is_file():
            raise ConfigError(f"text file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read text file {p} as UTF-8: {exc}") from exc
        if not text.strip():
            raise ConfigError(f"text file {p} is empty")
        texts.append((str(p), text))
    return texts


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over ``n`` tokens as ``(begin, end, first_scored)``: run tokens ``[begin, end)``,
    score tokens ``[first_scored, end)`` (each predicted from the position before it)."""
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:  # a one-token last window of disjoint windows has nothing to score
            spans.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return spans


def _window_logits(engine, ids: Sequence[int], first_scored: int) -> np.ndarray:
    """Logits (scored, vocab) predicting ``ids[first_scored:]``, running ``ids`` from an empty cache."""
    dec = engine.decoder
    dec.kv.length = 0
    ffn = getattr(dec, "ffn_skip", None)
    if ffn is not None and ffn.enabled:  # FFN skipping decides per decoded token: score as decoding would
        return _window_logits_stepwise(dec, ids, first_scored)
    parts = []
    for c0 in range(0, len(ids), CHUNK):
        c1 = min(c0 + CHUNK, len(ids))
        # position p predicts token p + 1: this chunk's scored predictions are positions [lo, c1)
        lo = max(c0, first_scored - 1)
        hi = min(c1, len(ids) - 1)
        rows = list(range(lo - c0, hi - c0)) if hi > lo else None
        logits = dec.forward(ids[c0:c1], logits_rows=rows if rows else [c1 - c0 - 1])
        if rows:
            parts.append(logits)
    return np.concatenate(parts, axis=0)


def _window_logits_stepwise(dec, ids: Sequence[int], first_scored: int) -> np.ndarray:
    """As :func:`_window_logits` for a bundle that skips FFN blocks at run time: the unscored context
    runs as a prompt (full model, in chunks), then every scored prediction is one decode step, so the
    skipping (warm-up, refresh, per-token choice) is exactly what generation would do."""
    lo = max(first_scored - 1, 1)  # positions [0, lo) are prompt; decode steps at positions lo .. len-2
    out = []
    for c0 in range(0, lo, CHUNK):
        c1 = min(c0 + CHUNK, lo)
        logits = dec.forward(ids[c0:c1], logits_rows=[c1 - c0 - 1])
    if first_scored - 1 < lo:  # position 0 predicts token 1 from the prompt pass
        out.append(logits[-1])
    for p in range(lo, len(ids) - 1):
        out.append(dec.decode_one(int(ids[p])).copy())
    return np.stack(out)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, computed in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def _load(path: str | Path, window: int, threads: int | None, role: str, trust=None):
    from .runtime import Bundle, Engine

    max_ctx = int(Bundle.open(path, verify_hashes=False).manifest["kv_cache"]["max_capacity"])
    if window > max_ctx:
        raise ConfigError(f"window {window} is larger than the context of the {role} bundle {path} "
                          f"({max_ctx} tokens); use a window of at most {max_ctx}")
    return Engine.load(path, threads=threads, context_length=window, trust=trust)


def _check_compatible(engine, ref, path, ref_path) -> None:
    va, vb = engine.bundle.arch["vocab_size"], ref.bundle.arch["vocab_size"]
    if va != vb:
        raise ConfigError(f"{path} and the reference {ref_path} have different vocabularies "
                          f"({va} vs {vb} tokens); perplexities over different tokens do not compare")
    vocab = lambda e: e.codec.tokenizer.get_vocab(with_added_tokens=True)
    if vocab(engine) != vocab(ref):
        raise ConfigError(f"{path} and the reference {ref_path} have different tokenizers; "
                          "perplexities over different tokens do not compare")


def evaluate(bundle: str | Path, texts: Sequence[tuple[str, str]], options: EvalOptions = EvalOptions(),
             reference: str | Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity of ``bundle`` on ``texts`` ((name, text) pairs, e.g. from :func:`read_texts`).

    With ``reference``, the reference bundle runs the same windows. ``progress(done, total)`` is
    called after each window.
    """
    engine = _load(bundle, options.window, options.threads, "evaluated", options.trust)
    ref = None
    if reference is not None:
        ref = _load(reference, options.window, options.threads, "reference", options.trust)
        _check_compatible(engine, ref, bundle, reference)

    token_lists, budget = [], options.max_tokens
    for name, text in texts:
        if budget is not None and budget < 2:
            log.info("--max-tokens reached; skipping %s", name)
            break
        ids = engine.codec.encode(text)
        if ref is not None and ref.codec.encode(text) != ids:
            raise ConfigError(f"{bundle} and the reference {reference} tokenize {name} differently; "
                              "perplexities over different tokens do not compare")
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if len(ids) < 2:
            raise ConfigError(f"{name} has {len(ids)} token(s); perplexity needs at least 2")
        token_lists.append((name, ids))

    plan = [(i, span) for i, (_, ids) in enumerate(token_lists) for span in windows(len(ids), options.window,
                                                                                     options.stride)]
    scores = [TextScore(name, len(ids), reference_nll=0.0 if ref else None, agree=0 if ref else None)
              for name, ids in token_lists]
    for done, (i, (begin, end, first)) in enumerate(plan, 1):
        ids = token_lists[i][1]
        targets = np.asarray(ids[first:end], dtype=np.int64)
        logits = _window_logits(engine, ids[begin:end], first - begin)
        scores[i].scored += len(targets)
        scores[i].nll += float(_nll(logits, targets).sum())
        if ref is not None:
            ref_logits = _window_logits(ref, ids[begin:end], first - begin)
            scores[i].reference_nll += float(_nll(ref_logits, targets).sum())
            scores[i].agree += int((logits.argmax(axis=1) == ref_logits.argmax(axis=1)).sum())
        if progress:
            progress(done, len(plan))
    result = EvalResult(str(bundle), options, scores, len(plan), None if reference is None else str(reference))
    log.info("perplexity %.4f over %d tokens in %d windows", result.perplexity, result.tokens, result.windows)
    return result
