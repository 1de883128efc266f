"""``compile`` with no ``--target`` and no ``-q``: keep the source's precision, on the fastest target this host runs.

Two decisions, each with a one-line reason that the CLI prints and the manifest records (``defaults``):

* **Weights** (:func:`default_weight_passes`): the source's own precision, exactly. A GGUF file whose
  matrices are all of a type the ``int4`` pass re-expresses without loss (:data:`edgedec.passes.int4.EXACT_SOURCE_TYPES`)
  becomes that re-expression, on a target whose int4 computes with float activations
  (:data:`edgedec.passes.int4.LOSSLESS_TARGETS`); anything else (a float source, another GGUF type, a target
  whose int4 rounds activations) stays float32, which is exact too. After the build the pipeline checks the
  claim against what the target actually did (:func:`confirm_lossless`).
* **Target** (:func:`choose_target`): the first of :data:`PREFERENCE` that this host can run (for
  ``cpu-tvm``: ``import tvm`` works and the CPU has the vector extensions its kernels are written for) and
  that takes every other option given (``--kv``, ``--kv-window``, ``--pass``, ``--spec``). The order is
  measured, per weight kind (:data:`PREFERENCE`; docs/defaults.md has the figures).
"""

from __future__ import annotations

import importlib
import logging
import platform
from dataclasses import dataclass, field

from ..errors import EdgedecError, UnsupportedError

log = logging.getLogger(__name__)

# fastest first, per weight kind; measured on SmolLM2-135M, 2 threads (docs/defaults.md):
#   int4 (exact GGUF grids): cpu-tvm 2.3-3.3x the float32 cpu bundle, 1.05-1.3x cpu's own int4
#   float32: cpu-tvm 1.03x and 1.71x cpu in two runs on a busy machine (README): no clear win, and an ONNX bundle
#            carries no native code, so the ONNX Runtime bundle stays the float default
PREFERENCE = {"int4": ("cpu-tvm", "cpu"), "float": ("cpu",)}
# x86 extensions the TVM kernels are written for (8-lane float32 FMA, float16 scales: tvm_quant.py)
TVM_X86_FLAGS = ("avx2", "fma", "f16c")
WEIGHT_QUANT_PASSES = ("int4", "int8", "qdq")  # passes that set the weights' precision


@dataclass(frozen=True)
class SourceWeights:
    """What a model source stores its weights as: per GGUF tensor type, how many matrices (ndim >= 2) and
    vectors; a Hugging Face directory is ``float``."""

    kind: str  # "gguf" | "hf"
    matrices: dict = field(default_factory=dict)  # GGUF type -> count of tensors with >= 2 dimensions
    vectors: dict = field(default_factory=dict)  # GGUF type -> count of 1-D tensors (norms; kept float32)

    def describe(self) -> str:
        if self.kind != "gguf":
            return "float weights (Hugging Face directory)"
        return "GGUF " + ", ".join(f"{t} x{n}" for t, n in sorted(self.matrices.items())) + " matrices"


def source_weights(model: str | None) -> SourceWeights:
    """Read, without loading any weight, what ``model`` stores its weights as (the GGUF header's tensor
    types and shapes). Resolves registry names as :func:`edgedec.models.source.load` does (pulling if needed)."""
    from ..models import source as sources

    kind, path, _ = sources.resolve(model)
    if kind != "gguf":
        return SourceWeights("hf")
    sources._check_gguf(path)  # one line for a corrupt or unsupported file, before anything else
    from gguf import GGUFReader

    matrices: dict = {}
    vectors: dict = {}
    for t in GGUFReader(str(path)).tensors:
        dims = sum(1 for d in t.shape if int(d) > 1)
        bucket = matrices if dims >= 2 else vectors
        bucket[t.tensor_type.name] = bucket.get(t.tensor_type.name, 0) + 1
    return SourceWeights("gguf", matrices, vectors)


def default_weight_passes(weights: SourceWeights, target: str) -> tuple[tuple, str]:
    """The weight passes that keep ``weights`` exactly on ``target``, and why: ``((("int4", ()),), reason)``
    or ``((), reason)`` (float32)."""
    from ..passes import int4

    if weights.kind != "gguf":
        return (), "float source: float32 weights keep it exactly"
    types = sorted(weights.matrices)
    inexact = [t for t in types if t not in int4.EXACT_SOURCE_TYPES]
    if inexact:
        return (), (f"GGUF {', '.join(inexact)} matrices are not among the types int4 re-expresses exactly "
                    f"({', '.join(sorted(int4.EXACT_SOURCE_TYPES))}): float32 weights keep them exactly")
    if target not in int4.LOSSLESS_TARGETS:
        return (), (f"int4 is exact only on {', '.join(int4.LOSSLESS_TARGETS)} (float activations; cpu's "
                    f"MatMulNBits rounds them to int8): float32 weights keep the GGUF {', '.join(types)} source "
                    f"exactly on {target}")
    return (("int4", ()),), (f"GGUF {', '.join(types)} source: int4 re-expresses its grids exactly (lossless, "
                             "float activations)")


def host_cannot_run(target: str) -> str | None:
    """Why this host cannot build and run ``target`` (None: it can)."""
    if target == "cpu":
        return None
    if target != "cpu-tvm":
        return f"{target} is never chosen automatically"
    if platform.system() != "Linux":
        return f"the cpu-tvm target builds for Linux, and this is {platform.system()}"
    try:
        importlib.import_module("tvm")
        from tvm.support.cc import get_cc
    except Exception as exc:  # ImportError, or a broken install failing inside TVM's own import
        return f"`import tvm` fails ({type(exc).__name__}; pip install 'edgedec[tvm]')"
    if get_cc() is None:
        return "no C compiler to link the TVM library with (apt-get install g++, or set CXX)"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        from .tvm_target import host_cpu_flags

        missing = [f for f in TVM_X86_FLAGS if f not in host_cpu_flags()]
        if missing:
            return f"this CPU lacks {', '.join(missing)} (the TVM kernels are written for AVX2 with FMA)"
        return None
    if machine in ("aarch64", "arm64"):
        return None  # NEON is part of ARMv8
    return f"no TVM kernels for a {platform.machine()} CPU"


def cannot_take(target: str, options, passes: tuple) -> str | None:
    """Why ``target`` refuses the other options of this compile (None: it takes them all)."""
    from . import get_target

    t = get_target(target)
    if options.kv_window is not None and not t.kv_window:
        return "it cannot run a sink + sliding window (--kv-window)"
    if options.chunk is not None and not getattr(t, "static_shapes", False):
        return "--chunk is for static-shape targets"
    specs = [(n, dict(o)) for n, o in passes]
    if options.kv != "fp32":
        specs.append(("kv-cache", {"dtype": options.kv}))
    try:
        rest = t.take_passes(specs)
        t.check_passes([n for n, _ in rest])
        for name, opts in rest:
            t.check_pass_options(name, opts)
    except EdgedecError as exc:
        return str(exc)
    finally:
        t.take_passes([])  # the target object is shared: leave it as a fresh compile expects
    return None


@dataclass(frozen=True)
class Defaults:
    """What ``compile`` decided for the options the user left out."""

    target: str
    passes: tuple  # the weight passes added (empty: float32)
    target_reason: str | None  # None when the user named the target
    weights_reason: str | None  # None when the user named the weight precision
    considered: tuple = ()  # (target, why not) for the targets passed over

    def line(self) -> str:
        """One line for stderr."""
        parts = []
        if self.target_reason:
            parts.append(f"target {self.target} ({self.target_reason})")
        if self.weights_reason:
            parts.append(("weights int4" if self.passes else "weights float32") + f" ({self.weights_reason})")
        return "defaults: " + "; ".join(parts)

    def manifest_entry(self) -> dict:
        entry: dict = {}
        if self.target_reason:
            entry["target"] = {"chosen": self.target, "auto_reason": self.target_reason,
                               "passed_over": [{"target": n, "why": w} for n, w in self.considered]}
        if self.weights_reason:
            entry["weights"] = {"passes": [n for n, _ in self.passes], "reason": self.weights_reason}
        return entry


def resolve(model: str | None, options) -> Defaults:
    """Resolve ``options.target == "auto"`` and ``options.auto_weights`` for ``model``."""
    auto_target = options.target == "auto"
    named = {n for n, _ in options.passes}
    auto_weights = options.auto_weights and not (named & set(WEIGHT_QUANT_PASSES))
    if not auto_target and not auto_weights:
        return Defaults(options.target, (), None, None)
    weights = source_weights(model) if auto_weights else SourceWeights("hf")
    if not auto_target:
        passes, why = default_weight_passes(weights, options.target)
        return Defaults(options.target, passes, None, why)
    considered = []
    kind = "int4" if auto_weights and default_weight_passes(weights, "cpu-tvm")[0] else "float"
    if not auto_weights and named & {"int4"}:
        kind = "int4"
    for name in PREFERENCE[kind]:
        passes, why_weights = default_weight_passes(weights, name) if auto_weights else ((), None)
        why_not = host_cannot_run(name) or cannot_take(name, options, tuple(options.passes) + passes)
        if why_not:
            considered.append((name, why_not))
            log.info("auto target: not %s: %s", name, why_not)
            continue
        if considered:  # a fallback: say what was passed over and why
            reason = "; ".join(f"not {n}: {w}" for n, w in considered)
        else:
            reason = f"the fastest target measured for {'int4' if kind == 'int4' else 'float32'} weights"
        return Defaults(name, passes, reason, why_weights, tuple(considered))
    raise UnsupportedError("no target this host can run takes these options: "
                           + "; ".join(f"{n}: {w}" for n, w in considered))


def confirm_lossless(defaults: Defaults, manifest_graphs: dict) -> dict | None:
    """After the build: did the default int4 re-express every weight exactly? Returns the manifest's
    ``weights.check`` (None when no default weight pass ran)."""
    if not defaults.weights_reason or not defaults.passes:
        return None
    inexact = {}
    for g in manifest_graphs.values():
        for kind, e in ((g.get("quantization") or {}).get("kinds") or {}).items():
            if e.get("max_abs_error", 0.0) != 0.0:
                inexact[kind] = e
    if inexact:
        log.warning("the default int4 did not re-express every weight exactly (%s); compile with -q none for "
                    "float32 weights", ", ".join(inexact))
        return {"exact": False, "inexact": inexact}
    return {"exact": True}

