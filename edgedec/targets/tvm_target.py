"""Targets ``cpu-tvm`` (Apache TVM, host CPU) and ``arm64`` (the same, cross-compiled for aarch64 Linux/Android).

TVM's Relax ONNX frontend cannot import the reference graph's GroupQueryAttention, so these targets
build a Relax module directly from the source weights (:mod:`edgedec.targets.tvm_module`), with the
same in-place KV-cache contract as the ``cpu`` bundle. No ONNX graph is exported: the pipeline writes
the weights (:meth:`TvmTarget.write_weights`), keeps the source model's logits on fixed ids, frees the
model, builds the library (:meth:`TvmTarget.build_library`) and verifies the staged bundle through the
runtime's TVM session against those logits (:mod:`edgedec.compiler.verify`; the manifest's
``verification`` and the graph entry's), when the library can run on this machine.

Bundle files:
    decoder.so   (cpu-tvm) Relax VM executable, a shared library for the host (x86_64 or aarch64)
    decoder.tar  (arm64)   the same as object files for the app's own link step (no cross linker needed);
                           plus decoder.so when ``aarch64-linux-gnu-gcc`` is installed
    params.bin   every weight as raw little-endian float32 (block-quantized: uint32 words, float16 scales),
                 C order, at the 64-byte-aligned offsets the manifest lists (``graphs.decoder.params``: name,
                 shape, dtype, offset, bytes) in call order

``-q int4`` is carried out by the target itself, on the module's weights (the ONNX int4 pass emits
MatMulNBits, which TVM does not import): projections in 4 bits and the embedding / LM head table in 8,
blocks of 32, GGUF Q4_0 / Q4_1 / Q8_0 grids re-expressed without loss (:mod:`edgedec.targets.tvm_quant`).
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

import numpy as np

from ..errors import ModelError, UnsupportedError
from ..models import gguf_blocks
from ..runtime.tvm_session import PARAM_DTYPES
from .base import Target
from .tvm_module import VERIFY_ROWS
from .tvm_quant import VNNI_FLAG

log = logging.getLogger(__name__)

ALIGN = 64
# max |logit diff| vs the source with -q int4:activations=int8: rounding the inputs moves SmolLM2-135M's
# logits by up to 3.6 on the verification ids (perplexity +1.5%); broken kernels move them by far more
INT8_ACTIVATIONS_TOLERANCE = 5.0
# max |logit diff| vs the source with --kv fp16: keys and values rounded to float16 move SmolLM2-135M's logits
# by 0.044 on the verification ids (float32 weights; logits up to ~31)
FP16_CACHE_TOLERANCE = 0.25
ORT_ONLY = "it rewrites the ONNX graph for ONNX Runtime (contrib ops / ORT-specific fusion), and the {t} " \
           "target builds its TVM module from the source weights, not from that graph"
REFUSED = {
    "fuse-projections": ORT_ONLY,
    "int8": "it emits com.microsoft MatMulNBits / DynamicQuantizeLinear, ONNX Runtime ops TVM does not "
            "import; the {t} target runs float32 weights or its own int4 (-q int4)",
    "qdq": "static QDQ is the form NPU compilers take; the {t} target builds float32 kernels from the weights",
    "fuse-norms": ORT_ONLY,
    "kv-cache": "the {t} runtime keeps a float32 or float16 cache (--kv fp32 or fp16); the int8/int4 layouts "
                "are ONNX Runtime kernels",
}
OTHER = "it is an ONNX graph pass, and the {t} target builds its TVM module from the source weights"


def _write_param(f, name: str, arr: np.ndarray, spec: tuple, offset: int) -> tuple[dict, int]:
    """Append one tensor (raw little-endian, C order) at the next 64-byte-aligned offset of ``f``, which is
    at ``offset``; returns its manifest entry and the offset after it."""
    shape, dtype = spec
    arr = np.ascontiguousarray(arr, dtype=PARAM_DTYPES[dtype])
    if arr.shape != tuple(shape):
        raise ModelError(f"weight {name} has shape {arr.shape}, the module takes {tuple(shape)}")
    pad = -offset % ALIGN
    f.write(b"\0" * pad)
    offset += pad
    f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    entry = {"name": name, "shape": list(arr.shape), "dtype": dtype, "offset": offset, "bytes": arr.nbytes}
    return entry, offset + arr.nbytes


# x86 instruction-set extensions LLVM may use for -mcpu=<this machine>; recorded so that the runtime can
# refuse, with one line, a library built for a newer CPU than the one it runs on (instead of SIGILL)
X86_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq",
             "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi")


def host_cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [x for x in X86_FLAGS if x in flags]


def host_llvm_target(num_cores: int | None = None) -> dict:
    """The LLVM target for this machine's CPU (triple and CPU name from LLVM)."""
    import os

    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple()
    arch = triple.split("-")[0]
    return {"kind": "llvm", "mtriple": f"{arch}-linux-gnu", "mcpu": codegen.llvm_get_system_cpu(),
            "num-cores": num_cores or os.cpu_count() or 1}


class TvmTarget(Target):
    backend = "tvm"
    library = "decoder.so"

    def __init__(self, name: str, description: str):
        self.name = name
        self.description = description
        self.refused_passes = {p: r.format(t=name) for p, r in REFUSED.items()}
        self._pending: dict | None = None  # what export() built, for build() to move into the bundle
        self.quant: str | None = None  # "int4": the target quantizes the module's weights itself
        self.activations = "float"  # or "int8" (-q int4:activations=int8): the quantized kernels' inputs
        self.kv_dtype = "float32"  # or "float16" (--kv fp16): the caches' element type
        self.source_gguf: str | None = None  # the source GGUF, whose own blocks int4 re-expresses exactly

    def use_source(self, source: dict) -> None:
        """The pipeline's ``SourceInfo.to_dict()``, before :meth:`export`: a GGUF source's own blocks."""
        self.source_gguf = source.get("path") if source.get("kind") == "gguf" else None

    def take_passes(self, specs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        """``int4`` (``-q int4``) is this target's own block quantization; every other pass stays for
        :meth:`check_passes` to refuse. Its one option, ``activations`` (``float``, the default, or ``int8``),
        picks the kernels of the block-quantized weights. ``kv-cache`` with ``dtype`` fp32 or fp16 (``--kv``)
        sets the caches' element type; the quantized layouts are refused."""
        # the target object is shared: every compile states its own quantization and cache
        self.quant, self.activations, self.kv_dtype, self.widen, rest = None, "float", "float32", True, []
        for name, opts in specs:
            opts = dict(opts)
            if name == "kv-cache":
                self.kv_dtype = self._take_kv(opts)
                continue
            if name != "int4":
                rest.append((name, opts))
                continue
            unknown = sorted(set(opts) - {"activations", "widen"})
            if unknown:
                raise UnsupportedError(f"target {self.name} takes int4 with two options, activations=float|int8 and "
                                       f"widen=true|false (got {', '.join(unknown)}): its kernels use 4-bit "
                                       "projections and an 8-bit embedding / head, blocks of 32, exact on GGUF "
                                       "sources (widen=true: 8 bits where the source has more than 4)")
            activations = str(opts.get("activations", "float"))
            if activations not in ("float", "int8"):
                raise UnsupportedError(f"int4 activations must be float or int8, not {activations!r}")
            why_not = self.why_no_vnni() if activations == "int8" else None
            if why_not:
                raise UnsupportedError(f"int4:activations=int8 needs AVX512-VNNI ({VNNI_FLAG}): {why_not}; "
                                       "leave activations=float")
            widen = str(opts.get("widen", "true")).lower()
            if widen not in ("true", "false"):
                raise UnsupportedError(f"int4 widen must be true or false, not {widen!r}")
            self.quant, self.activations, self.widen = "int4", activations, widen == "true"
        return rest

    def _take_kv(self, opts: dict) -> str:
        dtype = str(opts.get("dtype", "fp32"))
        if dtype not in ("fp32", "fp16") or set(opts) - {"dtype"}:
            given = ", ".join(f"{k}={v}" for k, v in opts.items()) or "no options"
            raise UnsupportedError(f"target {self.name} cannot take kv-cache ({given}): "
                                   + self.refused_passes["kv-cache"])
        return {"fp32": "float32", "fp16": "float16"}[dtype]

    def kv_cache_entry(self, arch, max_positions: int) -> dict:
        return {"dtype": "float16", "kv_dtype": "fp16"} if self.kv_dtype == "float16" else {}

    def why_no_vnni(self) -> str | None:
        """Why the library this target builds cannot use AVX512-VNNI, or None: it is built for this machine's
        CPU, so that CPU must have it."""
        return None if VNNI_FLAG in host_cpu_flags() else "this machine's CPU lacks it"

    def check_passes(self, passes: list[str]) -> None:
        """The ONNX passes rewrite a graph this target does not compile: it refuses all of them."""
        for p in passes:
            raise UnsupportedError(f"target {self.name} cannot take pass {p}: "
                                   + self.refused_passes.get(p, OTHER.format(t=self.name)))

    def llvm_target(self) -> dict:
        return host_llvm_target()

    def runs_here(self) -> bool:
        return True

    # the pipeline's hooks ---------------------------------------------------------------------
    # A TVM target builds from the weights (no ONNX graph): the pipeline calls write_weights, computes the
    # reference logits on the model it leaves, frees that model, calls build_library, stages the bundle and
    # verifies it through the runtime (edgedec.compiler.verify) within verify_tolerance.
    builds_from_weights = True

    def _check_tvm(self) -> None:
        try:
            import tvm  # noqa: F401
        except ImportError as exc:
            raise UnsupportedError(f"target {self.name} needs Apache TVM: pip install 'edgedec[tvm]' ({exc})") from exc

    def write_weights(self, hf_model, arch, out_dir: Path, max_positions: int) -> str:
        """Write ``params.bin`` (quantized with ``-q int4``) into ``out_dir`` one weight at a time, and leave
        in ``hf_model`` the weights the library computes with: each quantized weight is overwritten, in
        place, by its dequantization (no second copy of the model). Returns what the model now is, for the
        verification's ``reference``."""
        self._check_tvm()
        import torch

        from . import tvm_module

        specs = tvm_module.param_specs(arch, max_positions, self.quant)  # float16-scale defaults, refined below
        bits = tvm_module.quantized_bits(arch, max_positions, self.quant)
        # the source GGUF's exact block forms, looked up by value (an exact source may need 8 bits or float32
        # scales: each quantized weight's parts take their spec from what quantize_weights chose for it)
        blocks = gguf_blocks.exact_blocks(self.source_gguf) if bits and self.source_gguf else None
        weights = tvm_module.weights_from_hf(hf_model, arch, max_positions)  # views of the model's tensors
        tensors = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
        table, report, offset = [], {}, 0
        with open(out_dir / "params.bin", "wb") as f:
            for name in tvm_module.param_names(arch):
                w = weights.pop(name)
                if name in bits:
                    params, reference, rep = tvm_module.quantize_weights({name: w}, {name: bits[name]}, blocks,
                                                                         self.widen)
                    report.update(rep)
                    specs.update(tvm_module.quant_param_specs(name, tuple(w.shape), rep[name]["bits"],
                                                              rep[name]["scale_dtype"]))
                    with torch.no_grad():  # the model's own tensor: what the kernels compute with
                        tensors[name].copy_(torch.from_numpy(reference[name]))
                    del reference
                else:
                    params = {name: w}
                for part, arr in params.items():
                    entry, offset = _write_param(f, part, arr, specs[part], offset)
                    table.append(entry)
                del params, w
        if [e["name"] for e in table] != list(specs):
            raise ModelError("the weights written do not follow the module's parameter order")
        del blocks
        self._pending = {"table": table, "layouts": tvm_module.layouts_of(report), "kv_dtype": self.kv_dtype,
                         "quantization": quantization_entry(self.quant, report, self.activations)}
        return "transformers" + (" with the quantized weights' dequantization" if report else "")

    def build_library(self, arch, out_dir: Path, max_positions: int) -> dict:
        """Compile the Relax module into ``out_dir`` (after :meth:`write_weights`); the graph entry, whose
        ``verification`` the pipeline fills in."""
        if self._pending is None:
            raise UnsupportedError(f"target {self.name}: build_library() runs after write_weights()")
        self._check_tvm()
        import tvm

        from . import tvm_module

        pending, self._pending = self._pending, None
        target_dict = self.llvm_target()
        log.info("building the TVM module for %s", target_dict)
        executable = tvm_module.build_library(arch, max_positions, tvm.target.Target(target_dict), quant=self.quant,
                                              activations=self.activations, kv_dtype=self.kv_dtype,
                                              layouts=pending["layouts"])
        files = self.export_library(executable, out_dir)  # the one the runtime loads first
        del executable
        return self._graph_entry(files, target_dict, pending)

    def verify_tolerance(self, options) -> float:
        """The largest |logit difference| from the reference the built library may show."""
        tolerance = getattr(options, "verify_tolerance", 1e-2)
        if self.activations == "int8":  # rounding the inputs is an approximation, unlike the weights' layout
            tolerance = max(tolerance, INT8_ACTIVATIONS_TOLERANCE)
        if self.kv_dtype == "float16":  # and so is rounding the cache
            tolerance = max(tolerance, FP16_CACHE_TOLERANCE)
        return tolerance

    def skipped_verification(self) -> dict | None:
        """None when the library runs on this machine; else the manifest's record of why it was not run."""
        if self.runs_here():
            return None
        skipped = {"skipped": f"built for {self.llvm_target()['mtriple']}; this machine is {platform.machine()}"}
        log.warning("target %s: the library is not run here (%s); verification recorded as skipped",
                    self.name, skipped["skipped"])
        return skipped

    def build(self, model, out_dir: Path, role: str) -> dict:
        raise UnsupportedError(f"target {self.name} builds from the source weights (write_weights, build_library), "
                               "not from an ONNX graph")

    def _graph_entry(self, files: list[str], target_dict: dict, pending: dict) -> dict:
        return {
            "role": "decoder",
            "file": files[0],
            "data": ["params.bin", *files[1:]],
            "format": "tvm-relax-vm",
            "tvm_version": _tvm_version(),
            "llvm_target": target_dict,
            **({"cpu_flags": host_cpu_flags()} if self.name == "cpu-tvm" else {}),
            "libraries": files,
            "functions": {
                "prefill": "(input_ids int32 (1, n), logits_index int32 (m,), Shape([total]), caches, params) "
                           "-> logits float32 (1, m, vocab)",
                "decode": "(input_ids int32 (1, 1), Shape([total]), caches, params) -> logits float32 (1, 1, vocab)",
                **{f"verify{k}": f"(input_ids int32 (1, {k}), Shape([total]), caches, params) -> logits "
                                 f"float32 (1, {k}, vocab): prefill with every row's logits, static shapes"
                   for k in VERIFY_ROWS},
                "check_params": "(params) -> (): checks every weight's shape and dtype (the others do not)",
            },
            # the prefill function's signature, in the form the ONNX targets use (decode: sequence = 1, no logits_index)
            "inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "sequence"]},
                       {"name": "logits_index", "dtype": "int32", "shape": ["num_logits"]},
                       {"name": "total", "dtype": "shape", "shape": [1]},
                       {"name": "caches", "dtype": pending["kv_dtype"],
                        "shape": ["2 * num_layers", 1, "kv_heads", "capacity", "head_dim"]},
                       {"name": "params", "dtype": "float32", "shape": [len(pending["table"])]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "num_logits", "vocab"]}],
            "caches": f"tuple of 2 * num_layers {pending['kv_dtype']} (1, kv_heads, capacity, head_dim): key.0, "
                      "value.0, key.1, ...; "
                      "written in place at [total - n, total), attention over [0, total)",
            "params_file": "params.bin",
            "params_layout": "raw little-endian, C order, by each entry's dtype (float32; block-quantized: uint32 "
                             "words, float16 scales/offsets), 64-byte-"
                             "aligned offsets; linear weights (out, in); rope.cos/rope.sin (max_positions, "
                             "head_dim / 2)" + ("; W.words/W.scale/W.offset: see quantization.layout"
                                                if pending["quantization"] else ""),
            "params": pending["table"],
            **({"quantization": pending["quantization"]} if pending["quantization"] else {}),
            **({"shared_library": self.shared_library} if hasattr(self, "shared_library") else {}),
        }

    def export_library(self, executable, work: Path) -> list[str]:
        executable.export_library(str(work / self.library))
        return [self.library]

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend, "llvm_target": self.llvm_target()}


class Arm64Target(TvmTarget):
    """aarch64 Linux/Android: NEON, cross-compiled with LLVM; objects in a .tar (and a .so with a cross linker)."""

    triple = "aarch64-linux-gnu"
    cross_cc = "aarch64-linux-gnu-gcc"

    def llvm_target(self) -> dict:
        return {"kind": "llvm", "mtriple": self.triple, "mattr": ["+neon"], "num-cores": 4}

    def why_no_vnni(self) -> str | None:
        return f"target {self.name} builds for {self.triple}, and VNNI is an x86 extension"

    def runs_here(self) -> bool:
        return platform.machine() in ("aarch64", "arm64") and shutil.which("gcc") is not None

    def export_library(self, executable, work: Path) -> list[str]:
        executable.export_library(str(work / "decoder.tar"))  # object files: no linker needed
        files = ["decoder.tar"]
        self.shared_library = "decoder.so"
        if shutil.which(self.cross_cc):
            from tvm.support import cc

            try:
                executable.export_library(str(work / "decoder.so"), fcompile=cc.cross_compiler(self.cross_cc))
                files.append("decoder.so")
            except Exception as exc:  # e.g. the cross libc (libc6-dev-arm64-cross) is missing
                self.shared_library = f"not built: {self.cross_cc} failed to link ({str(exc).splitlines()[-1][:200]})"
        else:
            self.shared_library = f"not built: {self.cross_cc} not found (apt-get install gcc-aarch64-linux-gnu)"
        if "decoder.so" not in files:
            log.warning("target arm64: decoder.so %s; the bundle has decoder.tar (objects for the app to link)",
                        self.shared_library)
        if self.runs_here() and "decoder.so" not in files:
            executable.export_library(str(work / "decoder.so"))
            files.append("decoder.so")
        return sorted(files, key=lambda f: f != "decoder.so")  # what the runtime loads, first

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend, "llvm_target": self.llvm_target(),
                "note": "cross-compiled: runs with the TVM runtime on aarch64 (load decoder.so, or link decoder.tar)"}


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def quantization_entry(quant: str | None, report: dict, activations: str = "float") -> dict:
    """The graph entry's ``quantization``: scheme, layout, activations, and per kind the weights and their
    worst error."""
    if not quant:
        return {}
    kinds: dict = {}
    for name, r in report.items():
        k = kinds.setdefault(f"{r['kind']} {r['bits']}-bit", {"weights": 0, "max_abs_error": 0.0})
        k["weights"] += 1
        k["max_abs_error"] = max(k["max_abs_error"], r["max_abs_error"])
    return {
        "scheme": quant,
        "layout": "W (out, in) -> W.words uint32 (out/32, in*bits/32, 32): word [o, kw, j] holds in bits "
                  "[bits*p, bits*(p+1)) the unsigned q of W[32*o+j, (32/bits)*kw+p]; W.scale, W.offset float16, or "
                  "float32 for an exact k-quant source (the table's dtype) (out/32, in/32, 32): d and m of block (32*o+j, b); W[n, k] = d*q + m (blocks of 32 along in)",
        "activations": "float32" if activations == "float" else
                       "int8 for the block-quantized weights (4-bit projections, 8-bit head): each call "
                       "rounds its input to int8 per block of 32 "
                       "(scale max|x|/127) and multiplies in int32 (AVX512-VNNI); the offset term uses the "
                       "float32 block sum; float32 elsewhere",
        "bits": {name: r["bits"] for name, r in report.items()},
        "kinds": kinds,
        # every weight that is not its source's exact re-expression, with what it lost (a GGUF source's
        # Q6_K, which this layout's blocks of 32 cannot hold; a float source's weights, all rounded)
        "lossy": {name: {k: r[k] for k in ("kind", "max_abs_error", "source") if k in r}
                  for name, r in report.items() if r["max_abs_error"] > 0},
        "max_abs_error": max((r["max_abs_error"] for r in report.values()), default=0.0),
    }
