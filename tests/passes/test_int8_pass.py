"""Pass int8: MatMulNBits 8-bit (default) and quantize_dynamic forms; structure, no-op, numerics, errors."""

import numpy as np
import onnx
import pytest
import quant_graphs as qg

from edgedec.errors import ConfigError
from edgedec.passes.base import PassContext, PassError, PassResult, create_pass
from edgedec.passes.int8 import Int8Config, Int8Pass

from quant_graphs import BODY, NOTHING


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_nbits_structure_and_numerics(model, reference):
    result = create_pass("int8")(model)
    out = result.model
    assert result.modified
    nbits = [{a.name: a.i for a in n.attribute} for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == BODY + 1
    assert all(a["bits"] == 8 and a["block_size"] == 32 and a["accuracy_level"] == 4 for a in nbits)
    assert qg.count(out, "MatMul") == 0 and qg.count(out, "GatherBlockQuantized") == 1
    assert not any(i.name.endswith(".zero_points") for i in out.graph.initializer)  # symmetric by default
    onnx.checker.check_model(out)
    got = qg.run(out)
    assert rel_err(got[0], reference[0]) < 0.02
    assert rel_err(got[3], reference[3]) < 0.01
    report = result.report
    assert report["quantized"] == BODY + 1 and report["settings"]["lm_head"] == "int8"
    assert 0 < report["max_abs_error"] < 0.01
    assert {t["bits"] for t in report["tensors"]} == {8}


def test_nbits_asymmetric_and_head_fp32(model, reference):
    out = create_pass("int8", {"symmetric": False, "lm_head": "fp32", "block_size": 64})(model).model
    assert qg.count(out, "MatMulNBits") == BODY and qg.count(out, "Transpose") == 1
    assert any(i.name.endswith(".zero_points") for i in out.graph.initializer)
    got = qg.run(out)
    assert rel_err(got[0], reference[0]) < 0.02
    np.testing.assert_array_equal(got[3], reference[3])


def test_q8_0_table_is_kept_exactly():
    w = qg.decoder_weights(seed=4, grid="q4_1")
    model = qg.decoder_graph(w, expose_embedding=True)
    ctx = PassContext(source={"weight_format": "F32,Q4_1,Q8_0"})
    result = Int8Pass(Int8Config(), ctx)(model)
    tensors = {t["weight"]: t for t in result.report["tensors"]}
    assert tensors["lm_head.weight"]["method"] == "exact Q8_0 grid" and tensors["lm_head.weight"]["max_abs_error"] == 0
    assert result.report["settings"]["source_grids"] == ["Q8_0"]
    np.testing.assert_array_equal(qg.run(result.model)[3], qg.run(model)[3])


def test_second_run_is_an_honest_no_op(model):
    once = create_pass("int8")(model).model
    again = create_pass("int8")(once)
    assert not again.modified and again.model is once and again.report["quantized"] == 0
    # nor does int4 find anything left to do after int8, or int8 after int4
    assert not create_pass("int4")(once).modified
    assert not create_pass("int8")(create_pass("int4")(model).model).modified


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_form(model, reference, per_channel):
    result = create_pass("int8", {"method": "dynamic", "per_channel": per_channel})(model)
    out = result.model
    ops = {n.op_type for n in out.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert qg.count(out, "Transpose") == 1  # quantize_dynamic leaves the tied head in float
    assert result.report["settings"]["lm_head"] == "fp32" and result.report["quantized"] == BODY
    assert 0 < result.report["max_abs_error"] < 0.01
    got = qg.run(out)
    # one uint8 scale per activation tensor: looser than the block-wise form
    assert rel_err(got[0], reference[0]) < 0.1
    np.testing.assert_array_equal(got[3], reference[3])
    again = create_pass("int8", {"method": "dynamic"})(out)
    assert not again.modified


@pytest.mark.parametrize("options,message", [
    ({"method": "static"}, r"int8\.method must be one of nbits, dynamic, got 'static'"),
    ({"block_size": 8}, r"int8\.block_size must be one of 16, 32, 64, 128, got 8"),
    ({"lm_head": "int4"}, r"int8\.lm_head must be one of auto, int8, fp32, got 'int4'"),
    ({"method": "dynamic", "lm_head": "int8"}, r"int8\.lm_head=int8 needs method=nbits"),
    ({"source_grid": "maybe"}, r"int8\.source_grid must be one of auto, always, never, got 'maybe'"),
    ({"symmetric": 1}, r"Int8Config\.symmetric must be bool"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        create_pass("int8", options)


def test_requires_says_what_it_looked_for():
    with pytest.raises(PassError, match=f"int8 {NOTHING}"):
        create_pass("int8")(qg.no_matmul_graph())


def test_ensures_catches_float_weights_left_behind(model):
    with pytest.raises(PassError, match="int8 left float MatMul weights that should have been quantized"):
        create_pass("int8").ensures(model, PassResult(model, True, {}))
    with pytest.raises(PassError, match="int8 left float MatMul weights that should have been quantized"):
        create_pass("int8", {"method": "dynamic"}).ensures(model, PassResult(model, True, {}))
