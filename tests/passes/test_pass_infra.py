"""The pass contract itself: configs, creation from specs, run_passes' log and error wrapping."""

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import parser

from edgedec import registry
from edgedec.errors import ConfigError
from edgedec.passes.base import (Pass, PassConfig, PassError, PassResult, create_pass, option, parse_pass_spec,
                                 run_passes)

GRAPH = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 4] x) => (float[2, 4] y) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> {
    t = MatMul(x, w)
    z = Identity(t)
    y = Identity(z)
}
"""


@dataclass(frozen=True)
class DropIdentityConfig(PassConfig):
    keep: int = option(0, "How many Identity nodes to keep.")

    def validate(self):
        if self.keep < 0:
            raise ConfigError(f"DropIdentityConfig.keep must be >= 0, got {self.keep}")


class DropIdentityPass(Pass):
    """Bypass Identity nodes whose output is not a graph output (a small structural pass for the tests)."""

    name = "drop-identity"
    config_class = DropIdentityConfig

    def requires(self, model):
        if not any(n.op_type == "MatMul" for n in model.graph.node):
            raise PassError("no MatMul found")

    def apply(self, model):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        outputs = {o.name for o in model.graph.output}
        drop = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] not in outputs]
        drop = drop[self.config.keep:]
        for n in drop:
            for m in model.graph.node:
                for i, name in enumerate(m.input):
                    if name == n.output[0]:
                        m.input[i] = n.input[0]
            model.graph.node.remove(n)
        return PassResult(model, modified=bool(drop), report={"removed": len(drop)})

    def ensures(self, before, result):
        onnx.checker.check_model(result.model)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(registry.PASSES, "drop-identity", {
        "impl": f"{__name__}:DropIdentityPass", "description": "test pass", "targets": ["cpu"], "requires": []})


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_pass_is_structural_and_modified_is_honest(registered):
    model = parser.parse_model(GRAPH)
    p = create_pass("drop-identity")
    result = p(model)
    assert result.modified and result.report == {"removed": 1}
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Identity"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, x), run(model, x), atol=0)
    again = p(result.model)  # fixed point: nothing left to do
    assert not again.modified


def test_run_passes_logs_each_pass(registered):
    model = parser.parse_model(GRAPH)
    out, log = run_passes(model, [create_pass("drop-identity")])
    (entry,) = log
    assert entry["pass"] == "drop-identity" and entry["modified"] is True
    assert entry["config"] == {"keep": 0} and entry["bytes_after"] <= entry["bytes_before"]
    assert entry["seconds"] >= 0 and entry["report"] == {"removed": 1}


def test_failure_names_the_passes_that_ran(registered):
    model = parser.parse_model(GRAPH)
    first = create_pass("drop-identity")
    no_matmul = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    with pytest.raises(PassError, match=r"pass drop-identity \(after drop-identity, breaker\): no MatMul found"):
        run_passes(model, [first, _Breaker(no_matmul), create_pass("drop-identity")])


class _Breaker(Pass):
    name = "breaker"

    def __init__(self, replacement):
        super().__init__()
        self.replacement = replacement

    def apply(self, model):
        return PassResult(self.replacement, modified=True)


def test_config_errors_name_the_field(registered):
    with pytest.raises(ConfigError, match="keep must be >= 0"):
        create_pass("drop-identity", {"keep": -1})
    with pytest.raises(ConfigError, match="keep must be int"):
        create_pass("drop-identity", {"keep": "two"})
    with pytest.raises(ConfigError, match="has no option bogus; its options: keep"):
        create_pass("drop-identity", {"bogus": 1})
    with pytest.raises(ConfigError, match="unknown pass 'nope'; valid passes:"):
        create_pass("nope")


def test_parse_pass_spec():
    assert parse_pass_spec("int4") == ("int4", {})
    assert parse_pass_spec("int4:block_size=32,symmetric=false,ratio=0.5,algo=hqq") == (
        "int4", {"block_size": 32, "symmetric": False, "ratio": 0.5, "algo": "hqq"})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_pass_spec("int4:block_size")


def test_describe_gives_cli_help():
    (field,) = DropIdentityConfig.describe()
    assert field["name"] == "keep" and field["help"] == "How many Identity nodes to keep." and field["default"] == 0


def test_passes_show_lists_every_option_and_refuses_an_unknown_pass():
    import dataclasses

    from typer.testing import CliRunner

    from edgedec.cli import app
    from edgedec.passes.int4 import Int4Config

    r = CliRunner().invoke(app, ["passes", "show", "int4"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for f in dataclasses.fields(Int4Config):
        assert f"│ {f.name} " in r.output
    assert "│ round_offsets      │ ''      │ balanced, fast, or glob patterns" in r.output
    r = CliRunner().invoke(app, ["passes", "show", "int5"])
    assert r.exit_code == 2 and "unknown pass 'int5'; valid passes: fuse-projections" in r.output
