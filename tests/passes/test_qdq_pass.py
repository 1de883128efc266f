"""Pass qdq: static QDQ quantization calibrated on text through the decoder graph."""

import numpy as np
import onnx
import pytest
import quant_graphs as qg

from edgedec.errors import ConfigError
from edgedec.passes.base import PassContext, PassError, PassResult
from edgedec.passes.qdq import DecoderCalibrationReader, QdqConfig, QdqPass, default_calibration_text

from quant_graphs import BODY, NOTHING


@pytest.fixture(scope="module")
def context():
    return PassContext(tokenizer_json=qg.char_tokenizer_json())


@pytest.fixture(scope="module")
def result(model, context):
    return QdqPass(QdqConfig(samples=16, sequence_length=32), context)(model)


def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_structure(result):
    out = result.model
    assert result.modified
    prod = producers(out)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == BODY + 1
    for n in matmuls:  # every weight sits behind a DequantizeLinear of an int8 initializer
        dq = prod[n.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert prod[n.input[0]].op_type == "DequantizeLinear"  # and so does the activation
    gqa = next(n for n in out.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.input[3:5] == ["past_key.0", "past_value.0"]  # the KV cache is left alone
    assert not any(set(n.input) & {"present_key.0", "present_value.0"} for n in out.graph.node)
    assert qg.count(out, "Transpose") == 0  # the head reads its own transposed copy of the table
    assert qg.count(out, "Gather") == 2  # the embedding keeps the float table
    onnx.checker.check_model(out)


def test_report(result):
    report = result.report
    assert report["quantized"] == BODY + 1
    assert report["calibration"] == {"text": "pydoc_data.topics", "sequences": 16, "tokens": 512}
    assert 0 < report["nodes"]["QuantizeLinear"] < report["nodes"]["DequantizeLinear"]
    assert report["head_copies"] == ["lm_head.weight.transposed"]
    assert 0 < report["max_abs_error"] < 0.01
    assert report["settings"]["activation_type"] == "uint16"


def test_runs_on_onnxruntime_close_to_float(result, model):
    from tokenizers import Tokenizer

    # text like the calibration's: static ranges cover it (tokens the calibration never saw clip)
    ids = Tokenizer.from_str(qg.char_tokenizer_json()).encode("The with statement is used to wrap").ids[:12]
    reference, got = qg.run(model, ids), qg.run(result.model, ids)
    # A16W8: 16-bit activations with calibrated static scales, int8 per-channel weights
    assert np.abs(got[0] - reference[0]).max() < 0.02 * np.abs(reference[0]).max()
    assert (got[0].argmax(-1) == reference[0].argmax(-1)).all()
    # the embedding (exposed here as an output) is itself an activation of the q/k/v MatMuls: 16 bits
    assert np.abs(got[3] - reference[3]).max() < 1e-3 * np.abs(reference[3]).max()


def test_eight_bit_activations_and_head_fp32(model, context, reference):
    config = QdqConfig(samples=2, sequence_length=16, activation_type="uint8", lm_head="fp32", per_channel=False)
    out = QdqPass(config, context)(model).model
    assert qg.count(out, "Transpose") == 1
    head = next(n for n in out.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    assert producers(out)[head.input[1]].op_type == "Transpose"
    assert np.isfinite(qg.run(out)[0]).all()


def test_calibration_text_file(model, context, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    report = QdqPass(QdqConfig(calibration_text=str(text), samples=3, sequence_length=32), context)(model).report
    assert report["calibration"] == {"text": str(text), "sequences": 3, "tokens": 96}


def test_calibration_reader_feeds_prefill_over_an_empty_cache(model):
    reader = DecoderCalibrationReader(model, list(range(40)), samples=5, length=16)
    assert len(reader) == 2  # only two whole sequences in 40 tokens
    feed = reader.get_next()
    assert feed["input_ids"].tolist() == [list(range(16))]
    assert feed["seqlens_k"].tolist() == [15] and int(feed["total_sequence_length"]) == 16
    assert feed["past_key.0"].shape == (1, qg.KV_HEADS, 16, qg.HEAD_DIM) and not feed["past_value.0"].any()
    assert reader.get_next() is not None and reader.get_next() is None


def test_default_text_is_python_prose():
    assert "Assignment statements" in default_calibration_text()


def test_second_run_is_an_honest_no_op(result, context):
    again = QdqPass(QdqConfig(samples=2, sequence_length=16), context)(result.model)
    assert not again.modified and again.model is result.model


@pytest.mark.parametrize("options,message", [
    ({"calibration_text": "/no/such/file.txt"}, r"qdq\.calibration_text: no such file: /no/such/file\.txt"),
    ({"samples": 0}, r"qdq\.samples must be >= 1, got 0"),
    ({"sequence_length": 4}, r"qdq\.sequence_length must be in 8\.\.4096, got 4"),
    ({"calibrate_method": "mse"}, r"qdq\.calibrate_method must be one of minmax, entropy, percentile, got 'mse'"),
    ({"activation_type": "int4"}, r"qdq\.activation_type must be one of uint8, int8, uint16, int16, got 'int4'"),
    ({"weight_type": "int4"}, r"qdq\.weight_type must be one of int8, uint8, got 'int4'"),
    ({"op_types": " , "}, r"qdq\.op_types must name at least one op type"),
    ({"op_types": "MatMul,GroupQueryAttention"}, r"qdq\.op_types must not include GroupQueryAttention"),
    ({"lm_head": "int4"}, r"qdq\.lm_head must be one of int8, fp32, got 'int4'"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        QdqConfig(**options)


def test_requires_the_decoder_inputs(context):
    with pytest.raises(PassError, match=r"qdq calibrates by running the edgedec decoder graph and did not find its "
                                        r"inputs \(input_ids, seqlens_k, total_sequence_length, logits_index missing"):
        QdqPass(QdqConfig(), context)(qg.no_matmul_graph())


def test_requires_something_to_quantize(context):
    model = qg.decoder_graph()
    for node in [n for n in model.graph.node if n.op_type == "MatMul"]:
        node.op_type = "Mul"  # same inputs, no weight MatMul left
    with pytest.raises(PassError, match=f"qdq {NOTHING}"):
        QdqPass(QdqConfig(), context)(model)


def test_requires_a_tokenizer(model):
    with pytest.raises(PassError, match=r"qdq needs the model's tokenizer \(PassContext.tokenizer_json\)"):
        QdqPass(QdqConfig(), PassContext())(model)


def test_calibration_text_too_short(model, context, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short", encoding="utf-8")
    with pytest.raises(PassError, match=r"qdq calibration text .*short\.txt has 9 tokens, fewer than one "
                                        r"sequence of 128"):
        QdqPass(QdqConfig(calibration_text=str(text)), context)(model)


def test_ensures(model, result, context):
    p = QdqPass(QdqConfig(), context)
    with pytest.raises(PassError, match="qdq left float MatMul weights that should have been quantized"):
        p.ensures(model, PassResult(model, True, {}))
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    gqa = next(n for n in broken.graph.node if n.op_type == "GroupQueryAttention")
    broken.graph.node.append(onnx.helper.make_node("Identity", ["past_key.0"], ["pk"]))
    gqa.input[3] = "pk"
    with pytest.raises(PassError, match="qdq quantized the KV cache of"):
        p.ensures(model, PassResult(broken, True, {}))
