"""Running a static-shape decoder graph (the ``npu`` target) with the same interface as ``DecoderSession``.

The graph (see ``edgedec.compiler.export_static``) takes a fixed chunk of ``C`` tokens and a fixed cache of
``T`` positions and returns the chunk's keys and values instead of writing the cache. This session keeps
the cache on the host and does what an NPU app does around such a graph:

* a call of ``n`` tokens at position ``start`` runs ``ceil(n / C)`` chunks; a chunk's unused slots are
  padding (token 0 at the chunk's last position, seeing only itself), their outputs ignored;
* the additive mask (1, 1, C, T + C) lets chunk row ``i`` see cache columns ``[0, start)`` and chunk
  columns ``[T, T + i]``; cache columns ``[start, T)`` hold stale or zero entries and are masked;
* after each chunk the valid rows of ``new_key.{l}`` / ``new_value.{l}`` are copied into the cache at
  ``[start, start + n)``. Rolling back (speculation) is a smaller ``kv.length``, as with ``KVCache``.

Torch-free: numpy and onnxruntime only. Here the graph runs on ONNX Runtime's CPU provider, which is how
the numerics of an NPU bundle are checked on a machine without the NPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BundleError, GenerationError
from .providers import select_provider, session_providers

log = logging.getLogger(__name__)

MASK_VALUE = -10000.0  # the value the exporter documents for masked attention entries
STATIC_INPUTS = ("input_ids", "position_ids", "attention_mask")


class StaticKVCache:
    """The cache in one flat float32 buffer ``(layer, 2, 1, kv_heads, T, head_dim)``; ``[l, 0]`` keys,
    ``[l, 1]`` values. ``capacity`` (usable positions) may be below the graph's ``T``."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, graph_capacity: int, capacity: int):
        self.capacity = capacity
        self.graph_capacity = graph_capacity
        self.buffer = np.zeros((num_layers, 2, 1, kv_heads, graph_capacity, head_dim), np.float32)
        self.length = 0

    window = None  # no sliding window: a static cache is a fixed context

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def is_full(self) -> bool:
        """No room for one more token."""
        return self.length + 1 > self.capacity

    def make_room(self, n: int) -> None:
        """Refuse ``n`` more tokens that do not fit (the ``KVCache`` interface; nothing is evicted)."""
        if self.length + n > self.capacity:
            raise GenerationError(f"{self.length + n} tokens do not fit the context of {self.capacity} tokens")


class _StaticGraph:
    """One static graph (chunk C) with its bound buffers; past_* are bound to the shared host cache."""

    def __init__(self, model_path: Path, arch: dict, threads: int, providers, declared: dict | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        name = Path(model_path).name
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=list(providers))
        except Exception as exc:
            raise BundleError(f"ONNX Runtime cannot load {name}: {exc}") from exc
        if declared is not None:  # the graph is what the manifest declares (and validated) before allocating
            from .manifest import check_session_io

            check_session_io(declared, self.session, name)
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in (*STATIC_INPUTS, "past_key.0") if n not in inputs]
        if missing:
            raise BundleError(f"{name} is not a static decoder graph: no input {', '.join(missing)}")
        shape, chunk = inputs["past_key.0"].shape, inputs["input_ids"].shape[1]
        if not all(isinstance(d, int) for d in shape) or not isinstance(chunk, int):
            raise BundleError(f"{name} has dynamic cache or chunk dims {shape}, {chunk}; a static decoder graph "
                              "needs fixed ones")
        self.chunk, self.capacity = chunk, shape[2]
        self.num_layers, vocab = arch["num_layers"], arch["vocab_size"]
        c, t, kvh, d = chunk, shape[2], arch["num_kv_heads"], arch["head_dim"]
        self.ids = np.zeros((1, c), np.int32)  # (batch, C)
        self.pos = np.zeros((1, c), np.int32)  # (batch, C)
        self.mask = np.full((1, 1, c, t + c), MASK_VALUE, np.float32)  # (batch, 1, C rows, T + C columns)
        self.logits = np.zeros((1, c, vocab), np.float32)  # (batch, C, vocab)
        self.new = np.zeros((self.num_layers, 2, 1, kvh, c, d), np.float32)  # (layer, k/v, batch, kv, C, D)
        self.causal = np.where(np.arange(c)[None, :] <= np.arange(c)[:, None], 0.0, MASK_VALUE).astype(np.float32)

    def bind(self, kv_buffer: np.ndarray) -> None:
        import onnxruntime as ort

        b = self.binding = self.session.io_binding()
        self._ov = []
        for name, arr in (("input_ids", self.ids), ("position_ids", self.pos), ("attention_mask", self.mask)):
            self._ov.append(ort.OrtValue.ortvalue_from_numpy(arr))
            b.bind_ortvalue_input(name, self._ov[-1])
        self._ov.append(ort.OrtValue.ortvalue_from_numpy(self.logits))
        b.bind_ortvalue_output("logits", self._ov[-1])
        for l in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                past = ort.OrtValue.ortvalue_from_numpy(kv_buffer[l, j])
                new = ort.OrtValue.ortvalue_from_numpy(self.new[l, j])
                self._ov += [past, new]
                b.bind_ortvalue_input(f"past_{kind}.{l}", past)
                b.bind_ortvalue_output(f"new_{kind}.{l}", new)

    def prepare(self, ids: np.ndarray, start: int) -> None:
        """Fill the bound inputs for ``n <= C`` tokens at positions ``[start, start + n)``."""
        n, t, c = len(ids), self.capacity, self.chunk
        self.ids[0, :n] = ids
        self.ids[0, n:] = 0
        self.pos[0, :n] = np.arange(start, start + n)
        self.pos[0, n:] = start + n - 1
        m = self.mask[0, 0]
        m.fill(MASK_VALUE)
        m[:n, :start] = 0.0
        m[:, t:] = self.causal
        m[:n, t + n:] = MASK_VALUE  # real tokens never see padding
        m[n:, t:] = MASK_VALUE
        m[np.arange(n, c), t + np.arange(n, c)] = 0.0  # padding sees only itself


class StaticDecoderSession:
    """Static-shape decoder graphs (a prefill chunk of C tokens and, when the bundle has one, a one-token
    decode graph) over one host cache; ``forward`` / ``decode_one`` as in
    :class:`edgedec.runtime.engine.DecoderSession`."""

    def __init__(self, model_paths: Sequence[Path], arch: dict, capacity: int | None, threads: int,
                 providers: Sequence[str] = ("CPUExecutionProvider",), declared: Sequence[dict] | None = None):
        graphs = [_StaticGraph(p, arch, threads, providers, d)
                  for p, d in zip(model_paths, declared or [None] * len(model_paths))]
        caps = {g.capacity for g in graphs}
        if len(caps) != 1:
            raise BundleError(f"the static graphs disagree on the cache size: {sorted(caps)}")
        t = caps.pop()
        self.vocab = arch["vocab_size"]
        self.num_layers = arch["num_layers"]
        if capacity is None:
            capacity = t
        if not 1 <= capacity <= t:
            raise GenerationError(f"context {capacity} does not fit the graph's static cache of {t} positions")
        self.kv = StaticKVCache(self.num_layers, arch["num_kv_heads"], arch["head_dim"], t, capacity)
        for g in graphs:
            g.bind(self.kv.buffer)
        self._big = max(graphs, key=lambda g: g.chunk)  # prefill and multi-token steps
        self._one = next((g for g in graphs if g.chunk == 1), None)  # single-token decode, if the bundle has it
        self.chunk = self._big.chunk
        self._prepared: _StaticGraph | None = None
        self.run_s = 0.0

    @classmethod
    def from_file(cls, model_path: Path, arch: dict, capacity: int | None = None, threads: int = 1):
        return cls([model_path], arch, capacity, threads)

    @classmethod
    def from_bundle(cls, bundle, threads: int, capacity: int) -> "StaticDecoderSession":
        """The bundle's static graphs (decoder, and prefill when present) on its execution provider, or on
        its recorded fallback (logged)."""
        graph = bundle.graph("decoder")
        paths, declared = [bundle.file(graph["file"])], [graph]
        if any(g.get("role") == "prefill" for g in bundle.manifest["graphs"].values()):
            paths.append(bundle.file(bundle.graph("prefill")["file"]))
            declared.append(bundle.graph("prefill"))
        provider = select_provider(graph)
        session = cls(paths, bundle.arch, capacity, threads, providers=session_providers(provider), declared=declared)
        session.provider = provider
        return session

    def _graph_for(self, n: int) -> _StaticGraph:
        return self._one if n == 1 and self._one is not None else self._big

    def prepare_chunk(self, ids: np.ndarray) -> None:
        """Fill the bound input buffers for up to C tokens at ``kv.length`` (ids, positions, mask)."""
        n = len(ids)
        if not 1 <= n <= self.chunk:
            raise GenerationError(f"a chunk holds 1..{self.chunk} tokens, got {n}")
        g = self._graph_for(n)
        g.prepare(ids, self.kv.length)
        self._prepared = g

    def feeds(self) -> dict[str, np.ndarray]:
        """Copies of the prepared graph's inputs by name (what ``prepare_chunk`` filled, and the cache)."""
        g = self._prepared
        out = {"input_ids": g.ids.copy(), "position_ids": g.pos.copy(), "attention_mask": g.mask.copy()}
        for l in range(self.num_layers):
            out[f"past_key.{l}"] = self.kv.buffer[l, 0].copy()
            out[f"past_value.{l}"] = self.kv.buffer[l, 1].copy()
        return out

    def _run_chunk(self, ids: np.ndarray) -> np.ndarray:
        """Run up to C tokens at ``kv.length``; store their keys/values; return logits (chunk, vocab)."""
        self.prepare_chunk(ids)
        g, n, start = self._prepared, len(ids), self.kv.length
        t0 = time.perf_counter()
        g.session.run_with_iobinding(g.binding)
        self.run_s += time.perf_counter() - t0
        self.kv.buffer[:, :, :, :, start:start + n] = g.new[:, :, :, :, :n]
        self.kv.length = start + n
        return g.logits[0]

    def forward(self, ids: Sequence[int], logits_rows: Sequence[int] | None = None) -> np.ndarray:
        """Run ``ids`` at positions ``[kv.length, kv.length + len(ids))``; return logits (rows, vocab)."""
        n, start = len(ids), self.kv.length
        if n == 0:
            raise GenerationError("no tokens to run")
        if start + n > self.kv.capacity:
            raise GenerationError(f"{start + n} tokens do not fit the context of {self.kv.capacity} tokens")
        rows = np.asarray([n - 1] if logits_rows is None else list(logits_rows), dtype=np.int64).reshape(-1)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= n:
            raise GenerationError(f"logits_rows must be a non-empty list of positions in [0, {n}), got {rows.tolist()}")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise GenerationError(f"token ids must be in [0, {self.vocab})")
        out = np.empty((len(rows), self.vocab), np.float32)
        for c0 in range(0, n, self.chunk):
            c1 = min(c0 + self.chunk, n)
            logits = self._run_chunk(ids[c0:c1])
            sel = np.nonzero((rows >= c0) & (rows < c1))[0]
            out[sel] = logits[rows[sel] - c0]
        return out

    def decode_one(self, token: int) -> np.ndarray:
        """One token at ``kv.length`` (the one-token graph when the bundle has one); returns logits (vocab,)."""
        if self.kv.length + 1 > self.kv.capacity:
            raise GenerationError(f"the context of {self.kv.capacity} tokens is full")
        return self._run_chunk(np.array([token], np.int64))[0].copy()
