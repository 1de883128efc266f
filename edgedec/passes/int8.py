"""Pass ``int8``: 8-bit weights, activations quantized on the fly, for the CPU target.

Two forms:

* ``nbits`` (default): ``MatMulNBits`` with bits 8, blocks of ``block_size`` along the input dimension,
  ``accuracy_level=4``: ONNX Runtime quantizes each activation row to int8 per block of the same size
  and accumulates in int32. The tied embedding / LM head becomes one 8-bit table read by the head's
  ``MatMulNBits`` and a ``GatherBlockQuantized`` embedding (see :mod:`edgedec.passes.nbits`); a table on
  a GGUF Q8_0 grid is kept exactly.
* ``dynamic``: ONNX Runtime's ``quantize_dynamic``: int8 weights (per output channel or per tensor) in
  standard ``MatMulInteger`` with one uint8 scale for each whole activation tensor
  (``DynamicQuantizeLinear``), fused by ONNX Runtime into ``DynamicQuantizeMatMul``. Standard ONNX ops,
  but a per-tensor activation scale cannot follow an LLM's activation outliers. quantize_dynamic only
  sees MatMuls whose weight is an initializer, so a tied (transposed) head stays in float.

Measured on SmolLM2-135M (perplexity on held-out prose relative to the float32 graph; CPU time per
decoded token at 1 thread, float32 = 1.00; bundle size relative to float32): nbits block 32 symmetric
(default) 1.0045 / 0.43 / 28%, block 32 asymmetric 1.002 / 0.45 / 29%, block 64 symmetric 1.007,
block 128 symmetric 1.011 (larger blocks also coarsen the activations' int8 scales); dynamic
per-channel 1.53 / 0.56 / 41%, per-tensor 1.60. ONNX Runtime's 8-bit kernel has no fast path with
float activations (accuracy_level below 4 dequantizes the weight at every call), so the level is fixed
at 4.
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option
from .int4 import BLOCK_SIZES, SOURCE_GRID_CHOICES, source_grids
from .nbits import WeightPlan, WeightUse, quantize_weights, weight_uses
from .quant_graph import (CORRECTION_ROLE, GraphIndex, check_model, check_tables, quiet_ort_quantization,
                          require_weights, role, weight_matmuls)

log = logging.getLogger(__name__)

METHODS = ("nbits", "dynamic")
HEAD_CHOICES = ("auto", "int8", "fp32")
ACCURACY_LEVEL = 4  # int8 activations: the only level with a prepacked 8-bit kernel on CPU


@dataclass(frozen=True)
class Int8Config(PassConfig):
    method: str = option("nbits", "nbits (MatMulNBits 8-bit blocks, int8 activations per block) or dynamic "
                                  "(quantize_dynamic: MatMulInteger, one uint8 scale per activation tensor)")
    block_size: int = option(32, "nbits: weights per block along the input dimension: 16, 32, 64 or 128")
    symmetric: bool = option(True, "nbits: symmetric blocks (scale only) instead of scale + zero point")
    per_channel: bool = option(True, "dynamic: one weight scale per output channel instead of one per tensor")
    lm_head: str = option("auto", "the LM head and the embedding tied to it: auto (int8 for nbits, fp32 for "
                                  "dynamic), int8 or fp32")
    source_grid: str = option("auto", "nbits: keep weights on a GGUF Q8_0 grid exactly: auto (when the source is "
                                      "such a GGUF), always, never")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"int8.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"int8.block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                              f"got {self.block_size}")
        if self.lm_head not in HEAD_CHOICES:
            raise ConfigError(f"int8.lm_head must be one of {', '.join(HEAD_CHOICES)}, got {self.lm_head!r}")
        if self.method == "dynamic" and self.lm_head == "int8":
            raise ConfigError("int8.lm_head=int8 needs method=nbits: quantize_dynamic only quantizes MatMuls whose "
                              "weight is an initializer, and a tied head reads its table through a Transpose")
        if self.source_grid not in SOURCE_GRID_CHOICES:
            raise ConfigError(f"int8.source_grid must be one of {', '.join(SOURCE_GRID_CHOICES)}, "
                              f"got {self.source_grid!r}")

    @property
    def head(self) -> str:
        return ("int8" if self.method == "nbits" else "fp32") if self.lm_head == "auto" else self.lm_head


class Int8Pass(Pass):
    name = "int8"
    config_class = Int8Config

    def requires(self, model: onnx.ModelProto) -> None:
        require_weights(self.name, model)

    def apply(self, model: onnx.ModelProto) -> PassResult:
        if self.config.method == "dynamic":
            return self._apply_dynamic(model)
        c = self.config
        weight_format = str(self.context.source.get("weight_format", ""))
        grids = tuple(g for g in source_grids(c.source_grid, weight_format) if g == "Q8_0")

        def plan(use: WeightUse) -> WeightPlan | None:
            if use.is_table and c.head == "fp32":
                return None
            return WeightPlan(8, c.block_size, c.symmetric, "rtn", grids)

        out, records = quantize_weights(model, plan, ACCURACY_LEVEL)
        if not records:
            return PassResult(model, False, {"quantized": 0, "note": "no float weight left to quantize"})
        return PassResult(out, True, {
            "quantized": len(records),
            "settings": {**c.to_dict(), "lm_head": c.head, "accuracy_level": ACCURACY_LEVEL,
                         "source_grids": list(grids)},
            "max_abs_error": max(r["max_abs_error"] for r in records),
            "bytes_before": sum(r["bytes_before"] for r in records),
            "bytes_after": sum(r["bytes_after"] for r in records),
            "tensors": records,
        })

    def _apply_dynamic(self, model: onnx.ModelProto) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        idx = GraphIndex.of(model)
        head_float = self.config.head == "fp32"
        targets = [m for m in weight_matmuls(idx) if not m.transposed and not (m.is_head and head_float)]
        if not targets:
            return PassResult(model, False, {"quantized": 0, "note": "no float weight left to quantize"})
        # quantize_dynamic takes nodes by name: name the anonymous ones on a copy
        work = onnx.ModelProto()
        work.CopyFrom(model)
        names = set()
        for k, node in enumerate(work.graph.node):
            if not node.name or node.name in names:
                node.name = f"{node.op_type}_{k}"
            names.add(node.name)
        keep = {m.node.output[0] for m in targets}
        exclude = [n.name for n in work.graph.node if n.op_type == "MatMul" and
                   (role(n) == CORRECTION_ROLE or n.output[0] not in keep)]
        scratch = Path(self.context.work_dir) if self.context.work_dir else None
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / "int8.onnx"
            with quiet_ort_quantization():
                quantize_dynamic(work, path, weight_type=QuantType.QInt8, per_channel=self.config.per_channel,
                                 op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                                 use_external_data_format=True,
                                 extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            out = onnx.load(str(path))
        records = []
        inits = {i.name: i for i in out.graph.initializer}
        for m in targets:
            w = idx.array(m.weight)
            q, s, z = (inits.get(f"{m.weight}_{suffix}") for suffix in ("quantized", "scale", "zero_point"))
            if q is None or s is None:
                raise PassError(f"quantize_dynamic did not quantize {m.weight} as expected "
                                f"(no {m.weight}_quantized / _scale initializer)")
            zp = numpy_helper.to_array(z).astype(np.float32) if z is not None else 0.0
            deq = (numpy_helper.to_array(q).astype(np.float32) - zp) * numpy_helper.to_array(s)
            records.append({"weight": m.weight, "shape_kn": list(w.shape), "bits": 8,
                            "method": "dynamic per-channel" if self.config.per_channel else "dynamic per-tensor",
                            "bytes_before": int(w.nbytes), "bytes_after": int(w.size + np.asarray(zp).size * 5),
                            "max_abs_error": float(np.abs(deq - w).max())})
        return PassResult(out, True, {
            "quantized": len(records),
            "settings": {**self.config.to_dict(), "lm_head": self.config.head},
            "max_abs_error": max(r["max_abs_error"] for r in records),
            "tensors": records,
        })

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        if not result.modified:
            return
        idx = GraphIndex.of(result.model)
        head_float = self.config.head == "fp32"
        if self.config.method == "dynamic":
            left = [m.weight for m in weight_matmuls(idx) if not m.transposed and not (m.is_head and head_float)]
        else:
            left = [u.name for u in weight_uses(idx) if not (u.is_table and head_float)]
        if left:
            raise PassError(f"int8 left float MatMul weights that should have been quantized: {', '.join(left[:5])}")
        if self.config.method == "nbits" and not head_float:
            check_tables(self.name, before, result)
        check_model(result.model)
