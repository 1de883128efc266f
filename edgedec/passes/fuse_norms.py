"""Pass ``fuse-norms``: RMSNorm becomes ``SimplifiedLayerNormalization``, and the residual ``Add`` in
front of it joins it as ``SkipSimplifiedLayerNormalization``.

The exported RMSNorm is seven primitive ops (``x / sqrt(mean(x^2) + eps) * gamma``); ONNX Runtime fuses
them into ``SimplifiedLayerNormalization`` when it loads the graph, but it leaves the residual ``Add`` that
feeds each norm as a separate node. ``SkipSimplifiedLayerNormalization(input, skip, gamma)`` computes
``s = input + skip`` and ``RMSNorm(s) * gamma`` in one kernel and returns ``s`` as its fourth output, which
the next residual ``Add`` reads, so every layer loses two nodes' launches (the attention and the MLP
residual) and nothing else changes: the same float32 arithmetic, in the same order.

Both rewrites are ONNX Runtime's own transformer fusions (``onnxruntime.transformers``); this pass
runs them on edgedec's graph, checks that every norm was found, and reports the counts. Decoding a token
is launch-bound on a CPU once the weights are 4-bit (see the int4 pass), so 60 fewer nodes per token
on SmolLM2-135M is a measurable share.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx

from .base import Pass, PassConfig, PassError, PassResult, option
from .quant_graph import check_model, ensure_ms_opset

NORM = "SimplifiedLayerNormalization"
SKIP_NORM = "SkipSimplifiedLayerNormalization"


@dataclass(frozen=True)
class FuseNormsConfig(PassConfig):
    skip: bool = option(True, "also fuse the residual Add in front of each norm (SkipSimplifiedLayerNormalization)")


def _counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


class FuseNormsPass(Pass):
    name = "fuse-norms"
    config_class = FuseNormsConfig

    def requires(self, model: onnx.ModelProto) -> None:
        ops = _counts(model)
        if not (ops["ReduceMean"] or ops[NORM] or ops[SKIP_NORM]):
            raise PassError("no RMSNorm found (looked for ReduceMean over x^2, SimplifiedLayerNormalization or "
                            "SkipSimplifiedLayerNormalization): fuse-norms needs edgedec's decoder graph")

    def apply(self, model: onnx.ModelProto) -> PassResult:
        from onnxruntime.transformers.fusion_simplified_layernorm import (
            FusionSimplifiedLayerNormalization,
            FusionSkipSimplifiedLayerNormalization,
        )
        from onnxruntime.transformers.onnx_model import OnnxModel

        before = _counts(model)
        model = onnx.ModelProto.FromString(model.SerializeToString())
        om = OnnxModel(model)
        quiet = logging.getLogger("onnxruntime.transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the fusions log every pattern they try
        try:
            FusionSimplifiedLayerNormalization(om).apply()
            if self.config.skip:
                FusionSkipSimplifiedLayerNormalization(om).apply()
            om.prune_graph()
            om.topological_sort()  # fused nodes are appended at the end of the node list
        finally:
            quiet.setLevel(level)
        model = om.model
        ensure_ms_opset(model)
        after = _counts(model)
        report = {
            "norms": after[NORM] + after[SKIP_NORM],
            "skip_norms": after[SKIP_NORM],
            "nodes_removed": sum(before.values()) - sum(after.values()),
        }
        return PassResult(model, modified=report["nodes_removed"] > 0, report=report)

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        check_model(result.model)
        ops = _counts(result.model)
        if ops["ReduceMean"]:  # a norm the fusion did not recognise would still be seven primitive ops
            raise PassError(f"fuse-norms left {ops['ReduceMean']} RMSNorm(s) unfused (ReduceMean still in the graph)")
