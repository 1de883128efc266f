"""Drafters for speculative decoding: small objects that guess the next tokens; the model verifies them.

Torch-free. A drafter sees the token history (prompt + generated, one int32 buffer) and proposes up to
``k`` tokens as a chain. After each verification the engine tells it what the model produced at every
verified position (``observe``), which is how Token Recycling learns. Drafters here are deterministic
(their proposal distribution q is a point mass), which keeps rejection sampling simple and exact.
"""

from __future__ import annotations

from pathlib import Path
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

    Draft and target take turns on the same cores. ONNX Runtime sessions sleep between runs here
    (``spin=False``; the engine loads a target whose default drafter is a model that way too). Two TVM
    libraries in one process share TVM's one thread pool, so their turns never compete for the cores.
    A windowed draft cache is not supported (no drafts are proposed).
    """

    width = 0

    def __init__(self, path: str | Path, target_bundle, threads: int | None = None, name: str | None = None,
                 context_length: int | None = None, verify: bool = True, trust=None):
        from ..errors import GenerationError
        from .bundle import Bundle
        from .engine import Engine

        draft = Bundle.open(path, verify_hashes=verify)
        why = tokenizer_mismatch(draft, target_bundle)
        if why:
            raise GenerationError(f"the draft model {path} does not share the target's tokenizer ({why})")
        if context_length is not None:
            context_length = min(context_length, int(draft.manifest["kv_cache"]["max_capacity"]))
        # the draft and the target take turns on the same cores: ONNX Runtime threads that spin after a run
        # would steal the other session's time (SmolLM2 fp32 target, int4 draft: 0.56x spinning, 1.12x not)
        self.engine = Engine.load(path, threads=threads, context_length=context_length, verify=False, spin=False,
                                  trust=trust)
        self.dec = self.engine.decoder
        self.name = name or f"model:{path}"
        self.cost_per_token = min(1.0, step_bytes(draft) / max(step_bytes(target_bundle), 1)) + 0.02
        self.held = np.zeros(0, np.int32)  # the tokens in the draft cache, in order
        self.head_ids = head_ids(draft)  # a trimmed head's row -> token id (None: the whole vocabulary)

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
        dec.kv.length = same  # roll back by length: the entries past it are rewritten
        feed = [int(t) for t in history[same:n]]
        logits = dec.decode_one(feed[0]) if len(feed) == 1 else dec.forward(feed)[-1]
        ids = self.head_ids
        out = [int(np.argmax(logits)) if ids is None else int(ids[np.argmax(logits)])]
        for _ in range(k - 1):
            logits = dec.decode_one(out[-1])
            out.append(int(np.argmax(logits)) if ids is None else int(ids[np.argmax(logits)]))
        self.held = np.concatenate([history[:n], np.asarray(out[:-1], np.int32)])
        return out

    def observe(self, inputs: np.ndarray, candidates: np.ndarray) -> None:
        pass


def step_bytes(bundle) -> int:
    """About the weight bytes one decode step of ``bundle`` reads: its files, or for a TVM library its
    parameters without an untied embedding table (a step reads one row of it)."""
    params = bundle.graph("decoder").get("params")
    if params:
        tied = not any(str(p.get("name", "")).startswith("lm_head") for p in params)
        return sum(int(p.get("bytes", 0)) for p in params if tied or not str(p.get("name", "")).startswith("embed_"))
    return sum(f.get("bytes", 0) for n, f in bundle.manifest["files"].items()
               if not n.endswith(".json") and not n.startswith(DRAFT_DIR + "/"))


def head_ids(draft) -> np.ndarray | None:
    """A draft bundle's trimmed head (VocabTrim, ``draft_head`` in its manifest): the token id of each
    logits row, checked against the bundle (hashed, K ids within the vocabulary). None: no trimming."""
    from ..errors import BundleError

    entry = draft.manifest.get("draft_head")
    if entry is None:
        return None
    name, rows, vocab = entry.get("file"), entry.get("rows"), draft.arch["vocab_size"]
    if name not in draft.manifest["files"] or not isinstance(rows, int) or rows != draft.arch.get("head_rows"):
        raise BundleError("the draft bundle's draft_head entry does not name a hashed file of head_rows ids")
    ids = np.fromfile(draft.file(name), dtype="<i4")
    if len(ids) != rows or ids.min() < 0 or ids.max() >= vocab:
        raise BundleError(f"the draft bundle's {name} does not hold {rows} token ids below {vocab}")
    return ids.astype(np.int64)


DRAFT_DIR = "draft"  # where `compile --spec model:DRAFT` puts the draft bundle, inside the target bundle


def tokenizer_mismatch(draft, target) -> str | None:
    """Why two bundles' tokenizers differ, or None when a draft's token ids mean what the target's do:
    the same vocabulary size and the same tokenizer.json, or (when the files differ, e.g. in a name or a
    chat template) the same vocabulary, merges and added tokens."""
    import json

    vd, vt = draft.arch["vocab_size"], target.arch["vocab_size"]
    if vd != vt:
        return f"vocabulary of {vd:,} tokens, the target's has {vt:,}"
    sha = lambda b: b.manifest["files"].get(b.manifest["tokenizer"]["file"], {}).get("sha256")
    if sha(draft) is not None and sha(draft) == sha(target):
        return None

    def tokens(b):
        try:
            data = json.loads(b.file(b.manifest["tokenizer"]["file"]).read_text(encoding="utf-8"))
            model = data.get("model") or {}
            added = sorted((int(t["id"]), t["content"]) for t in data.get("added_tokens") or [])
            return model.get("type"), model.get("vocab"), model.get("merges"), added
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    a, b = tokens(draft), tokens(target)
    if a is None or a != b:
        return "tokenizer files differ"
    return None


def resolve_in_bundle(bundle_dir: str | Path, rel: str) -> Path:
    """The path ``rel`` that a bundle's manifest names (its drafter ``model:REL``), inside the bundle's
    directory; a path that leaves it is refused: nothing outside a bundle is read because it says so."""
    from ..errors import BundleError

    root = Path(bundle_dir).resolve()
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or (path != root and root not in path.parents):
        raise BundleError(f"the manifest's drafter model:{rel} points outside the bundle directory")
    return path


MODEL_PREFIXES = ("", "ngram+")  # what may come before model:PATH: nothing, or prompt lookup tried first


def split_model(name: str) -> tuple[str, str] | None:
    """``(prefix, PATH)`` of a draft-model drafter name (``model:PATH`` or ``ngram+model:PATH``); None
    for every other name."""
    for prefix in MODEL_PREFIXES:
        if name.startswith(prefix + "model:") and len(name) > len(prefix + "model:"):
            return prefix, name[len(prefix + "model:"):]
    return None


def is_drafter_name(name: str) -> bool:
    """A built-in drafter, or ``model:PATH`` / ``ngram+model:PATH`` (a draft-model bundle)."""
    return name in DRAFTER_NAMES or split_model(name) is not None


def spins_with(drafter: str | None) -> bool | None:
    """Whether the engine's threads should spin between runs with this drafter: not with a draft model,
    whose session and the target's take turns on the same cores. ``"auto"`` (the bundle's drafter):
    None, for :meth:`Engine.load` to decide from the bundle."""
    if drafter == "auto":
        return None
    return split_model(drafter or "") is None


def make_drafter(name: str, vocab_size: int, decoder=None, target_bundle=None, threads: int | None = None,
                 trust=None, from_bundle: bool = False, context_length: int | None = None,
                 verify: bool = True):
    """A drafter by name: ``ngram``, ``recycling``, ``ngram+recycling``, ``head`` or ``head+ngram``
    (the last two need ``decoder``, a session over a bundle with the draft-head pass), ``ffn-skip``, or
    ``model:PATH``, a draft-model bundle sharing the tokenizer of ``target_bundle`` (``ngram+model:PATH``:
    prompt lookup of 2+ tokens first, the draft model where it finds nothing).

    ``from_bundle``: the name comes from the target bundle's manifest, so ``PATH`` is a directory inside
    that bundle (``compile --spec model:DRAFT`` puts the draft in ``draft/``); otherwise it is a path as
    the user gave it. ``context_length`` caps the draft's cache (default: its own default);
    ``verify=False`` skips the draft's file hashes (the target's manifest already covered them);
    ``trust``: ``Engine.load``'s argument for the draft."""
    from ..errors import GenerationError

    if (model := split_model(name)) is not None:
        prefix, path = model
        if target_bundle is None:
            raise GenerationError("a draft model needs the target bundle to check the tokenizer against")
        if from_bundle:
            path = resolve_in_bundle(target_bundle.path, path)
        drafter = DraftModelDrafter(path, target_bundle, threads, name=name[len(prefix):],
                                    context_length=context_length, verify=verify, trust=trust)
        if prefix == "ngram+":
            combined = CombinedDrafter(PromptLookupDrafter(max_ngram=3, min_ngram=2), drafter)
            combined.cost_per_token = drafter.cost_per_token
            return combined
        return drafter
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
