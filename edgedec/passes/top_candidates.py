"""Pass ``top-candidates``: every run also emits the most likely next tokens of each logits row.

Token Recycling learns its adjacency table from the verifier's top candidates at every position it
verifies (and at every plain step). Picked on the host, that is an ``argpartition`` over the whole
vocabulary per row: 0.41 ms per row for SmolLM2's 49,152 logits, about 5% of an int4 decode step. ONNX
Runtime's TopK does it in tens of microseconds, so the graph emits them beside the logits::

    top_candidates = TopK(logits, width, largest, sorted).indices      # (batch, rows, width) int64

The runtime reads them when the graph has this output, and picks on the host otherwise. The logits are
untouched: the verifier decides as before, so speculation stays lossless. ``edgedec compile --spec``
with a recycling drafter adds the pass on targets that take it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option
from .quant_graph import check_model

OUTPUT = "top_candidates"
LOGITS = "logits"


@dataclass(frozen=True)
class TopCandidatesConfig(PassConfig):
    width: int = option(4, "candidates per logits row (Token Recycling's table width; the runtime falls back to "
                           "the host for a drafter that wants more)")

    def validate(self) -> None:
        if not 1 <= self.width <= 64:
            raise ConfigError(f"top-candidates.width must be in 1..64, got {self.width}")


class TopCandidatesPass(Pass):
    name = "top-candidates"
    config_class = TopCandidatesConfig

    def requires(self, model: onnx.ModelProto) -> None:
        outputs = {o.name for o in model.graph.output}
        if LOGITS not in outputs:
            raise PassError("top-candidates reads the graph output `logits` and did not find it")
        if OUTPUT in outputs:
            raise PassError(f"the graph already emits {OUTPUT}")

    def apply(self, model: onnx.ModelProto) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        k = f"{OUTPUT}.k"
        g.initializer.append(numpy_helper.from_array(np.array([self.config.width], np.int64), k))
        g.node.append(helper.make_node("TopK", [LOGITS, k], [f"{OUTPUT}.values", OUTPUT], name=f"{OUTPUT}.topk",
                                       axis=-1, largest=1, sorted=1))
        logits = next(o for o in g.output if o.name == LOGITS)
        dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim][:-1]
        g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.INT64, [*dims, self.config.width]))
        return PassResult(out, True, {"output": OUTPUT, "width": self.config.width})

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        if OUTPUT not in {o.name for o in result.model.graph.output}:
            raise PassError(f"top-candidates did not add the {OUTPUT} output")
        check_model(result.model)
