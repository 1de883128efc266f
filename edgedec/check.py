"""``edgedec check BUNDLE --target npu``: validate a bundle's graphs against an NPU runtime's rules.

For every graph of the bundle and every rule set (:mod:`edgedec.targets.npu_rules`):

* **op**: each node's (domain, op type) has a builder in the execution provider (contrib ops of the
  ``com.microsoft`` domain never do);
* **static-shape**: after ONNX shape inference every graph input and output and every node output has
  a known shape with fixed dims (no ``dim_param``, no unknown dim); a tensor whose shape cannot be
  inferred (e.g. the output of an op onnx does not know) counts as dynamic;
* **rank**: no tensor above the runtime's maximum rank;
* **dtype**: graph inputs/outputs and node outputs use element types the runtime has;
* **quantized-weights** (where the runtime requires it): every MatMul/Gemm weight comes through a
  ``DequantizeLinear`` of an integer initializer.

Each violation names the graph, the node (or tensor), the op, the rule, the reason and the rule's source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .errors import BundleError, ConfigError
from .targets.npu_rules import RuleSet, rule_sets

CHECK_TARGETS = ("npu",)


@dataclass
class Violation:
    rules: str  # rule set (qnn, nnapi)
    graph: str
    node: str  # node name, or the tensor name for graph inputs/outputs
    op: str
    rule: str  # op | static-shape | rank | dtype | quantized-weights
    reason: str
    source: str


@dataclass
class CheckResult:
    bundle: str
    target: str
    rule_sets: list[str]
    graphs: dict = field(default_factory=dict)  # graph file -> {"nodes": n, "ops": {op: count}}
    violations: list[Violation] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "target": self.target, "rule_sets": self.rule_sets, "passed": self.passed,
                "graphs": self.graphs, "violations": [asdict(v) for v in self.violations]}


def _dtype(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _shape(v: onnx.ValueInfoProto) -> list | None:
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]


def check_model(model: onnx.ModelProto, graph_name: str, rules: RuleSet) -> list[Violation]:
    """Violations of ``rules`` in ``model`` (weights need not be loaded)."""
    out: list[Violation] = []

    def add(node, op, rule, reason, source):
        out.append(Violation(rules.name, graph_name, node, op, rule, reason, source))

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # an op onnx cannot type: leave those tensors unknown, report them below
        inferred = model
    g = inferred.graph
    inits = {i.name: i for i in g.initializer}
    infos = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}
    producer = {o: n for n in g.node for o in n.output}

    def check_tensor(name: str, where: str, op: str) -> None:
        v = infos.get(name)
        shape = _shape(v) if v is not None else None
        if shape is None:
            add(where, op, "static-shape", f"tensor {name}: shape unknown after shape inference",
                rules.static_shapes_source)
            return
        bad = [d for d in shape if not (isinstance(d, int) and d > 0)]
        if bad:
            add(where, op, "static-shape", f"tensor {name} has shape {shape}: dims {bad} are not fixed",
                rules.static_shapes_source)
        if len(shape) > rules.max_rank:
            add(where, op, "rank", f"tensor {name} has rank {len(shape)} > {rules.max_rank}", rules.rank_source)
        dt = _dtype(v.type.tensor_type.elem_type)
        if dt not in rules.tensor_dtypes:
            takes = ", ".join(sorted(rules.tensor_dtypes))
            add(where, op, "dtype", f"tensor {name} is {dt}; {rules.name} takes {takes}", rules.dtype_source)

    for v in g.input:
        if v.name not in inits:
            check_tensor(v.name, f"input {v.name}", "-")
    for v in g.output:
        check_tensor(v.name, f"output {v.name}", "-")
    for k, node in enumerate(g.node):
        name = node.name or f"{node.op_type}_{k}"
        domain = node.domain or "ai.onnx"
        if domain != "ai.onnx" or node.op_type not in rules.ops:
            add(name, f"{domain}:{node.op_type}" if domain != "ai.onnx" else node.op_type, "op",
                f"{rules.provider} has no builder for {domain}:{node.op_type}", rules.ops_source)
        if node.op_type in ("Constant",):
            continue
        for o in node.output:
            if o and o not in {v.name for v in g.output}:
                check_tensor(o, name, node.op_type)
        if rules.quantized_weights and node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            w = node.input[1]
            dq = producer.get(w)
            if w in inits and inits[w].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                add(name, node.op_type, "quantized-weights", f"weight {w} is a float initializer, not quantized",
                    rules.quantized_weights_source)
            elif dq is not None and dq.op_type == "Transpose" and dq.input[0] in inits:
                add(name, node.op_type, "quantized-weights", f"weight {w} is a transposed float initializer",
                    rules.quantized_weights_source)
    return out


def check_bundle(path: str | Path, target: str = "npu", rules: str = "qnn") -> CheckResult:
    """Check every graph of the bundle at ``path`` against the ``rules`` of ``target``."""
    from .runtime.bundle import Bundle

    if target not in CHECK_TARGETS:
        raise ConfigError(f"check has rules for targets {', '.join(CHECK_TARGETS)}; got {target!r}")
    sets = rule_sets(rules)
    bundle = Bundle.open(path)
    result = CheckResult(str(path), target, [r.name for r in sets])
    for entry in bundle.manifest["graphs"].values():
        file = bundle.file(entry["file"])
        try:
            model = onnx.load(str(file), load_external_data=False)
        except Exception as exc:
            raise BundleError(f"cannot read graph {entry['file']}: {exc}") from exc
        ops: dict[str, int] = {}
        for n in model.graph.node:
            key = f"{n.domain}:{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type
            ops[key] = ops.get(key, 0) + 1
        result.graphs[entry["file"]] = {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items()))}
        for r in sets:
            result.violations += check_model(model, entry["file"], r)
    return result
