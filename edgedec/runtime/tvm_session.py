"""Run a ``cpu-tvm`` / ``arm64`` bundle with the TVM runtime (``tvm.runtime`` only: no compiler, no torch).

Same interface as :class:`edgedec.runtime.engine.DecoderSession`: ``forward(ids, logits_rows)``,
``decode_one(token)``, ``kv`` with ``length``/``capacity``, ``run_s``. The library's ``prefill``, ``decode``
and ``verify{k}`` (every row's logits, k static) functions write new keys/values in place into the cache
tensors passed to them, at
``[length, length + n)``, and attend over ``[0, length + n)``; rolling back is a smaller ``length``.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Sequence

import numpy as np

from ..errors import BundleError, GenerationError

LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")  # what load_module opens as a library as is
PARAM_DTYPES = {"float32": "<f4", "uint32": "<u4", "float16": "<f2", "uint16": "<u2"}  # params.bin entries by the manifest's dtype


def import_tvm():
    """``import tvm`` without letting tvm_ffi pull in torch (it imports torch whenever it is installed,
    only to work around a symbol clash on Windows); the runtime stays torch-free."""
    import sys

    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tvm_ffi tolerates
    try:
        import tvm
    finally:
        if block and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


KV_DTYPES = ("float32", "float16")  # the manifest's kv_cache.dtype values this runtime allocates


class TvmKVCache:
    """Per layer, two TVM tensors (key, value), each ``(1, kv_heads, capacity, head_dim)`` of ``dtype``
    (float32, or float16 with ``--kv fp16``).

    ``views[l][j]`` are numpy views of the same memory (j = 0 keys, 1 values). ``length`` is the
    number of valid positions.
    """

    window = None  # no sink + window eviction on this backend

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32"):
        tvm = import_tvm()

        self.capacity = capacity
        self.tensors = [tvm.runtime.empty((1, kv_heads, capacity, head_dim), dtype, tvm.cpu())
                        for _ in range(2 * num_layers)]
        self.views = [[np.from_dlpack(self.tensors[2 * l + j]) for j in (0, 1)] for l in range(num_layers)]
        for pair in self.views:
            for v in pair:
                v[...] = 0
        self.array = tvm.runtime.convert(self.tensors)  # passed to every call as one tuple
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for pair in self.views for v in pair)

    @property
    def is_full(self) -> bool:
        return self.length + 1 > self.capacity

    def make_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise GenerationError(f"{self.length + n} tokens do not fit the context of {self.capacity} tokens")


def _check_machine(graph: dict) -> None:
    triple = (graph.get("llvm_target") or {}).get("mtriple", "")
    want = triple.split("-")[0]
    have = platform.machine().lower()
    aliases = {"arm64": "aarch64", "amd64": "x86_64"}
    if want and aliases.get(have, have) != aliases.get(want, want):
        raise BundleError(f"this bundle's TVM library is built for {triple} and cannot run on this {have} machine")
    needed = graph.get("cpu_flags") or []
    if needed:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
        except OSError:
            return
        missing = [x for x in needed if x not in flags]
        if flags and missing:
            cpu = (graph.get("llvm_target") or {}).get("mcpu", "?")
            raise BundleError(f"this bundle's TVM library is built for CPU {cpu} and uses {', '.join(missing)}, which "
                              "this CPU lacks; compile it with --target cpu-tvm on (a machine like) this one")


class TvmDecoderSession:
    """The bundle's Relax VM executable with its parameters and an in-place KV cache."""

    def __init__(self, bundle, threads: int, capacity: int, trust=None):
        from .trust import check_native

        os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # read when TVM's thread pool starts
        try:
            tvm = import_tvm()
        except ImportError as exc:
            raise BundleError(f"this bundle runs on Apache TVM's runtime: pip install 'edgedec[tvm]' ({exc})") from exc
        graph = bundle.graph("decoder")
        if graph.get("format") != "tvm-relax-vm":
            raise BundleError(f"the decoder graph's format {graph.get('format')!r} is not 'tvm-relax-vm'")
        _check_machine(graph)
        library = bundle.file(graph["file"])  # a hashed file inside the bundle, symbolic links followed
        if library.suffix not in LIBRARY_SUFFIXES:  # TVM would run a compiler on .o/.tar input
            raise BundleError(f"the decoder graph's file {graph['file']!r} is not a shared library "
                              f"({', '.join(LIBRARY_SUFFIXES)})")
        check_native(bundle, trust)  # before the library is opened: its constructors run inside dlopen
        arch = bundle.arch
        self.vocab = arch["vocab_size"]
        self.num_layers = arch["num_layers"]
        try:
            self.vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
        except Exception as exc:
            raise BundleError(f"the TVM runtime cannot load {graph['file']}: {exc}") from exc
        self.params = tvm.runtime.convert(self._load_params(bundle, graph))
        kv_dtype = bundle.manifest["kv_cache"].get("dtype", "float32")
        if kv_dtype not in KV_DTYPES:
            raise BundleError(f"the manifest's kv_cache.dtype {kv_dtype!r} is not one this runtime allocates "
                              f"({', '.join(KV_DTYPES)})")
        self.kv = TvmKVCache(self.num_layers, arch["num_kv_heads"], arch["head_dim"], capacity, kv_dtype)
        self._prefill, self._decode = self.vm["prefill"], self.vm["decode"]
        # verify{k}: every row's logits at a static k (what speculation calls); older libraries lack them
        has = self.vm.module.implements_function
        self._verify = {k: self.vm[f"verify{k}"] for k in range(2, 65) if has(f"verify{k}")}
        self._shape = tvm.runtime.ShapeTuple
        self._tensor = tvm.runtime.tensor
        self._ids1 = tvm.runtime.empty((1, 1), "int32", tvm.cpu())  # (batch, new tokens)
        self._ids1_view = np.from_dlpack(self._ids1)
        self.run_s = 0.0
        self._check_params()

    def _check_params(self) -> None:
        """Check every weight's shape and dtype against the library once, at load (``prefill`` and
        ``decode`` skip that on each call, for speed), so parameters that do not fit it are refused here,
        in one line. A library from before ``check_params`` existed checks them in ``prefill``: run it on
        one token (position 0 of the cache, which the first real call rewrites)."""
        try:
            if self.vm.module.implements_function("check_params"):
                self.vm["check_params"](self.params)
            else:
                self._prefill(self._tensor(np.zeros((1, 1), np.int32)), self._tensor(np.zeros(1, np.int32)),
                              self._shape([1]), self.kv.array, self.params)
        except Exception as exc:  # TVM's check names the kernel and the argument, over several lines
            why = " ".join(str(exc).split())[:400] or type(exc).__name__
            raise BundleError(f"the parameters in params.bin do not fit the library: {why}") from exc

    @staticmethod
    def _load_params(bundle, graph) -> list:
        tvm = import_tvm()

        path = bundle.file(graph["params_file"])
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        out = []
        for p in graph["params"]:
            shape, offset, nbytes = tuple(p["shape"]), int(p["offset"]), int(p["bytes"])
            dtype = PARAM_DTYPES.get(p.get("dtype"))
            if dtype is None or offset + nbytes > raw.size or int(np.prod(shape)) * int(dtype[-1]) != nbytes:
                raise BundleError(f"params entry {p.get('name')!r} does not fit {graph['params_file']}")
            out.append(tvm.runtime.tensor(raw[offset:offset + nbytes].view(dtype).reshape(shape)))
        return out

    def forward(self, ids: Sequence[int], logits_rows: Sequence[int] | None = None) -> np.ndarray:
        """Run ``ids`` at positions ``[kv.length, kv.length + len(ids))``; return logits (rows, vocab)."""
        n = len(ids)
        if n == 0:
            raise GenerationError("no tokens to run")
        self.kv.make_room(n)
        start = self.kv.length
        if n == 1 and logits_rows is None:
            return self.decode_one(int(ids[0]))
        rows = np.asarray([n - 1] if logits_rows is None else logits_rows, dtype=np.int32).reshape(-1)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= n:
            raise GenerationError(f"logits_rows must be a non-empty list of positions in [0, {n}), got {rows.tolist()}")
        ids = np.asarray(ids, dtype=np.int64).reshape(1, n)
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise GenerationError(f"token ids must be in [0, {self.vocab})")
        t = time.perf_counter()
        if n in self._verify and rows.size == n and (rows == np.arange(n)).all():
            out = self._verify[n](self._tensor(ids.astype(np.int32)), self._shape([start + n]), self.kv.array,
                                  self.params)
        else:
            out = self._prefill(self._tensor(ids.astype(np.int32)), self._tensor(rows), self._shape([start + n]),
                                self.kv.array, self.params)
        logits = np.from_dlpack(out)[0]
        self.run_s += time.perf_counter() - t
        self.kv.length = start + n
        return logits

    def decode_one(self, token: int) -> np.ndarray:
        """The hot path: one token at position ``kv.length``; returns logits (vocab,)."""
        total = self.kv.length + 1
        if total > self.kv.capacity:
            raise GenerationError(f"the context of {self.kv.capacity} tokens is full")
        self._ids1_view[0, 0] = token
        t = time.perf_counter()
        out = self._decode(self._ids1, self._shape([total]), self.kv.array, self.params)
        self.run_s += time.perf_counter() - t
        self.kv.length = total
        return np.from_dlpack(out)[0, 0]
