"""The runtime engine: load a bundle, keep the KV cache in one flat buffer, decode with ONNX Runtime.

Torch-free (numpy, onnxruntime, tokenizers, jinja2). Between ``session.run`` calls the decode loop
writes three integers into bound buffers and reads one row of logits; nothing is allocated per token.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import BundleError, GenerationError
from .bundle import Bundle
from .drafters import Drafter, DraftLengthPolicy, make_drafter, spins_with, split_model
from .kv_cache import KVCache  # the buffer layout and sink + window eviction
from .manifest import check_session_io
from .providers import select_provider, session_providers
from .ffn_skip import FfnSkipController
from .sampler import Sampler
from .text import StreamDecoder, TextCodec
from .trust import TrustPolicy, as_policy, check_native, vouch_for_nested

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048


def physical_cores() -> int:
    """Physical cores of this machine (hyper-threads do not help a memory-bound decode)."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def machine_cores() -> int:
    """Logical cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_threads(threads: int | None) -> int:
    """``threads`` for a session (default: physical cores), refused below 1 and capped at this machine's
    cores with a warning: more threads than cores only contend (and 100,000 would take minutes to start)."""
    if threads is None:
        return min(physical_cores(), machine_cores())
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise GenerationError(f"threads must be an integer, got {threads!r}")
    if threads < 1:
        raise GenerationError(f"threads must be >= 1, got {threads}")
    cores = machine_cores()
    if threads > cores:
        log.warning("%d threads capped at this machine's %d cores", threads, cores)
        return cores
    return threads


def available_memory() -> int | None:
    """Bytes of physical memory of this machine (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


@dataclass
class Token:
    id: int
    text: str  # the text this token adds to the output (may be "" while a UTF-8 sequence is incomplete)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # time of the prefill pass (prompt -> first logits)
    ttft_s: float = 0.0  # from generate() start to the first token out
    decode_s: float = 0.0  # from the first token to the last
    run_s: float = 0.0  # time spent inside session.run over the decode steps
    stop_reason: str = ""
    token_ids: list[int] = field(default_factory=list)
    drafter: str = ""  # speculation: which drafter ran ("" = none)
    verify_steps: int = 0  # speculation: multi-token verification passes
    drafted_tokens: int = 0  # speculation: draft tokens proposed to the model
    accepted_tokens: int = 0  # speculation: draft tokens the model accepted
    draft_s: float = 0.0  # speculation: time spent drafting (host side)
    draft_cost: float | None = None  # speculation, adaptive: cost of a draft token in plain steps (measured)

    @property
    def mean_accepted_per_step(self) -> float:
        """Draft tokens accepted per verification pass (each pass also yields one model token)."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["decode_tok_s"] = self.decode_tok_s
        d["prefill_tok_s"] = self.prefill_tok_s
        d["mean_accepted_per_step"] = self.mean_accepted_per_step
        return d


class DecoderSession:
    """An ONNX Runtime session over the bundle's decoder graph with all state bound through IOBinding."""

    def __init__(self, bundle: Bundle, threads: int, capacity: int, spin: bool = True):
        import onnxruntime as ort

        graph = bundle.graph("decoder")
        arch = bundle.arch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if not spin:  # threads sleep between runs instead of spinning: for sessions that take turns on the cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.provider = select_provider(graph)  # the bundle's provider; a clear error if this build lacks it
        try:
            self.session = ort.InferenceSession(str(bundle.file(graph["file"])), opts,
                                                providers=session_providers(self.provider))
        except Exception as exc:
            raise BundleError(f"ONNX Runtime cannot load {graph['file']}: {exc}") from exc
        check_session_io(graph, self.session, graph["file"])  # the graph is what the manifest declares
        self.vocab = arch["vocab_size"]
        self.num_layers = arch["num_layers"]
        self.kv = KVCache.from_manifest(bundle, capacity)
        if self.provider == "CUDAExecutionProvider":  # gpu target: the cache lives on the device, never copied
            self.kv.values = [[ort.OrtValue.ortvalue_from_shape_and_type(layer[j].shape, layer.dtype, "cuda", 0)
                               for j in (0, 1)] for layer in self.kv.layers]
        self.binding = self.session.io_binding()
        for l in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                self.binding.bind_ortvalue_input(f"past_{kind}.{l}", self.kv.values[l][j])
                self.binding.bind_ortvalue_output(f"present_{kind}.{l}", self.kv.values[l][j])
        # one-token decode buffers, bound once; the loop only writes into them
        self._ids1 = np.zeros((1, 1), np.int64)  # (batch, new tokens)
        self._seqlens1 = np.zeros((1,), np.int32)  # (batch,) total - 1
        self._total1 = np.zeros((), np.int32)  # total tokens after the step
        self._index1 = np.zeros((1,), np.int64)  # logits for position 0 of the new tokens
        self._logits1 = np.zeros((1, 1, self.vocab), np.float32)  # (batch, 1, vocab)
        self.run_s = 0.0
        self.ffn_skip = FfnSkipController.bind(bundle.manifest, self.session, self.binding)  # None: no skipping
        # pass draft-head: every run also emits, per logits row, the next round's first draft token
        self.has_draft_head = any(o.name == "draft_tokens" for o in self.session.get_outputs())
        self._draft1 = np.zeros((1, 1), np.int64)  # (batch, rows)
        self.draft_rows: np.ndarray | None = None  # (rows,) int64 after each run
        # pass top-candidates: every run also emits each logits row's top tokens, best first
        tops = next((o for o in self.session.get_outputs() if o.name == "top_candidates"), None)
        self.top_width = int(tops.shape[-1]) if tops is not None else 0
        self._top1 = np.zeros((1, 1, self.top_width), np.int64)  # (batch, rows, width)
        self.top_rows: np.ndarray | None = None  # (rows, width) int64 after each run, when the graph emits them
        self.exact_rows = False  # single tokens run as two rows (see Engine.load)
        self._ids2 = np.zeros((1, 2), np.int64)  # exact_rows: the token and its padding copy
        self._bound: int | None = None  # rows of the pre-bound decode buffers the binding holds (None: other)

    def _bind_one(self, rows: int = 1) -> None:
        """Bind the pre-allocated decode buffers: one token (``rows=1``), or the token and its padding
        copy (``rows=2``, exact_rows); logits and draft of the first row only."""
        import onnxruntime as ort

        if self._bound == rows:
            return
        b = self.binding
        self._ov = [ort.OrtValue.ortvalue_from_numpy(a) for a in
                    (self._ids1 if rows == 1 else self._ids2, self._seqlens1, self._total1, self._index1,
                     self._logits1)]
        b.bind_ortvalue_input("input_ids", self._ov[0])
        b.bind_ortvalue_input("seqlens_k", self._ov[1])
        b.bind_ortvalue_input("total_sequence_length", self._ov[2])
        b.bind_ortvalue_input("logits_index", self._ov[3])
        b.bind_ortvalue_output("logits", self._ov[4])
        if self.has_draft_head:
            self._ov.append(ort.OrtValue.ortvalue_from_numpy(self._draft1))
            b.bind_ortvalue_output("draft_tokens", self._ov[-1])
        if self.top_width:
            self._ov.append(ort.OrtValue.ortvalue_from_numpy(self._top1))
            b.bind_ortvalue_output("top_candidates", self._ov[-1])
        self._bound = rows

    def forward(self, ids: Sequence[int], logits_rows: Sequence[int] | None = None) -> np.ndarray:
        """Run ``ids`` at positions ``[kv.length, kv.length + len(ids))``; return logits (rows, vocab).

        ``logits_rows`` picks which of the new positions get logits (default: the last one).
        """
        n = len(ids)
        if n == 0:
            raise GenerationError("no tokens to run")
        if self.exact_rows and n == 1 and (self.kv.length + 2 <= self.kv.capacity or self.kv.window is not None):
            out = self.forward([ids[0], ids[0]], logits_rows=[0])  # a padding row; its cache entry is dropped
            self.kv.length -= 1
            if self.draft_rows is not None:
                self.draft_rows = self.draft_rows[:1]
            return out
        self.kv.make_room(n)  # a windowed cache evicts; a plain one refuses what does not fit
        start = self.kv.length
        if n == 1 and logits_rows is None:
            return self.decode_one(int(ids[0]))
        rows = np.asarray([n - 1] if logits_rows is None else logits_rows, dtype=np.int64).reshape(-1)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= n:
            raise GenerationError(f"logits_rows must be a non-empty list of positions in [0, {n}), got {rows.tolist()}")
        ids = np.asarray(ids, dtype=np.int64).reshape(1, n)
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise GenerationError(f"token ids must be in [0, {self.vocab})")
        out = np.empty((1, len(rows), self.vocab), np.float32)
        b = self.binding
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("seqlens_k", np.array([start + n - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(start + n, np.int32))
        b.bind_cpu_input("logits_index", rows)
        import onnxruntime as ort

        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        if self.has_draft_head:
            drafts = np.empty((1, len(rows)), np.int64)  # (batch, rows)
            b.bind_ortvalue_output("draft_tokens", ort.OrtValue.ortvalue_from_numpy(drafts))
            self.draft_rows = drafts[0]
        if self.top_width:
            tops = np.empty((1, len(rows), self.top_width), np.int64)
            b.bind_ortvalue_output("top_candidates", ort.OrtValue.ortvalue_from_numpy(tops))
            self.top_rows = tops[0]
        self._bound = None
        if self.ffn_skip is not None:  # several tokens (prompt, verification): the full model
            if start == 0:
                self.ffn_skip.reset()
            self.ffn_skip.full()
        t = time.perf_counter()
        self.session.run_with_iobinding(b)
        self.run_s += time.perf_counter() - t
        if self.ffn_skip is not None:
            self.ffn_skip.after_run()
        self.kv.length = start + n
        return out[0]

    def decode_one(self, token: int) -> np.ndarray:
        """The hot path: one token at position ``kv.length``; returns logits (vocab,).

        With ``exact_rows`` the token runs as two rows (itself and a padding copy whose cache entry is
        dropped) through pre-bound buffers as well: no re-binding, only the two-row kernel's own cost."""
        if self.exact_rows and self.ffn_skip is not None:  # a multi-row run: the full model, as forward() does
            return self.forward([token], logits_rows=[0])[0]
        rows = 2 if self.exact_rows and (self.kv.length + 2 <= self.kv.capacity or self.kv.window is not None) else 1
        if self.kv.length + rows > self.kv.capacity:
            if self.kv.window is None:
                raise GenerationError(f"the context of {self.kv.capacity} tokens is full")
            self.kv.make_room(rows)
        total = self.kv.length + rows
        self._bind_one(rows)
        if rows == 1:
            self._ids1[0, 0] = token
        else:
            self._ids2[0, :] = token
        self._seqlens1[0] = total - 1
        self._total1[()] = total
        if ffn := self.ffn_skip:  # which FFN blocks this token skips
            if total == 1:
                ffn.reset()
            ffn.before_decode()
        t = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.run_s += time.perf_counter() - t
        if ffn:
            ffn.after_run()
        self.kv.length = total - (rows - 1)  # the padding row's cache entry is dropped
        if self.has_draft_head:
            self.draft_rows = self._draft1[0]
        if self.top_width:
            self.top_rows = self._top1[0]
        return self._logits1[0, 0]


def batch_variant(manifest: dict) -> bool:
    """Whether the bundle's quantized MatMuls compute one row differently from several: ONNX Runtime's
    MatMulNBits with int8 activations (accuracy_level 4), which the int4 (by default) and int8 passes use."""
    for p in manifest.get("passes", []):
        if p.get("pass") == "int8" and p.get("modified", True):
            return True
        if p.get("pass") == "int4" and p.get("modified", True) and p.get("config", {}).get("accuracy_level", 4) == 4:
            return True
    return False


class Engine:
    """Run a bundle. ``Engine.load(path)`` validates it first and refuses what it does not understand."""

    def __init__(self, bundle: Bundle, threads: int, context_length: int, spin: bool = True,
                 trust: "bool | TrustPolicy | None" = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.threads = threads
        self._trust = trust  # what Engine.load was given: draft models load under the same policy
        tok = self.manifest["tokenizer"]
        self.codec = TextCodec(bundle.file(tok["file"]), tok)
        if self.manifest["target"].get("backend") == "tvm":  # cpu-tvm / arm64: a TVM library, same cache contract
            from .tvm_session import TvmDecoderSession

            self.decoder = TvmDecoderSession(bundle, threads, context_length, trust)
        elif bundle.graph("decoder").get("shapes") == "static":  # npu target: fixed chunk, host-side cache
            from .static import StaticDecoderSession

            self.decoder = StaticDecoderSession.from_bundle(bundle, threads, context_length)
        else:
            self.decoder = DecoderSession(bundle, threads, context_length, spin)
        self.trust = check_native(bundle, trust)  # the decision the TVM session made before opening its library
        log.info("bundle %s: %s", bundle.path, self.trust.reason)
        kv = getattr(self.decoder, "kv", None)
        if getattr(kv, "window", None):  # sink + window: the cache is sinks + window slots, generation unbounded
            context_length = kv.capacity
        self.context_length = context_length
        self.last_stats: GenerationStats | None = None
        self._drafters: dict[str, Drafter] = {}  # named drafters, kept between generate() calls
        self.verified = True  # whether load() checked every file's sha256 (a draft inside it then need not)

    def forget_drafters(self) -> None:
        """Drop what the named drafters learned (Token Recycling's table): the next ``generate`` starts cold.

        A drafter normally keeps learning across calls, as an app serving different prompts wants. A
        benchmark that replays the same prompts must forget between passes, or the second pass drafts
        from the first pass's record of the very same greedy output. Drafters stay loaded (a draft model
        keeps its session).
        """
        for drafter in self._drafters.values():
            if hasattr(drafter, "forget"):
                drafter.forget()

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int | None = None, context_length: int | None = None,
             verify: bool = True, exact_rows: bool | None = None, spin: bool | None = None,
             trust: "bool | TrustPolicy | None" = None) -> "Engine":
        """Load and validate a bundle.

        trust: whether the bundle may load native code (the TVM targets' compiled library, which runs with
          the process's privileges as it loads). ONNX bundles need nothing. ``True``: the caller trusts
          this bundle. ``None``/``False`` (default): only a bundle whose ``manifest.sig`` verifies with a
          key that ``EDGEDEC_TRUSTED_KEYS`` names. A :class:`~edgedec.runtime.trust.TrustPolicy`: exactly
          its keys. An untrusted bundle with native code is refused (UntrustedBundleError) before any
          library is opened. See docs/security.md.

        threads: ONNX Runtime intra-op threads (default: physical cores).
        context_length: KV-cache capacity in tokens (default: min(2048, the bundle's maximum)).
        verify: check every file's sha256 (sizes are always checked).
        exact_rows: run every single-token step as a two-row step (the token plus a padding row whose
          cache entry is rolled back). ONNX Runtime's MatMulNBits with int8 activations (accuracy_level
          4, the int4/int8 passes' default) computes a one-row input differently from a multi-row one
          (SmolLM2 int4: up to ~1 in logits), while every multi-row chunking agrees bit for bit. With
          this on, decoding with and without speculation gives the same tokens on such bundles too
          (without it, SmolLM2 int4's greedy output already differs between one-row and two-row decoding
          within 64 tokens). It costs ~10% of plain decode speed (the one-row kernel is faster). Default
          (None): on for bundles that speculate by default (``compile --spec``) and whose int4/int8 pass
          uses accuracy_level 4, so that ``--no-spec`` reproduces their output exactly; off otherwise.
          Float bundles do not need it. At the last free slot of a full plain cache a step runs one row.
        spin: ONNX Runtime's worker threads spin between runs (fastest alone). Off, they sleep: for
          sessions that take turns on the same cores, such as a draft model's and its target's. Default
          (None): off when the bundle's default drafter is a draft model, on otherwise.
        """
        bundle = Bundle.open(bundle_dir, verify_hashes=verify)
        if bundle.manifest["target"].get("backend") not in ("onnxruntime", "tvm"):
            raise BundleError(
                f"this runtime runs onnxruntime and tvm bundles; this one is for backend {bundle.manifest['target'].get('backend')!r}"
            )
        max_ctx = int(bundle.manifest["kv_cache"]["max_capacity"])
        if context_length is None:
            context_length = min(DEFAULT_CONTEXT, max_ctx)
        if isinstance(context_length, bool) or not isinstance(context_length, int) or \
                not 1 <= context_length <= max_ctx:
            raise GenerationError(f"context_length must be in [1, {max_ctx}] for this bundle, got {context_length}")
        threads = cap_threads(threads)
        info = bundle.info
        fixed = info.kv_cache.window is not None or info.decoder().shapes == "static"  # sized by the bundle
        capacity = info.cache_capacity() if fixed else context_length
        need, have = info.kv_bytes_per_token() * capacity, available_memory()
        if have is not None and need > have:  # refuse before allocating
            raise GenerationError(f"a KV cache of {capacity:,} tokens takes {need / 2**30:,.1f} GiB, more than this "
                                  f"machine's {have / 2**30:,.1f} GiB of memory; lower the context length")
        if spin is None:
            spin = spins_with((bundle.manifest.get("speculation") or {}).get("drafter"))
        engine = cls(bundle, threads, context_length, spin, trust)
        engine.verified = verify
        if exact_rows is None:
            exact_rows = (isinstance(engine.decoder, DecoderSession) and bool(bundle.manifest.get("speculation"))
                          and batch_variant(bundle.manifest))
        if exact_rows:
            if not isinstance(engine.decoder, DecoderSession):
                raise GenerationError("exact_rows applies to ONNX Runtime bundles with a dynamic-shape decoder")
            engine.decoder.exact_rows = True
        return engine

    # ------------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationError("the prompt is empty")
            ids = self.codec.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            vocab = self.bundle.arch["vocab_size"]
            if any(not 0 <= i < vocab for i in ids):
                raise GenerationError(f"prompt token ids must be in [0, {vocab})")
        if not ids:
            raise GenerationError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens; the context holds {self.context_length} "
                "(raise context_length or shorten the prompt)"
            )
        return ids

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 drafter: "str | Drafter | None" = "auto", draft_len: int | None = None,
                 adaptive_draft: bool = True) -> Iterator[Token]:
        """Stream tokens for ``prompt`` (text, or token ids). Greedy by default; seeded sampling otherwise.

        Stops at ``max_new_tokens``, an end-of-sequence token (unless ``ignore_eos``), a ``stop`` string,
        or a full context. Statistics of the finished call are in ``engine.last_stats``.

        The streamed text never contains a stop string or any part of it: text that could be the start
        of a stop string is held back until the next tokens show it is not (so a token's ``text`` may
        be "" and a later one carry it). Text still held when an end-of-sequence token arrives is
        released with that token, the one case where the eos token is yielded.

        ``drafter`` sets speculative decoding: ``"auto"`` (default) uses the bundle's setting (``edgedec
        compile --spec``; none if it has none), ``None`` turns it off, or name one (``"ngram"``,
        ``"recycling"``, ``"ngram+recycling"``) or pass a :class:`~edgedec.runtime.drafters.Drafter`. Up to
        ``draft_len`` drafted tokens (default: the bundle's, else 4) are verified in one pass; with
        ``adaptive_draft`` the length follows the running acceptance (:class:`DraftLengthPolicy`) and
        drafting pauses while it does not pay. Greedy output
        is the same as without speculation; sampled output has the same distribution.
        """
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise GenerationError(f"stop strings must be non-empty strings, got {stop!r}")
        sampler = Sampler(temperature, top_k, top_p, seed)
        spec = self.manifest.get("speculation") or {}
        from_manifest = drafter == "auto"
        if from_manifest:
            drafter = spec.get("drafter")
        if draft_len is None:
            draft_len = int(spec.get("draft_len", 4))
        if isinstance(drafter, str):  # one drafter per name and engine: what it learned carries over
            drafter = self._named_drafter(drafter, from_manifest)
        if drafter is not None and not 1 <= draft_len <= 64:
            raise GenerationError(f"draft_len must be in [1, 64], got {draft_len}")
        ids = self.encode(prompt)
        return self._generate(ids, max_new_tokens, sampler, stop, ignore_eos, drafter, draft_len, adaptive_draft)

    def _named_drafter(self, name: str, from_manifest: bool) -> Drafter:
        """The engine's drafter called ``name``, made on first use. A draft model the manifest names
        (``model:REL`` or ``ngram+model:REL``) is the bundle nested at REL inside this one, trusted as this
        bundle is (its signature covers the draft) and already hashed with it; one the caller names
        (``model:PATH``) may be anywhere."""
        model = split_model(name)
        nested = from_manifest and model is not None
        key = ("nested", name) if nested else name  # a caller's model:draft is another path
        if key not in self._drafters:
            trust, where, verify = self._trust, name, True
            if nested:
                prefix, rel = model
                trust = vouch_for_nested(self.bundle, as_policy(trust), rel)
                where = f"{prefix}model:{self.bundle.nested_bundle(rel)}"
                verify = not self.verified  # this bundle's hashes covered the draft's files
            drafter = make_drafter(where, self.bundle.arch["vocab_size"], self.decoder, self.bundle, self.threads,
                                   trust=trust, context_length=self.context_length, verify=verify)
            if nested:
                drafter.name = name  # as the manifest wrote it
            self._drafters[key] = drafter
        return self._drafters[key]

    def chat(self, messages: list[dict], **kwargs) -> Iterator[Token]:
        """Apply the bundle's chat template to ``messages`` and generate the assistant's reply."""
        text = self.codec.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.codec.encode(text, add_special_tokens=False)
        return self.generate(ids, **kwargs)

    def _tokens(self, ids: list[int], sampler: Sampler, stats: GenerationStats, drafter, draft_len: int,
                adaptive: bool = True):
        """Yield new token ids: one per decode step, or several per verification when speculating.

        Invariant between yields: the cache holds every token except the last one yielded.
        """
        dec = self.decoder
        dec.kv.length = 0
        if (ffn := getattr(dec, "ffn_skip", None)) is not None:  # speculating is lossless: plain steps run full
            ffn.lossless = drafter is not None
        logits = dec.forward(ids)[-1]
        token = sampler(logits)
        if drafter is None:
            while True:
                yield token
                token = sampler(dec.decode_one(token))
        history = np.zeros(dec.kv.capacity + 1, np.int32)  # (positions,) prompt + generated tokens; grows
        n = len(ids)
        history[:n] = ids
        drafter.reset(history[:n])
        stats.drafter = drafter.name
        width = getattr(drafter, "width", 0)
        policy = DraftLengthPolicy(draft_len, getattr(drafter, "cost_per_token", 0.12)) if adaptive else None
        first_step = n + 1  # history length at the first decode step
        while True:
            yield token
            if n + 64 >= len(history):  # a windowed cache runs past its capacity
                history = np.concatenate([history, np.zeros_like(history)])
            history[n] = token
            n += 1
            room = dec.kv.capacity - dec.kv.length - 1  # draft tokens that fit after `token`
            k = min(policy.next_k() if policy else draft_len, room)
            t = time.perf_counter()
            draft = drafter.propose(history[:n], k) if k > 0 else []
            t_draft = time.perf_counter()
            stats.draft_s += t_draft - t
            if not draft:
                logits = dec.decode_one(token)
                if width:  # a recycling drafter learns from plain steps too
                    drafter.observe(history[n - 1 : n], candidates(dec, logits[None], width))
                token = sampler(logits)
                if policy and n > first_step:  # the first step after the prompt runs cold: not timed
                    policy.timed_plain(time.perf_counter() - t_draft)
                continue
            rows = dec.forward([token, *draft], logits_rows=range(len(draft) + 1))  # (k + 1, vocab)
            new = verify_chain(rows, draft, sampler)
            if policy:  # what drafting and verifying cost, against the plain steps timed so far
                policy.timed_verify(len(draft), time.perf_counter() - t)
                stats.draft_cost = policy.cost
            accepted = len(new) - 1
            dec.kv.length -= len(draft) - accepted  # roll back rejected drafts; no copy
            if getattr(dec, "draft_rows", None) is not None:  # the draft head's guess after the last accepted row is last
                dec.draft_rows = dec.draft_rows[: accepted + 1]
            stats.verify_steps += 1
            stats.drafted_tokens += len(draft)
            stats.accepted_tokens += accepted
            if policy:
                policy.update(len(draft), accepted)
            if width:
                inputs = np.asarray([token, *draft[:accepted]], np.int32)
                drafter.observe(inputs, candidates(dec, rows[: accepted + 1], width))
            for tok in new[:-1]:
                yield tok
                history[n] = tok
                n += 1
            token = new[-1]

    def _generate(self, ids: list[int], max_new: int, sampler: Sampler, stop: list[str], ignore_eos: bool,
                  drafter=None, draft_len: int = 4, adaptive: bool = True):
        dec = self.decoder
        stats = GenerationStats(prompt_tokens=len(ids))
        self.last_stats = stats
        eos = frozenset() if ignore_eos else self.codec.eos_ids
        stream = StreamDecoder(self.codec)
        held = ""  # decoded text not yet yielded: it may be the start of a stop string
        t0 = time.perf_counter()
        source = self._tokens(ids, sampler, stats, drafter, draft_len, adaptive)
        out = stats.token_ids
        t_first = None
        try:
            for token in source:
                if t_first is None:  # the prefill pass ran inside the first next()
                    stats.prefill_s = time.perf_counter() - t0
                    dec.run_s = 0.0
                out.append(token)
                stats.new_tokens = len(out)
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    stats.ttft_s = now - t0
                stats.decode_s = now - t_first
                stats.run_s = dec.run_s
                if token in eos:
                    stats.stop_reason = "eos"
                    if rest := held + stream.flush():
                        yield Token(token, rest)
                    return
                last = len(out) >= max_new or dec.kv.is_full
                text = held + stream.push(token) + (stream.flush() if last else "")
                held = ""
                if stop:
                    # earlier text holds no stop string and no start of one (that is in `held`), so a stop
                    # string can only begin in `text`
                    hits = [i for s in stop if (i := text.find(s)) >= 0]
                    if hits:
                        if min(hits) > 0:
                            yield Token(token, text[: min(hits)])
                        stats.stop_reason = "stop"
                        return
                    if not last and (keep := _stop_prefix_length(text, stop)):
                        text, held = text[:-keep], text[-keep:]
                yield Token(token, text)
                if len(out) >= max_new:
                    stats.stop_reason = "length"
                    break
                if dec.kv.is_full:
                    stats.stop_reason = "context_full"
                    break
        finally:
            source.close()
            if t_first is not None:
                stats.decode_s = time.perf_counter() - t_first
                stats.run_s = dec.run_s

    def generate_text(self, prompt, **kwargs) -> str:
        """Convenience: the whole generated text of ``generate``."""
        return "".join(t.text for t in self.generate(prompt, **kwargs))


def verify_chain(rows: np.ndarray, draft: list[int], sampler: Sampler) -> list[int]:
    """Accept a prefix of ``draft`` given the model's logits ``rows`` (k + 1, vocab) at the positions
    that fed ``[last, *draft]``; return the accepted tokens followed by one token from the model.

    Greedy: accept while the draft equals the argmax; then the argmax. Sampling: the drafters are
    deterministic (q is a point mass on the draft token), so speculative sampling accepts draft token d
    with probability p(d) and on rejection samples from p with d removed (max(p - q, 0), renormalised);
    after a fully accepted draft it samples the bonus token from the last row. The output distribution
    equals sampling from p step by step (Leviathan et al. 2023; Chen et al. 2023).
    """
    k = len(draft)
    if sampler.greedy:
        target = rows.argmax(axis=-1)
        n = 0
        while n < k and draft[n] == target[n]:
            n += 1
        return [*draft[:n], int(target[n])]
    for i, d in enumerate(draft):
        p = sampler.probs(rows[i])
        if sampler.rng.random() < p[d]:
            continue
        p[d] = 0.0
        p /= p.sum()
        return [*draft[:i], int(sampler.rng.choice(p.shape[-1], p=p))]
    return [*draft, sampler(rows[k])]


def candidates(dec, rows: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` best next tokens of the first ``len(rows)`` logits rows of the last run: from the
    graph when it emits them (pass top-candidates), else picked here from ``rows``."""
    top = getattr(dec, "top_rows", None)
    if top is not None and dec.top_width >= width:
        return top[: len(rows), :width].astype(np.int32)
    return top_candidates(rows, width)


TOP_CHUNK = 64  # logits per chunk in top_candidates' first pass


def top_candidates(rows: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` most likely next tokens of each row, best first: (rows, width) int32.

    In two passes when the vocabulary splits into chunks of ``TOP_CHUNK``: each chunk's max (one
    vectorized pass), then the ``width`` chunks with the largest maxima, which hold the ``width`` largest
    logits (every chunk holding one of them has a max at least the ``width``-th largest logit, and no
    other chunk does; a tie with another chunk's max can only swap equal logits). SmolLM2's 49,152 logits:
    ~5x faster than one argpartition over them, which took ~1 ms a speculative verification."""
    n, vocab = rows.shape
    if width == 1:  # what the recycling drafter asks for: each row's argmax (~20 us a row here, not ~130)
        return rows.argmax(axis=-1).astype(np.int32)[:, None]
    if vocab % TOP_CHUNK or vocab // TOP_CHUNK <= width:
        ids = np.broadcast_to(np.arange(vocab), rows.shape)
    else:
        chunks = rows.reshape(n, vocab // TOP_CHUNK, TOP_CHUNK)
        best = np.argpartition(chunks.max(-1), -width, axis=-1)[:, -width:]  # (n, width) chunk numbers
        ids = (best[:, :, None] * TOP_CHUNK + np.arange(TOP_CHUNK)).reshape(n, -1)
        rows = np.take_along_axis(rows, ids, axis=-1)
    part = np.argpartition(rows, -width, axis=-1)[:, -width:]
    order = np.argsort(-np.take_along_axis(rows, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(np.take_along_axis(ids, part, axis=-1), order, axis=-1).astype(np.int32)


def _stop_prefix_length(text: str, stop: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (0 if none)."""
    for k in range(min(len(text), max(len(s) for s in stop) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0
