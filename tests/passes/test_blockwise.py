"""Block-wise quantization numerics: packing, quantizers, exact GGUF grid recovery, and agreement with
ONNX Runtime's MatMulNBits / GatherBlockQuantized on the layouts we write."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from quant_graphs import OPSETS, q4_1_grid, q8_0_grid

from edgedec.passes import blockwise as bw

RNG = np.random.default_rng(7)


def _session(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=OPSETS,
                              ir_version=10)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_matmul_nbits(q: bw.BlockQuant, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    inits = [numpy_helper.from_array(q.packed_b(), "B"), numpy_helper.from_array(q.scales, "S")]
    names = ["x", "B", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.packed_zero_points(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=q.K, N=q.N, bits=q.bits,
                            block_size=q.block_size, accuracy_level=accuracy_level)
    sess = _session([node], inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape[:-1]) + [q.N])])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    q = RNG.integers(0, 1 << bits, (5, 3, 32)).astype(np.uint8)
    packed = bw.pack(q, bits)
    assert packed.shape == (5, 3, 32 * bits // 8)
    np.testing.assert_array_equal(bw.unpack(packed, bits), q)


def test_pack_puts_the_first_element_in_the_low_nibble():
    assert bw.pack(np.array([[1, 2]], np.uint8), 4).tolist() == [[0x21]]


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("K,block", [(64, 32), (96, 64), (64, 128)])  # 96/64 and 64/128 pad K
def test_rtn_matches_onnxruntime_kernel(bits, symmetric, K, block):
    w = RNG.standard_normal((K, 24)).astype(np.float32)
    q = bw.rtn(w, bits, block, symmetric)
    deq = q.dequantize()
    assert deq.shape == w.shape
    # error bound: half a step, plus one step where symmetric clips the opposite extreme
    step = np.repeat(q.scales.T, block, axis=0)[:K]
    assert (np.abs(deq - w) <= np.abs(step) * (1.0 if symmetric else 0.5) + 1e-6).all()
    x = RNG.standard_normal((1, 3, K)).astype(np.float32)
    np.testing.assert_allclose(ort_matmul_nbits(q, x), x @ deq, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["k_quant", "hqq"])
def test_other_algorithms_stay_close_and_run_on_the_kernel(algorithm):
    w = (RNG.standard_normal((64, 16)) * 0.1).astype(np.float32)
    q = bw.quantize(w, 4, 32, False, algorithm)
    err = np.abs(q.dequantize() - w)
    rtn_err = np.abs(bw.rtn(w, 4, 32, False).dequantize() - w)
    assert np.sqrt((err ** 2).mean()) < 1.2 * np.sqrt((rtn_err ** 2).mean())
    if algorithm == "hqq":  # float zero points travel as offsets: q and scales alone are not the weight
        assert q.offsets is not None and q.zero_points is None
    else:
        x = RNG.standard_normal((1, 2, 64)).astype(np.float32)
        np.testing.assert_allclose(ort_matmul_nbits(q, x), x @ q.dequantize(), rtol=1e-5, atol=1e-4)


def test_hqq_offsets_reproduce_its_float_zero_points():
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    w = (RNG.standard_normal((64, 8)) * 0.1).astype(np.float32)
    q = bw.hqq(w, 4, 32)
    ref_q, scale, zero = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=32)).quantize_internal(
        torch.from_numpy(w.T.copy()), bits=4, group_size=32)
    ref = ((ref_q.float() - zero.repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)).numpy().T
    np.testing.assert_allclose(q.dequantize(), ref, atol=1e-6)


def test_recover_q4_1_is_exact():
    w = q4_1_grid(RNG, 128, 40)
    q = bw.recover_grid(w)
    assert q is not None and q.kind == "Q4_1" and q.bits == 4 and q.block_size == 32
    assert q.offsets is not None and q.zero_points is None
    assert np.abs(q.dequantize() - w).max() <= 1e-7


def test_recover_q4_1_finds_the_step_of_blocks_without_both_extremes():
    w = q4_1_grid(RNG, 64, 16, full_range=False)
    q = bw.recover_q4_1(w)
    assert q is not None
    assert np.abs(q.dequantize() - w).max() <= 1e-7


def test_recover_q8_0_and_q4_0_are_exact():
    w8 = q8_0_grid(RNG, 64, 16)
    q8 = bw.recover_grid(w8)
    assert q8.kind == "Q8_0" and q8.bits == 8 and q8.offsets is None
    np.testing.assert_array_equal(q8.dequantize(), w8)
    d = RNG.uniform(0.01, 0.02, (2, 16)).astype(np.float16).astype(np.float32)
    qs = RNG.integers(0, 16, (2, 32, 16)).astype(np.float32)
    qs[:, 0, :] = 0  # Q4_0 maps the largest magnitude to q = 0 (-8 d)
    w4 = ((qs - 8) * d[:, None, :]).reshape(64, 16)
    q4 = bw.recover_grid(w4)
    assert q4.kind == "Q4_0" and q4.zero_points is None and q4.offsets is None
    np.testing.assert_array_equal(q4.dequantize(), w4)


def test_recovered_grids_run_exactly_on_the_kernel():
    x = RNG.standard_normal((1, 3, 64)).astype(np.float32)
    q8 = bw.recover_grid(q8_0_grid(RNG, 64, 16))
    np.testing.assert_allclose(ort_matmul_nbits(q8, x), x @ q8.dequantize(), rtol=1e-5, atol=1e-5)


def test_float_weights_are_on_no_grid():
    w = RNG.standard_normal((64, 16)).astype(np.float32)
    assert bw.recover_grid(w) is None
    assert bw.recover_grid(q8_0_grid(RNG, 64, 16), ("Q4_0", "Q4_1")) is None
    assert bw.recover_grid(RNG.standard_normal((48, 4)).astype(np.float32)) is None  # K not a multiple of 32


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_reads_the_packed_table(bits):
    """The tied embedding shares the head's packed B, reshaped to (vocab, hidden * bits / 8)."""
    table = RNG.standard_normal((20, 64)).astype(np.float32)  # (vocab, hidden)
    q = bw.rtn(table.T, bits, 32, symmetric=False)  # blocks along hidden
    inits = [numpy_helper.from_array(q.packed_b().reshape(20, -1), "D"), numpy_helper.from_array(q.scales, "S"),
             numpy_helper.from_array(q.packed_zero_points(), "Z")]
    node = helper.make_node("GatherBlockQuantized", ["D", "ids", "S", "Z"], ["e"], domain="com.microsoft", bits=bits,
                            block_size=32, gather_axis=0, quantize_axis=1)
    sess = _session([node], inits, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3, 64])])
    ids = np.array([[0, 7, 19]])
    np.testing.assert_allclose(sess.run(None, {"ids": ids})[0], q.dequantize().T[ids], atol=1e-6)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown algorithm 'gptq'"):
        bw.quantize(np.zeros((32, 2), np.float32), 4, 32, False, "gptq")
