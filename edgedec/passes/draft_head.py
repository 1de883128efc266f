"""Pass ``draft-head``: a trained draft head with a trimmed vocabulary, fused into the verifier's graph.

At every position the graph computes logits for, it also emits ``draft_tokens`` (batch, rows) int64: the
head's guess for the token after the one the verifier picks there (:class:`DraftHead` below is the head
and its file; :mod:`edgedec.draft_head` is how ``edgedec calibrate draft-head`` trains it and chooses the
kept vocabulary K)::

    pick  = ArgMax(logits)                                  # (1, rows): the verifier's greedy token
    e     = embedding(pick)                                  # the graph's own embedding op, re-used
    z     = h + silu([h ; e] @ W1 + b1) @ W2                 # h: the final-normed hidden state of the head
    draft = id_map[ArgMax(z @ E_kept^T)]                     # K kept rows of the tied head, not V

So one verification run returns, besides the logits the runtime checks drafts against, the first draft
token of the next round: no separate draft pass, no host work beyond reading one int64 per position
(the fused draft-verify step). The verifier's own head is untouched, which keeps speculation lossless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option
from .quant_graph import check_model

OUTPUT = "draft_tokens"

FORMAT = "edgedec-draft-head"
FORMAT_VERSION = 1


@dataclass
class DraftHead:
    w1: np.ndarray  # (2 * hidden, hidden) float32: [h ; emb] -> hidden
    b1: np.ndarray  # (hidden,)
    w2: np.ndarray  # (hidden, hidden)
    id_map: np.ndarray  # (K,) int64: kept row -> token id, most frequent first
    table: np.ndarray  # (K, hidden) float32: the tied head's rows for the kept tokens
    stats: dict  # coverage, agreement, K search, training figures

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, w1=self.w1, b1=self.b1, w2=self.w2, id_map=self.id_map, table=self.table,
                 meta=np.frombuffer(_json_bytes({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "stats": self.stats}), np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "DraftHead":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"draft head file {path} does not exist (make one with `edgedec calibrate draft-head`)")
        try:
            z = np.load(path)
            meta = json.loads(z["meta"].tobytes().decode())
            head = cls(z["w1"], z["b1"], z["w2"], z["id_map"], z["table"], meta.get("stats", {}))
        except Exception as exc:
            raise ConfigError(f"{path} is not an edgedec draft head: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{path} is not an edgedec draft head of version {FORMAT_VERSION}")
        h = head.w2.shape[0]
        if head.w1.shape != (2 * h, h) or head.b1.shape != (h,) or head.table.shape != (len(head.id_map), h):
            raise ConfigError(f"{path}: inconsistent draft head shapes")
        return head

    def trimmed(self, k: int) -> "DraftHead":
        return DraftHead(self.w1, self.b1, self.w2, self.id_map[:k], self.table[:k], dict(self.stats, k=k))


def _json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


@dataclass(frozen=True)
class DraftHeadConfig(PassConfig):
    weights: str = option("", "the .npz written by `edgedec calibrate draft-head` (required)")
    k: int = option(0, "kept vocabulary size; 0: the K the calibration chose (VocabTrim)")

    def validate(self) -> None:
        if not self.weights:
            raise ConfigError("draft-head.weights is required: the file from `edgedec calibrate draft-head`")
        if self.k < 0:
            raise ConfigError(f"draft-head.k must be >= 0, got {self.k}")


class DraftHeadPass(Pass):
    name = "draft-head"
    config_class = DraftHeadConfig

    def _parts(self, model: onnx.ModelProto):
        nodes = list(model.graph.node)
        head = next((n for n in nodes if "logits" in n.output), None)
        embed = next((n for n in nodes if n.op_type in ("Gather", "GatherBlockQuantized")
                      and "input_ids" in n.input), None)
        return head, embed

    def requires(self, model: onnx.ModelProto) -> None:
        head, embed = self._parts(model)
        if head is None or head.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
            raise PassError("no head found: looked for a MatMul/MatMulNBits producing the graph output `logits`")
        if embed is None:
            raise PassError("no embedding found: looked for a Gather/GatherBlockQuantized reading `input_ids`")
        if any(o.name == OUTPUT for o in model.graph.output):
            raise PassError("the graph already has a draft head (output draft_tokens)")

    def apply(self, model: onnx.ModelProto) -> PassResult:
        head = DraftHead.load(self.config.weights)
        if self.config.k:
            if self.config.k > len(head.id_map):
                raise ConfigError(f"draft-head.k = {self.config.k} exceeds the {len(head.id_map)} tokens "
                                  "the head keeps")
            head = head.trimmed(self.config.k)
        model = onnx.ModelProto.FromString(model.SerializeToString())
        g = model.graph
        lm, embed = self._parts(model)
        h = lm.input[0]
        hidden = head.w2.shape[0]
        dims = {i.name: i for i in g.initializer}
        inits = [
            numpy_helper.from_array(head.w1, "draft_head.w1"),
            numpy_helper.from_array(head.b1, "draft_head.b1"),
            numpy_helper.from_array(head.w2, "draft_head.w2"),
            numpy_helper.from_array(np.ascontiguousarray(head.table.T), "draft_head.table_t"),  # (hidden, K)
            numpy_helper.from_array(head.id_map.astype(np.int64), "draft_head.id_map"),
        ]
        if any(i.name in dims for i in inits):
            raise PassError("the graph already holds draft_head.* initializers")
        e_node = onnx.NodeProto()
        e_node.CopyFrom(embed)
        e_node.name = "draft_head.embedding"
        e_node.input[list(embed.input).index("input_ids")] = "draft_head.pick"
        e_node.output[0] = "draft_head.pick_embedding"
        mk = helper.make_node
        nodes = [
            mk("ArgMax", ["logits"], ["draft_head.pick"], axis=-1, keepdims=0, name="draft_head.pick_argmax"),
            e_node,
            mk("Concat", [h, "draft_head.pick_embedding"], ["draft_head.input"], axis=-1, name="draft_head.concat"),
            mk("MatMul", ["draft_head.input", "draft_head.w1"], ["draft_head.a"], name="draft_head.w1_matmul"),
            mk("Add", ["draft_head.a", "draft_head.b1"], ["draft_head.ab"], name="draft_head.b1_add"),
            mk("Sigmoid", ["draft_head.ab"], ["draft_head.gate"], name="draft_head.sigmoid"),
            mk("Mul", ["draft_head.ab", "draft_head.gate"], ["draft_head.silu"], name="draft_head.silu"),
            mk("MatMul", ["draft_head.silu", "draft_head.w2"], ["draft_head.delta"], name="draft_head.w2_matmul"),
            mk("Add", [h, "draft_head.delta"], ["draft_head.z"], name="draft_head.residual"),
            mk("MatMul", ["draft_head.z", "draft_head.table_t"], ["draft_head.logits"], name="draft_head.head"),
            mk("ArgMax", ["draft_head.logits"], ["draft_head.row"], axis=-1, keepdims=0, name="draft_head.argmax"),
            mk("Gather", ["draft_head.id_map", "draft_head.row"], [OUTPUT], axis=0, name="draft_head.id_map_gather"),
        ]
        g.node.extend(nodes)
        g.initializer.extend(inits)
        logits_out = next(o for o in g.output if o.name == "logits")
        batch, rows = logits_out.type.tensor_type.shape.dim[0], logits_out.type.tensor_type.shape.dim[1]
        out = helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.INT64, [None, None])
        for d, src in zip(out.type.tensor_type.shape.dim, (batch, rows)):
            d.CopyFrom(src)
        g.output.append(out)
        vt = head.stats.get("vocab_trim", {})
        report = {"k": int(len(head.id_map)), "hidden": int(hidden), "coverage": vt.get("coverage"),
                  "agreement": head.stats.get("agreement"), "weights": str(self.config.weights)}
        return PassResult(model, modified=True, report=report)

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        check_model(result.model)
        if not any(o.name == OUTPUT for o in result.model.graph.output):
            raise PassError("draft-head did not add the draft_tokens output")
