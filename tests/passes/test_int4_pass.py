"""Pass int4: structure after the pass, honest ``modified``, numerics on ONNX Runtime, the exact
re-expression of GGUF grids, and every error message."""

import numpy as np
import onnx
import pytest
import quant_graphs as qg

from edgedec.errors import ConfigError
from edgedec.passes.base import PassContext, PassError, PassResult, create_pass
from edgedec.passes.int4 import Int4Config, Int4Pass, source_grids
from quant_graphs import BODY, NOTHING

GGUF_CONTEXT = PassContext(source={"weight_format": "F32,Q4_1,Q8_0"})


@pytest.fixture(scope="module")
def gguf_model():
    return qg.decoder_graph(qg.decoder_weights(seed=1, grid="q4_1"), expose_embedding=True)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_structure_after_the_pass(model):
    result = create_pass("int4")(model)
    out = result.model
    assert result.modified
    assert qg.count(out, "MatMulNBits") == BODY + 1  # + the head
    assert qg.count(out, "MatMul") == 0 and qg.count(out, "Transpose") == 0
    assert qg.count(out, "GatherBlockQuantized") == 1 and qg.count(out, "GroupQueryAttention") == 1
    bits = {n.name: {a.name: a.i for a in n.attribute} for n in out.graph.node if n.op_type == "MatMulNBits"}
    head = [a for name, a in bits.items() if name.startswith("lm_head")]
    assert head == [{"K": 64, "N": 64, "bits": 8, "block_size": 32, "accuracy_level": 4}]
    body = [a for name, a in bits.items() if not name.startswith("lm_head")]
    assert all(a["bits"] == 4 and a["accuracy_level"] == 4 for a in body)
    names = {i.name for i in out.graph.initializer}
    assert not any(n.endswith(".weight") for n in names)  # every float weight is gone, the table included
    assert "layers.0.mlp.down_proj.weight.q4" in names and "layers.0.mlp.down_proj.weight.zero_points" in names
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    onnx.checker.check_model(out)
    # the input model is untouched
    assert qg.count(model, "MatMulNBits") == 0 and qg.count(model, "MatMul") == BODY + 1


def test_report_records_what_was_quantized(model):
    report = create_pass("int4")(model).report
    assert report["quantized"] == BODY + 1
    assert report["settings"]["block_size"] == 32 and report["settings"]["source_grids"] == []
    tensors = {t["weight"]: t for t in report["tensors"]}
    assert tensors["lm_head.weight"]["bits"] == 8 and tensors["lm_head.weight"]["gathers"] == 1
    assert tensors["layers.0.mlp.up_proj.weight"]["method"] == "rtn"
    assert 0 < report["max_abs_error"] == max(t["max_abs_error"] for t in tensors.values())
    assert report["bytes_after"] < report["bytes_before"] / 3


def test_second_run_is_an_honest_no_op(model):
    once = create_pass("int4")(model).model
    again = create_pass("int4")(once)
    assert not again.modified and again.model is once
    assert again.report["quantized"] == 0


def test_numerics_on_onnxruntime(model, reference):
    out = qg.run(create_pass("int4")(model).model)
    # random N(0, 0.15) weights, 4-bit blocks of 32 and int8 activations: a few percent of the logit range
    assert rel_err(out[0], reference[0]) < 0.15
    assert rel_err(out[3], reference[3]) < 0.01  # the embedding through the 8-bit table


@pytest.mark.parametrize("options", [
    {"block_size": 16}, {"block_size": 64}, {"block_size": 128}, {"symmetric": True},
    {"accuracy_level": 0, "lm_head": "fp32"}, {"algorithm": "k_quant"}, {"algorithm": "hqq"}, {"lm_head": "int4"},
])
def test_every_setting_runs_and_stays_close(model, reference, options):
    result = create_pass("int4", options)(model)
    out = qg.run(result.model)
    assert rel_err(out[0], reference[0]) < 0.2
    assert result.report["settings"].items() >= options.items()


def test_block_size_that_does_not_divide_the_table_falls_back_for_the_table_only(model):
    report = create_pass("int4", {"block_size": 128})(model).report
    tensors = {t["weight"]: t for t in report["tensors"]}
    assert tensors["lm_head.weight"]["block_size"] == 64
    assert "the shared table uses 64" in tensors["lm_head.weight"]["notes"][0]
    assert tensors["layers.0.mlp.down_proj.weight"]["block_size"] == 128  # K = 96 padded, not shared


def test_lm_head_fp32_keeps_the_tied_table(model, reference):
    out = create_pass("int4", {"lm_head": "fp32"})(model).model
    assert qg.count(out, "MatMulNBits") == BODY
    assert qg.count(out, "Transpose") == 1 and qg.count(out, "MatMul") == 1 and qg.count(out, "Gather") == 2
    np.testing.assert_array_equal(qg.run(out)[3], reference[3])


def test_hqq_float_zero_points_go_through_the_block_sum_correction(model, reference):
    out = create_pass("int4", {"algorithm": "hqq", "lm_head": "fp32", "accuracy_level": 0})(model).model
    corrections = [n for n in out.graph.node if n.op_type == "MatMul" and n.name.endswith("offset_matmul")]
    assert len(corrections) == BODY
    block_sums = [n for n in out.graph.node if n.name.endswith("block_sums.matmul")]
    assert len(block_sums) == 4  # shared: embedding (q, k, v), attn, h1 (gate, up), act
    assert rel_err(qg.run(out)[0], reference[0]) < 0.15


# ---------------------------------------------------------------------------------------------
# source-aware: weights on GGUF grids are re-expressed without loss
# ---------------------------------------------------------------------------------------------
def test_gguf_grids_are_reproduced_exactly(gguf_model):
    result = Int4Pass(Int4Config(), GGUF_CONTEXT)(gguf_model)
    report = result.report
    assert report["by_method"] == {"exact Q4_1 grid": BODY, "exact Q8_0 grid": 1}
    assert report["max_abs_error"] <= 1e-7
    assert report["settings"]["source_grids"] == ["Q4_1", "Q8_0"]
    assert "notes" not in report
    out = result.model
    assert qg.count(out, "MatMulNBits") == BODY + 1
    assert qg.count(out, "Add") == 2 + BODY  # residuals + one block-sum correction per Q4_1 weight


def test_gguf_grids_run_exactly_without_activation_quantization(gguf_model):
    ref = qg.run(gguf_model)
    config = Int4Config(accuracy_level=0, lm_head="fp32")
    out = qg.run(Int4Pass(config, GGUF_CONTEXT)(gguf_model).model)
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=1e-5 * np.abs(ref[0]).max())


def test_gguf_grids_with_int8_activations(gguf_model):
    ref = qg.run(gguf_model)
    out = qg.run(Int4Pass(Int4Config(), GGUF_CONTEXT)(gguf_model).model)
    np.testing.assert_array_equal(out[3], ref[3])  # the Q8_0 embedding is exact
    assert rel_err(out[0], ref[0]) < 0.02  # only the int8 activations differ


def test_q4_1_table_is_exact_for_head_and_embedding():
    w = qg.decoder_weights(seed=2, grid="q4_1")
    w["lm_head.weight"] = qg.q4_1_grid(np.random.default_rng(3), qg.HIDDEN, qg.VOCAB).T.copy()
    model = qg.decoder_graph(w, expose_embedding=True)
    ref = qg.run(model)
    result = Int4Pass(Int4Config(lm_head="int4", accuracy_level=0), GGUF_CONTEXT)(model)
    assert result.report["by_method"] == {"exact Q4_1 grid": BODY + 1}
    out = qg.run(result.model)
    np.testing.assert_allclose(out[3], ref[3], atol=1e-6)  # GatherBlockQuantized + gathered offsets
    np.testing.assert_allclose(out[0], ref[0], atol=1e-5 * np.abs(ref[0]).max())


def test_source_grid_off_requantizes(gguf_model):
    report = Int4Pass(Int4Config(source_grid="never"), GGUF_CONTEXT)(gguf_model).report
    assert report["by_method"] == {"rtn": BODY + 1} and report["max_abs_error"] > 1e-3


def test_source_grid_auto_follows_the_source_and_notes_fallbacks(gguf_model, model):
    float_source = Int4Pass(Int4Config(), PassContext(source={"weight_format": "float"}))(gguf_model).report
    assert float_source["settings"]["source_grids"] == [] and "exact Q4_1 grid" not in float_source["by_method"]
    mixed = Int4Pass(Int4Config(source_grid="always", block_size=64), PassContext())(model).report
    assert any("not on a source grid" in n for n in mixed["notes"])
    on_grid = Int4Pass(Int4Config(block_size=64), GGUF_CONTEXT)(gguf_model).report
    assert any("keep its blocks of 32" in n for n in on_grid["notes"])


def test_source_grids():
    assert source_grids("auto", "F32,Q4_1,Q8_0") == ("Q4_1", "Q8_0")
    assert source_grids("auto", "F32,Q6_K") == () and source_grids("auto", "") == ()
    assert source_grids("always", "") == ("Q4_0", "Q4_1", "Q8_0") and source_grids("never", "Q4_1") == ()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    ({"block_size": 48}, r"int4\.block_size must be one of 16, 32, 64, 128, got 48"),
    ({"accuracy_level": 5}, r"int4\.accuracy_level must be in 0\.\.4, got 5"),
    ({"algorithm": "gptq"}, r"int4\.algorithm must be one of rtn, k_quant, hqq, got 'gptq'"),
    ({"symmetric": True, "algorithm": "hqq"}, r"int4\.symmetric is only available with algorithm rtn"),
    ({"lm_head": "int2"}, r"int4\.lm_head must be one of fp32, int8, int4, got 'int2'"),
    ({"accuracy_level": 0}, r"int4\.lm_head=int8 needs accuracy_level=4"),
    ({"source_grid": "yes"}, r"int4\.source_grid must be one of auto, always, never, got 'yes'"),
    ({"block_size": "32"}, r"Int4Config\.block_size must be int"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        create_pass("int4", options)


def test_requires_says_what_it_looked_for():
    with pytest.raises(PassError, match=f"int4 {NOTHING}"):
        create_pass("int4")(qg.no_matmul_graph())


def test_ensures_catches_float_weights_left_behind(model):
    p = create_pass("int4")
    with pytest.raises(PassError, match="int4 left float MatMul weights that should have been quantized: layers.0"):
        p.ensures(model, PassResult(model, True, {}))


def test_ensures_catches_a_float_embedding_left_on_the_tied_table(model):
    p = create_pass("int4")
    body_only = create_pass("int4", {"lm_head": "fp32"})(model).model
    left = "int4 left float MatMul weights that should have been quantized"
    with pytest.raises(PassError, match=f"{left}: lm_head.weight"):
        p.ensures(model, PassResult(body_only, True, {}))
    # a head quantized but its embedding left on the float table
    out = create_pass("int4")(model).model
    gbq = next(n for n in out.graph.node if n.op_type == "GatherBlockQuantized")
    gbq.CopyFrom(onnx.helper.make_node("Gather", ["lm_head.weight", "input_ids"], list(gbq.output)))
    out.graph.initializer.append(next(i for i in model.graph.initializer if i.name == "lm_head.weight"))
    with pytest.raises(PassError, match="int4 left a float embedding Gather on the tied table lm_head.weight"):
        p.ensures(model, PassResult(out, True, {}))


def _rounded(gguf_model, patterns, text):
    context = PassContext(source={"weight_format": "F32,Q4_1,Q8_0"}, tokenizer_json=qg.char_tokenizer_json(),
                          arch={"max_position_embeddings": qg.MAX_POS})
    config = Int4Config(round_offsets=patterns, calibration_text=str(text), calibration_tokens=8 * qg.MAX_POS,
                        accuracy_level=4)
    return Int4Pass(config, context)(gguf_model)


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory):
    from edgedec.passes.qdq import default_calibration_text

    path = tmp_path_factory.mktemp("calibration") / "text.txt"
    path.write_text(default_calibration_text()[:20000], encoding="utf-8")
    return path


def test_round_offsets_drops_the_corrections_of_the_weights_it_names(gguf_model, calibration_text):
    exact = Int4Pass(Int4Config(), GGUF_CONTEXT)(gguf_model)
    result = _rounded(gguf_model, "*o_proj*, *down_proj*", calibration_text)
    report = result.report
    assert report["by_method"] == {"exact Q4_1 grid": BODY - 2, "Q4_1 rounded zero point": 2, "exact Q8_0 grid": 1}
    assert report["calibration"] == {"text": str(calibration_text), "tokens": 8 * qg.MAX_POS, "weights": 2}
    rounded = [t for t in report["tensors"] if t["method"] == "Q4_1 rounded zero point"]
    assert all(t["bias_correction"] == "1 of 1 MatMuls" and t["max_abs_error"] > 0 for t in rounded)
    # o and down lose their block sums, corrections and Adds; q/k/v and gate/up keep theirs
    assert qg.count(exact.model, "Add") - qg.count(result.model, "Add") == 2
    assert qg.count(exact.model, "MatMul") - qg.count(result.model, "MatMul") == 4
    biased = [n for n in result.model.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6]
    assert sorted(n.input[0] for n in biased) == ["act", "attn"] and all(n.input[4] == "" for n in biased)


def test_round_offsets_bias_cancels_the_mean_shift_on_calibration_text(gguf_model, calibration_text):
    """The o projection's output, over the calibration text: rounding shifts it; the bias takes the mean
    shift back out (same input activation in every graph: attention precedes the first rounded weight)."""
    from edgedec.passes.int4 import activation_means
    from edgedec.passes.nbits import quantize_weights
    from edgedec.passes.qdq import calibration_token_ids

    ids, _ = calibration_token_ids("t", str(calibration_text), qg.char_tokenizer_json(), qg.MAX_POS)
    ids = ids[:8 * qg.MAX_POS]
    exact = Int4Pass(Int4Config(accuracy_level=0, lm_head="fp32"), GGUF_CONTEXT)(gguf_model).model
    config = Int4Config(accuracy_level=0, lm_head="fp32", round_offsets="*o_proj*")
    plan = Int4Pass(config, GGUF_CONTEXT)._plan(("Q4_1", "Q8_0"))
    means = activation_means(gguf_model, ["attn"], ids, qg.MAX_POS)
    with_bias, _ = quantize_weights(gguf_model, plan, 0, means)
    without, _ = quantize_weights(gguf_model, plan, 0, {})
    o = {name: activation_means(m, ["o"], ids, qg.MAX_POS)["o"]
         for name, m in (("exact", exact), ("bias", with_bias), ("none", without))}
    shift = np.abs(o["none"] - o["exact"]).max()
    assert shift > 1e-3 * np.abs(o["exact"]).max()
    assert np.abs(o["bias"] - o["exact"]).max() < 1e-3 * shift


def test_round_offsets_that_match_nothing_are_an_error(gguf_model, calibration_text):
    with pytest.raises(PassError, match=r"int4.round_offsets: 'balance' matches no weight \(presets: balanced, "
                                        r"fast; weight names look like layers.0.self_attn.q_proj.weight\)"):
        _rounded(gguf_model, "*o_proj* balance", calibration_text)


@pytest.mark.parametrize("preset, rounded", [
    ("balanced", {"layers.0.self_attn.o_proj.weight", "layers.29.self_attn.o_proj.weight",
                  "layers.5.mlp.down_proj.weight", "layers.24.mlp.down_proj.weight"}),
    ("fast", {"layers.0.self_attn.o_proj.weight", "layers.29.self_attn.o_proj.weight",
              "layers.5.mlp.down_proj.weight", "layers.24.mlp.down_proj.weight",
              "layers.5.mlp.gate_proj+layers.5.mlp.up_proj.weight", "layers.24.mlp.up_proj.weight"}),
])
def test_round_offsets_presets_spare_qkv_and_the_edge_layers(preset, rounded):
    from edgedec.passes.nbits import WeightUse

    names = ["layers.0.self_attn.o_proj.weight", "layers.29.self_attn.o_proj.weight",
             "layers.4.mlp.down_proj.weight", "layers.5.mlp.down_proj.weight", "layers.24.mlp.down_proj.weight",
             "layers.25.mlp.down_proj.weight", "layers.5.mlp.gate_proj+layers.5.mlp.up_proj.weight",
             "layers.24.mlp.up_proj.weight", "layers.4.mlp.gate_proj.weight", "layers.12.self_attn.qkv_proj.weight"]
    p = Int4Pass(Int4Config(round_offsets=preset), GGUF_CONTEXT)
    p._layers = 30
    assert {n for n in names if p._rounded(WeightUse(n, [], [], 64, 64))} == rounded


def test_round_offsets_preset_on_the_one_layer_graph(gguf_model, calibration_text):
    report = _rounded(gguf_model, "fast", calibration_text).report  # one layer: it is the middle
    assert report["by_method"]["Q4_1 rounded zero point"] == 4  # o, gate, up, down; q/k/v stay exact
