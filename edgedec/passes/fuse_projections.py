"""Pass ``fuse-projections``: sibling projections that read the same activation become one MatMul.

Decoding one token is launch-bound as much as bandwidth-bound on a CPU: every node costs a kernel
launch and a thread-pool wake-up, whatever its size. Per layer the exported decoder has seven weight
MatMuls; three of them (q, k, v) read the attention norm's output and two (gate, up) read the MLP
norm's output. With ``W = [Wq | Wk | Wv]`` (concatenated along the output dimension),
``x @ W = [x @ Wq | x @ Wk | x @ Wv]`` exactly, column for column, so:

* q/k/v feeding a ``GroupQueryAttention`` become one MatMul (plus one bias Add for Qwen2) whose output
  is the op's packed-QKV ``query`` input, with ``key`` and ``value`` left empty: no Split at all.
* any other group of MatMuls on one input (gate/up) becomes one MatMul followed by a ``Split`` that
  recreates the original output names, so nothing downstream changes.

Seven MatMuls per layer become four, which also leaves a quantization pass that runs after this one
fewer (larger) weights to quantize. Structural: outputs are unchanged up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper

from .base import Pass, PassConfig, PassError, PassResult, option
from .quant_graph import GraphIndex, check_model, rewrite_nodes, unique_name, weight_matmuls


@dataclass(frozen=True)
class FuseProjectionsConfig(PassConfig):
    qkv: bool = option(True, "fuse q/k/v into one MatMul feeding GroupQueryAttention's packed-QKV input")
    siblings: bool = option(True, "fuse other MatMuls reading the same input (gate/up) into one MatMul + Split")


def _bias_after(idx: GraphIndex, name: str):
    """(Add node, bias initializer) when ``name`` is only read by ``Add(name, 1-D initializer)``."""
    users = idx.consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == "Add" and name not in idx.outputs:
        add = users[0]
        other = add.input[1] if add.input[0] == name else add.input[0]
        t = idx.inits.get(other)
        if t is not None and len(t.dims) == 1:
            return add, other
    return None, None


class FuseProjectionsPass(Pass):
    name = "fuse-projections"
    config_class = FuseProjectionsConfig

    def requires(self, model) -> None:
        if not any(n.op_type == "MatMul" for n in model.graph.node):
            raise PassError("no MatMul found: fuse-projections needs the float decoder graph "
                            "(run it before quantization)")

    def apply(self, model) -> PassResult:
        import onnx

        model = onnx.ModelProto.FromString(model.SerializeToString())
        idx = GraphIndex.of(model)
        groups: dict[str, list] = {}
        for wm in weight_matmuls(idx):
            if not wm.transposed and not wm.is_head:
                groups.setdefault(wm.node.input[0], []).append(wm)
        replacements, inits, taken = {}, [], set()
        fused = {"qkv": 0, "siblings": 0}
        for x, members in groups.items():
            if len(members) < 2:
                continue
            shapes = [tuple(idx.inits[m.weight].dims) for m in members]
            if len({s[0] for s in shapes}) != 1:
                continue
            if self.config.qkv and len(members) == 3 and self._fuse_qkv(idx, x, members, replacements, inits, taken):
                fused["qkv"] += 1
            elif self.config.siblings:
                self._fuse_siblings(idx, x, members, replacements, inits, taken)
                fused["siblings"] += 1
        if not replacements:
            return PassResult(model, modified=False, report={"fused": fused})
        rewrite_nodes(model, replacements, inits)
        return PassResult(model, modified=True, report={"fused": fused})

    def _fuse_qkv(self, idx, x, members, replacements, inits, taken) -> bool:
        by_out = {m.node.output[0]: m for m in members}
        chain = {}  # member output -> (final tensor fed onward, Add node or None, bias name)
        for out in by_out:
            add, bias = _bias_after(idx, out)
            chain[out] = (add.output[0] if add else out, add, bias)
        finals = {v[0]: out for out, v in chain.items()}
        gqas = {id(n): n for f in finals for n in idx.consumers.get(f, []) if n.op_type == "GroupQueryAttention"}
        if len(gqas) != 1:
            return False
        gqa = next(iter(gqas.values()))
        if any(gqa.input[i] not in finals for i in range(3)) or len(set(gqa.input[:3])) != 3:
            return False
        if any(len(idx.consumers.get(f, [])) != 1 for f in gqa.input[:3]):
            return False
        order = [by_out[finals[gqa.input[i]]] for i in range(3)]  # q, k, v
        biases = [chain[m.node.output[0]][2] for m in order]
        if any(biases) and not all(biases):
            return False
        w = np.concatenate([idx.array(m.weight) for m in order], axis=1)
        wname = unique_name(idx, order[0].weight.replace("q_proj", "qkv_proj"), taken)
        inits.append(numpy_helper.from_array(w, wname))
        out = unique_name(idx, f"{wname}.out", taken)
        nodes = [helper.make_node("MatMul", [x, wname], [out], name=unique_name(idx, f"{wname}.MatMul", taken))]
        if all(biases):
            b = np.concatenate([idx.array(name) for name in biases])
            bname = unique_name(idx, wname.replace(".weight", ".bias"), taken)
            inits.append(numpy_helper.from_array(b, bname))
            added = unique_name(idx, f"{bname}.out", taken)
            nodes.append(helper.make_node("Add", [out, bname], [added], name=unique_name(idx, f"{bname}.Add", taken)))
            out = added
        first = min(order, key=lambda m: list(idx.model.graph.node).index(m.node))
        replacements[first.node.output[0]] = nodes
        for m in order:
            if m is not first:
                replacements[m.node.output[0]] = []
            add = chain[m.node.output[0]][1]
            if add is not None:
                replacements[add.output[0]] = []
        gqa.input[0], gqa.input[1], gqa.input[2] = out, "", ""
        return True

    def _fuse_siblings(self, idx, x, members, replacements, inits, taken) -> None:
        nodes = list(idx.model.graph.node)
        members = sorted(members, key=lambda m: nodes.index(m.node))
        arrays = [idx.array(m.weight) for m in members]
        wname = unique_name(idx, "+".join(m.weight.removesuffix(".weight") for m in members) + ".weight", taken)
        inits.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), wname))
        sizes = unique_name(idx, f"{wname}.split", taken)
        inits.append(numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64), sizes))
        out = unique_name(idx, f"{wname}.out", taken)
        replacements[members[0].node.output[0]] = [
            helper.make_node("MatMul", [x, wname], [out], name=unique_name(idx, f"{wname}.MatMul", taken)),
            helper.make_node("Split", [out, sizes], [m.node.output[0] for m in members], axis=-1,
                             name=unique_name(idx, f"{wname}.Split", taken)),
        ]
        for m in members[1:]:
            replacements[m.node.output[0]] = []

    def ensures(self, before, result: PassResult) -> None:
        check_model(result.model)
        if result.modified:
            mm = lambda m: sum(n.op_type == "MatMul" for n in m.graph.node)
            if mm(result.model) >= mm(before):
                raise PassError("fuse-projections reported a change but the graph has as many MatMuls as before")
