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

    # optional: ``forget()`` drops what was learned across sequences (Engine.forget_drafters calls it)


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
    Recycling" (which drafts a tree; this runtime verifies chains, so it follows the top-1 path). A chain
    reads only the best candidate, so ``width`` is 1 by default: the engine then hands over each row's
    argmax, where a top-4 search over SmolLM2's 49,152 logits cost ~0.13-0.25 ms a row, on every step.
    """

    name = "recycling"

    def __init__(self, vocab_size: int, width: int = 1):
        self.table = np.full((vocab_size, width), -1, np.int32)  # (vocab, width) candidates, -1 = unknown
        self.width = width

    def reset(self, prompt: np.ndarray) -> None:
        pass  # the table carries over between sequences: what it learned stays useful

    def forget(self) -> None:
        self.table.fill(-1)

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

    def forget(self) -> None:
        for d in self.drafters:
            if hasattr(d, "forget"):
                d.forget()

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        for d in self.drafters:
            d.observe(inputs, candidates)


class DraftHeadDrafter:
    """The bundle's fused draft head (pass ``draft-head``): the verifier's own run also emits, per logits
    row, a guess for the token after the one it picks there (``DecoderSession.draft_rows``). So the first
    draft of the next round costs no extra pass; this drafter proposes it, and when ``then`` is given
    (prompt lookup) continues the chain from it. Needs a bundle compiled with the draft-head pass."""

    width = 0

    def __init__(self, decoder, then=None):
        if not getattr(decoder, "has_draft_head", False):
            from ..errors import GenerationError

            raise GenerationError("the drafter `head` needs a bundle compiled with the draft-head pass "
                                  "(edgedec calibrate draft-head, then --pass draft-head:weights=...)")
        self.decoder, self.then = decoder, then
        self.name = "head" + (f"+{then.name}" if then is not None else "")

    def reset(self, prompt: np.ndarray) -> None:
        if self.then is not None:
            self.then.reset(prompt)

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        rows = self.decoder.draft_rows  # (rows,) of the last run; the engine trims it to the accepted row
        if k < 1 or rows is None or not len(rows):
            return []
        first = int(rows[-1])
        if self.then is None or k == 1:
            return [first]
        return [first] + self.then.propose(np.append(history, np.int32(first)), k - 1)

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        pass


DRAFTER_NAMES = ("ngram", "recycling", "ngram+recycling", "head", "head+ngram", "ffn-skip")


class FfnSkipDrafter:
    """Draft&Verify with FFN skipping (Zhang et al. 2023, skipping as in FFN-SkipLLM): the model itself,
    skipping the bundle's draft number of FFN blocks per token, drafts ``k`` tokens greedily; the full
    model then verifies them in one pass. Needs a bundle built with the ``ffn-skip`` pass.

    Cache: the draft steps write KV entries at ``[start, start + k)`` (from the skipping model); the
    drafter then rolls ``kv.length`` back to ``start``, and the verification pass over ``[last, *draft]``
    rewrites ``[start, start + k]`` with the full model, so the cache after verification is exactly what
    plain decoding would have left (rejected entries are rolled back by length as usual).
    Each draft token costs a skipping decode step (~0.8 of a full step at 25%), not ~0: the adaptive
    draft length is told so (``cost_per_token``) and stops drafting when acceptance does not pay for it.
    """

    name = "ffn-skip"
    width = 0

    def __init__(self, decoder, skip_per_token: int | None = None, cost_per_token: float = 0.9):
        ctl = getattr(decoder, "ffn_skip", None)
        if ctl is None:
            from ..errors import GenerationError

            raise GenerationError("the drafter `ffn-skip` needs a bundle compiled with the ffn-skip pass "
                                  "(--pass ffn-skip:use=draft)")
        self.decoder, self.skip_per_token, self.cost_per_token = decoder, skip_per_token, cost_per_token

    def reset(self, prompt: np.ndarray) -> None:
        pass

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        dec = self.decoder
        start = dec.kv.length  # the cache holds history[:-1]
        k = min(k, dec.kv.capacity - start - 1)
        out, tok = [], int(history[-1])
        try:
            with dec.ffn_skip.drafting(self.skip_per_token):
                for _ in range(k):
                    tok = int(np.argmax(dec.decode_one(tok)))
                    out.append(tok)
        finally:
            dec.kv.length = start  # the verifier rewrites these positions with the full model
        return out

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        pass


class DraftModelDrafter:
    """A separate, smaller draft model that shares the target's tokenizer (classic speculative decoding):
    another edgedec bundle, run by its own engine with its own KV cache, drafts ``k`` tokens greedily.

    The draft cache follows the history lazily: before drafting, it is rolled back (by length, no copy)
    to the longest prefix it shares with the history, and the tokens it lacks (the prompt on the first
    call, then the verified tokens) are fed in one multi-row pass whose last logits give the first draft.
    Each further draft token costs one decode step of the draft model; ``cost_per_token`` tells the
    adaptive draft length its price relative to a target step (the ratio of the two bundles' weight bytes).
    The draft session's threads do not spin between runs; load the target with ``spin=False`` too (the CLI
    does when ``--spec model:PATH``). A windowed draft cache is not supported (no drafts are proposed).
    """

    width = 0

    def __init__(self, path: str, target_bundle, threads: int | None = None, trust=None):
        from ..errors import GenerationError
        from .engine import Engine

        # the draft and the target take turns on the same cores: ONNX Runtime threads that spin after a run
        # would steal the other session's time (SmolLM2 fp32 target, int4 draft: 0.56x spinning, 1.12x not)
        self.engine = Engine.load(path, threads=threads, spin=False, trust=trust)
        draft, target = self.engine.bundle, target_bundle
        tok = lambda b: b.manifest["files"].get(b.manifest["tokenizer"]["file"], {}).get("sha256")
        if tok(draft) != tok(target):
            raise GenerationError(f"the draft model {path} does not share the target's tokenizer "
                                  "(tokenizer files differ)")
        self.dec = self.engine.decoder
        self.name = f"model:{path}"
        weights = lambda b: sum(f.get("bytes", 0) for n, f in b.manifest["files"].items() if not n.endswith(".json"))
        self.cost_per_token = min(1.0, weights(draft) / max(weights(target), 1)) + 0.02
        self.held = np.zeros(0, np.int32)  # the tokens in the draft cache, in order

    def reset(self, prompt: np.ndarray) -> None:
        self.dec.kv.length = 0
        self.held = np.zeros(0, np.int32)

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        dec, n = self.dec, len(history)
        held = self.held[: dec.kv.length]
        m = min(len(held), n - 1)  # keep at least the last token to feed
        same = int(np.argmin(np.append(held[:m] == history[:m], False)))  # common prefix length
        k = min(k, dec.kv.capacity - n)
        if k < 1 or dec.kv.window is not None:
            return []
        dec.kv.length = same
        feed = [int(t) for t in history[same:n]]
        logits = dec.decode_one(feed[0]) if len(feed) == 1 else dec.forward(feed)[-1]
        out = [int(np.argmax(logits))]
        for _ in range(k - 1):
            out.append(int(np.argmax(dec.decode_one(out[-1]))))
        self.held = np.concatenate([history[:n], np.asarray(out[:-1], np.int32)])
        return out

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        pass


def is_drafter_name(name: str) -> bool:
    """A built-in drafter, or ``model:PATH`` (a draft-model bundle)."""
    return name in DRAFTER_NAMES or (name.startswith("model:") and len(name) > len("model:"))


def spins_with(drafter: str | None) -> bool:
    """Whether the engine's threads should spin between runs with this drafter: not with a draft model,
    whose session and the target's take turns on the same cores."""
    return not (drafter or "").startswith("model:")


def make_drafter(name: str, vocab_size: int, decoder=None, target_bundle=None, threads: int | None = None,
                 trust=None):
    """A drafter by name: ``ngram``, ``recycling``, ``ngram+recycling``, ``head`` or ``head+ngram``
    (the last two need ``decoder``, a session over a bundle with the draft-head pass), ``ffn-skip``, or
    ``model:PATH``, a draft-model bundle sharing the tokenizer of ``target_bundle``, loaded under ``trust``
    (``Engine.load``'s argument)."""
    from ..errors import GenerationError

    if name.startswith("model:"):
        if target_bundle is None:
            raise GenerationError("a draft model needs the target bundle to check the tokenizer against")
        return DraftModelDrafter(name[len("model:"):], target_bundle, threads, trust)
    if name == "ffn-skip":
        return FfnSkipDrafter(decoder)
    if name in ("head", "head+ngram"):
        return DraftHeadDrafter(decoder, PromptLookupDrafter() if name == "head+ngram" else None)
    parts = {"ngram": lambda: PromptLookupDrafter(), "recycling": lambda: TokenRecyclingDrafter(vocab_size)}
    names = name.split("+")
    if not names or any(n not in parts for n in names):
        raise GenerationError(f"unknown drafter {name!r}; valid: {', '.join(DRAFTER_NAMES)}, model:PATH")
    drafters = [parts[n]() for n in names]
    return drafters[0] if len(drafters) == 1 else CombinedDrafter(*drafters)


class DraftLengthPolicy:
    """Adaptive draft length, in the spirit of DEL / PEARL: draft only as far as it pays.

    Acceptance is modelled per draft token with probability ``alpha`` (estimated from the verifications
    so far, exponentially weighted). Drafting k tokens yields ``(1 - alpha**(k+1)) / (1 - alpha)`` tokens
    per verification and costs about ``1 + cost * k`` plain decode steps (drafting k tokens plus one
    forward over k + 1 tokens, against one plain step). The policy picks the k in [1, max_k] with the
    best yield per cost, or 0 (plain decoding) when none beats 1; while at 0 it still probes with a
    short draft every ``probe_every`` steps, so it can recover when the text turns repetitive.

    ``cost`` starts at the drafter's ``cost_per_token`` and then follows what the engine measures
    (:meth:`timed_plain`, :meth:`timed_verify`), because it depends on the machine more than on the
    model: with SmolLM2 int4 on 2 cores a pass over k + 1 tokens took 1.16 (k=1), 1.63 (k=3) and 2.62
    (k=7) plain steps on one AVX2 machine, 1.09 (k=1) to 1.46 (k=7) on another (the project's design
    notes). The cost needs plain steps to compare with: after ``calibrate_every`` drafts without
    one, the policy asks for one (k = 0) instead of a draft. Until a plain step is timed, it keeps the prior.
    """

    def __init__(self, max_k: int, cost_per_token: float = 0.12, decay: float = 0.9, probe_every: int = 8,
                 calibrate_every: int = 64):
        self.max_k, self.cost, self.decay, self.probe_every = max_k, cost_per_token, decay, probe_every
        self.calibrate_every = calibrate_every
        self.successes, self.trials = 1.0, 2.0  # prior: alpha = 0.5
        self.idle = 0
        self.step_s: float | None = None  # running plain step time (seconds), once one was timed
        self.drafts_since_plain = 0

    @property
    def alpha(self) -> float:
        return self.successes / self.trials

    def value(self, k: int) -> float:
        """Expected tokens per unit of decode cost when drafting k tokens."""
        a = min(self.alpha, 0.999)
        return (1 - a ** (k + 1)) / (1 - a) / (1 + self.cost * k)

    def next_k(self) -> int:
        if self.drafts_since_plain >= self.calibrate_every:
            self.drafts_since_plain = 0
            return 0  # a plain step, timed: what drafting is compared with
        best = max(range(1, self.max_k + 1), key=self.value)
        if self.value(best) > 1.0:
            self.idle = 0
            self.drafts_since_plain += 1
            return best
        self.idle += 1
        if self.idle >= self.probe_every:
            self.idle = 0
            self.drafts_since_plain += 1
            return min(2, self.max_k)
        return 0

    def timed_plain(self, seconds: float) -> None:
        """A plain decode step (one token, no draft) took ``seconds``."""
        self.drafts_since_plain = 0
        self.step_s = seconds if self.step_s is None else self.decay * self.step_s + (1 - self.decay) * seconds

    def timed_verify(self, drafted: int, seconds: float) -> None:
        """Drafting ``drafted`` tokens and verifying them took ``seconds``: update the cost per draft token."""
        if self.step_s is None or drafted < 1:
            return  # no plain step to compare with yet: keep the prior
        per_token = max(seconds / self.step_s - 1.0, 0.0) / drafted
        self.cost = self.decay * self.cost + (1 - self.decay) * per_token

    def update(self, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` tokens accepted the first ``accepted``."""
        trials = accepted + (1 if accepted < drafted else 0)  # the first rejection ends the trials
        self.successes = self.decay * self.successes + accepted
        self.trials = self.decay * self.trials + trials
