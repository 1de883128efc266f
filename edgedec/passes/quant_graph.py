"""Finding and rewriting the weight-bearing nodes that the quantization passes work on.

The exported decoder (see :mod:`edgedec.compiler.export`) multiplies activations by float initializers
``MatMul(x, W)`` with ``W`` of shape (in, out); a tied LM head is ``MatMul(h, Transpose(E))`` where ``E``
(vocab, hidden) is also the table of the embedding ``Gather(E, input_ids)``. These helpers find those
nodes and rebuild the node list in place, keeping topological order.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from .base import PassError, PassResult

MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulInteger")
ROLE_KEY = "edgedec.role"  # node metadata: what a pass-inserted node is for
CORRECTION_ROLE = "quant_correction"  # float MatMuls that belong to a quantized weight, not weights themselves


def set_role(node: onnx.NodeProto, role: str) -> onnx.NodeProto:
    node.metadata_props.add(key=ROLE_KEY, value=role)
    return node


def role(node: onnx.NodeProto) -> str:
    return next((p.value for p in node.metadata_props if p.key == ROLE_KEY), "")


@dataclass
class WeightMatMul:
    """``MatMul(x, B)`` whose B is a float initializer, or ``Transpose`` of one (a (vocab, hidden) head)."""

    node: onnx.NodeProto
    weight: str  # the float initializer behind B
    transposed: bool = False  # B = Transpose(weight): the stored weight is (out, in)
    transpose: onnx.NodeProto | None = None
    is_head: bool = False  # its output is a graph output (the LM head)


@dataclass
class GraphIndex:
    """Lookups over ``model.graph`` taken once; rebuild after rewriting."""

    model: onnx.ModelProto
    inits: dict = field(default_factory=dict)  # name -> TensorProto
    producer: dict = field(default_factory=dict)  # tensor name -> node
    consumers: dict = field(default_factory=dict)  # tensor name -> [node]
    outputs: set = field(default_factory=set)  # graph output names

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphIndex":
        g = model.graph
        idx = cls(model, {i.name: i for i in g.initializer}, {}, {}, {o.name for o in g.output})
        for node in g.node:
            for o in node.output:
                idx.producer[o] = node
            for i in node.input:
                if i:
                    idx.consumers.setdefault(i, []).append(node)
        return idx

    def float_matrix(self, name: str) -> TensorProto | None:
        t = self.inits.get(name)
        if t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
            return t
        return None

    def array(self, name: str) -> np.ndarray:
        t = self.inits[name]
        if uses_external_data(t) and not t.raw_data:
            raise PassError(f"initializer {name} is stored as external data that was not loaded; "
                            "load the model with its weights (onnx.load(path))")
        return numpy_helper.to_array(t)


def weight_matmuls(idx: GraphIndex) -> list[WeightMatMul]:
    """Every float MatMul whose B is a 2-D float initializer or a 2-D transpose of one (except the
    block-sum corrections that quantization passes insert, marked with :data:`CORRECTION_ROLE`)."""
    found = []
    for node in idx.model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        if role(node) == CORRECTION_ROLE:
            continue
        b = node.input[1]
        head = any(o in idx.outputs for o in node.output)
        if idx.float_matrix(b) is not None:
            found.append(WeightMatMul(node, b, is_head=head))
            continue
        tr = idx.producer.get(b)
        if tr is not None and tr.op_type == "Transpose" and idx.float_matrix(tr.input[0]) is not None:
            perm = [a.ints for a in tr.attribute if a.name == "perm"]
            if not perm or list(perm[0]) == [1, 0]:
                found.append(WeightMatMul(node, tr.input[0], transposed=True, transpose=tr, is_head=head))
    return found


def embedding_gathers(idx: GraphIndex) -> list[onnx.NodeProto]:
    """Every ``Gather(table, ids)`` on axis 0 of a 2-D float initializer (an embedding lookup)."""
    found = []
    for node in idx.model.graph.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and idx.float_matrix(node.input[0]) is not None:
            axis = [a.i for a in node.attribute if a.name == "axis"]
            if not axis or axis[0] == 0:
                found.append(node)
    return found


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def rewrite_nodes(model: onnx.ModelProto, replacements: dict[str, list[onnx.NodeProto]],
                  new_inits: list[TensorProto]) -> None:
    """Replace nodes (keyed by their first output) with lists of nodes at the same position; add
    initializers; drop initializers and Transpose/Reshape nodes nothing reads any more."""
    g = model.graph
    nodes = []
    for node in g.node:
        nodes.extend(replacements.get(node.output[0], [node]) if node.output else [node])
    g.ClearField("node")
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    prune(model)


def prune(model: onnx.ModelProto) -> None:
    """Remove Transpose/Reshape nodes whose outputs nothing reads, then unread initializers."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = {n.output[0] for n in g.node
                if n.op_type in ("Transpose", "Reshape") and not any(o in used for o in n.output)}
        if not dead:
            break
        keep = [n for n in g.node if not n.output or n.output[0] not in dead]
        g.ClearField("node")
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [i for i in g.initializer if i.name in used]
    if len(keep) != len(g.initializer):
        g.ClearField("initializer")
        g.initializer.extend(keep)


def unique_name(idx: GraphIndex, base: str, taken: set) -> str:
    name, k = base, 1
    while name in idx.inits or name in idx.producer or name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on the in-memory model (contrib ops are not checked beyond their domain)."""
    from . import contrib_schemas

    contrib_schemas.register()
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise PassError(f"the rewritten graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc


class _OrtQuantizationNotes(logging.Filter):
    """Keep onnxruntime.quantization's root-logger advice (pre-processing, opset bumps) out of the
    user's console; it is demoted to edgedec's debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and "quantization" in record.pathname and record.levelno < logging.ERROR:
            logging.getLogger(__name__).debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def quiet_ort_quantization():
    root, note = logging.getLogger(), _OrtQuantizationNotes()
    root.addFilter(note)
    try:
        yield
    finally:
        root.removeFilter(note)


def has_quantized_weights(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def require_weights(name: str, model: onnx.ModelProto) -> None:
    """A weight-quantization pass needs float weight MatMuls, or a graph some pass already quantized."""
    if not weight_matmuls(GraphIndex.of(model)) and not has_quantized_weights(model):
        raise PassError(f"{name} found nothing to quantize: no MatMul whose weight is a 2-D float initializer "
                        "(or a Transpose of one), and no already-quantized MatMul")


def check_tables(name: str, before: onnx.ModelProto, result: PassResult) -> None:
    """No embedding Gather may still read a tied table the pass quantized (unless the report says why)."""
    kept = {r["weight"] for r in result.report.get("tensors", []) if r.get("gathers") == 0 and r.get("notes")}
    tables = {m.weight for m in weight_matmuls(GraphIndex.of(before)) if m.transposed or m.is_head} - kept
    still = [g.input[0] for g in embedding_gathers(GraphIndex.of(result.model)) if g.input[0] in tables]
    if still:
        raise PassError(f"{name} left a float embedding Gather on the tied table {still[0]}")
