"""Source-aware quantization of k-quants and the legacy GGUF formats: exact per-block forms decoded from a
GGUF's own blocks (checked bit for bit against gguf-py's dequantization), found again from the float weights
the passes and the TVM targets see, and what each target keeps of them."""

import numpy as np
import pytest
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    dequantize,
    quantize,
)

from edgedec.models import gguf_blocks as gb

QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf-py quantizes these; the k-quants it only reads
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def random_blocks(type_name: str, rows: int, K: int, seed: int) -> np.ndarray:
    """(rows, bytes) raw blocks of ``type_name`` for a (rows, K) tensor: gguf-py's quantizer where it has one,
    else random bytes with sane float16 super-block scales (every code, sub-scale and min is valid)."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    if type_name in QUANTIZABLE:
        w = (rng.standard_normal((rows, K)) * rng.uniform(0.01, 0.2, (rows, 1))).astype(np.float32)
        return quantize(w, qtype)
    per_block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * K // per_block, size), dtype=np.uint8)
    d = lambda n: rng.uniform(1e-4, 3e-3, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    n = raw.shape[0]
    if type_name == "Q6_K":
        raw[:, 208:210] = d(n)
    else:  # d, dmin
        raw[:, 0:2], raw[:, 2:4] = d(n), d(n)
    return raw.reshape(rows, -1)


def gguf_values(raw: np.ndarray, type_name: str) -> np.ndarray:
    return dequantize(raw, GGMLQuantizationType[type_name]).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
def test_decoded_forms_are_gguf_dequantization_bit_for_bit(type_name):
    raw = random_blocks(type_name, 64, 512, seed=len(type_name) + ord(type_name[1]))
    q, scale, offset = gb.decode(raw, type_name)
    ref = gguf_values(raw, type_name)
    got = gb.reconstruct(q, scale, offset)
    assert float(np.abs(got - ref).max()) == 0.0
    assert np.array_equal(got, ref)
    block = {"Q6_K": 16}.get(type_name, 32)
    assert scale.shape == (64, 512 // block) and q.dtype == np.int8
    lo, hi = {"Q4_0": (-8, 7), "Q4_1": (0, 15), "Q5_0": (-16, 15), "Q5_1": (0, 31), "Q8_0": (-127, 127),
              "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}[type_name]
    assert lo <= q.min() and q.max() <= hi
    assert (offset is not None) == (type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))


def test_k_quant_forms_need_float32_scales():
    """d * sc of a Q4_K block is generally not a float16 value: the exact form keeps float32 scales."""
    _, scale, offset = gb.decode(random_blocks("Q4_K", 64, 512, seed=3), "Q4_K")
    assert (scale.astype(np.float16).astype(np.float32) != scale).any()
    assert (offset.astype(np.float16).astype(np.float32) != offset).any()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A GGUF with one tensor per format (rows = outputs, K = inputs), as llama.cpp lays them out."""
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    tensors = {}
    for i, type_name in enumerate(QUANTIZABLE + K_QUANTS):
        raw = random_blocks(type_name, 96, 512, seed=100 + i)
        tensors[f"blk.0.{type_name.lower()}.weight"] = (type_name, raw)
        writer.add_tensor(f"blk.0.{type_name.lower()}.weight", raw, raw_dtype=GGMLQuantizationType[type_name])
    writer.add_tensor("blk.0.norm.weight", np.ones(512, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def test_tensor_table_matches_gguf_reader(small_gguf):
    path, _ = small_gguf
    reader = GGUFReader(str(path))
    table = gb.tensor_table(path)
    assert [(n, t, list(s), o) for n, t, s, o in table] == \
        [(t.name, t.tensor_type.name, [int(x) for x in t.shape], t.data_offset) for t in reader.tensors]


def test_index_lists_every_block_quantized_row(small_gguf):
    path, tensors = small_gguf
    index = gb.exact_blocks(path)
    assert len(index) == 96 * len(tensors)  # the F32 norm is not indexed
    assert index.types() == {t: 1 for t in QUANTIZABLE + K_QUANTS}


@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
def test_lookup_is_exact_for_each_format(small_gguf, type_name):
    path, tensors = small_gguf
    index = gb.exact_blocks(path)
    _, raw = tensors[f"blk.0.{type_name.lower()}.weight"]
    w = np.ascontiguousarray(gguf_values(raw, type_name).T)  # (K, N): a MatMul weight
    form = index.lookup(w)
    assert form is not None and form.sources == {type_name: 96}
    assert float(np.abs(form.dequantize() - w).max()) == 0.0
    assert form.block == (16 if type_name == "Q6_K" else 32)
    assert form.bits == (4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    assert index.lookup_out_in(w.T) is not None


def test_lookup_finds_fused_permuted_and_mixed_weights(small_gguf):
    """q/k/v fused along N from different formats, columns permuted: one form, blocks of the smallest."""
    path, tensors = small_gguf
    index = gb.exact_blocks(path)
    parts = [gguf_values(tensors[f"blk.0.{t.lower()}.weight"][1], t) for t in ("Q4_K", "Q6_K", "Q5_0")]
    w = np.ascontiguousarray(np.concatenate(parts).T)
    perm = np.random.default_rng(0).permutation(w.shape[1])
    w = np.ascontiguousarray(w[:, perm])
    form = index.lookup(w)
    assert form is not None and form.sources == {"Q4_K": 96, "Q6_K": 96, "Q5_0": 96}
    assert form.block == 16 and form.offset is not None and form.bits == 8
    assert float(np.abs(form.dequantize() - w).max()) == 0.0


def test_lookup_reports_why_not(small_gguf):
    path, tensors = small_gguf
    index = gb.exact_blocks(path)
    w = np.ascontiguousarray(gguf_values(tensors["blk.0.q4_k.weight"][1], "Q4_K").T)
    changed = w.copy()
    changed[100, 5] = np.nextafter(changed[100, 5], np.float32(1))  # one ulp inside a column: keys still match
    form, why = index.find(changed)
    assert form is None and why == "1 of 96 columns found in the GGUF are not reproduced exactly"
    other = w.copy()
    other[0, 7] += 1.0
    assert index.find(other) == (None, "1 of 96 columns are no GGUF row")
    assert index.find(w[:256])[1] == "96 of 96 columns are no GGUF row"  # a slice along K is no row
    assert "not a 2-D float32" in index.find(w.astype(np.float64))[1]


# ---------------------------------------------------------------------------------------------------
# The TVM targets' layout (edgedec.targets.tvm_quant): blocks of 32, float16 or float32 scale and offset
# ---------------------------------------------------------------------------------------------------
def _form(small_gguf, type_name):
    path, tensors = small_gguf
    w = np.ascontiguousarray(gguf_values(tensors[f"blk.0.{type_name.lower()}.weight"][1], type_name).T)
    return gb.exact_blocks(path).lookup(w), np.ascontiguousarray(w.T)  # form, (out, in)


@pytest.mark.parametrize("type_name, bits, scale_dtype", [
    ("Q4_0", 4, "float16"), ("Q4_1", 4, "float16"), ("Q4_K", 4, "k"),
    ("Q5_0", 8, "float16"), ("Q5_1", 8, "float16"), ("Q5_K", 8, "k"), ("Q8_0", 8, "float16")])
def test_tvm_layout_holds_each_32_block_form_exactly(small_gguf, type_name, bits, scale_dtype):
    """Requested 4 bits: a 4-bit source stays 4-bit, a wider one is widened to 8 (exact); float16 scales
    where they hold the source's, the k-quants' two levels (d, sc) for their d*sc."""
    from edgedec.targets import tvm_quant

    form, w = _form(small_gguf, type_name)
    q = tvm_quant.quantize(w, 4, form)
    assert (q.kind, q.bits, q.scale_dtype) == (type_name, bits, scale_dtype)  # the source type, as the legacy grids
    assert float(np.abs(q.dequantize() - w).max()) == 0.0
    narrow = tvm_quant.quantize(w, 4, form, widen=False)  # a draft may keep 4 bits: rounded, and says why
    if bits == 8:
        assert narrow.bits == 4 and narrow.kind.startswith("rtn (") and "need more than 4 bits" in narrow.kind
        assert float(np.abs(narrow.dequantize() - w).max()) > 0


def test_tvm_layout_cannot_hold_q6_k_blocks_of_16(small_gguf):
    """Q6_K's scales change every 16 inputs; the layout's blocks are 32: rounded to 8 bits, error recorded."""
    from edgedec.targets import tvm_quant

    form, w = _form(small_gguf, "Q6_K")
    q = tvm_quant.quantize(w, 4, form)
    assert q.bits == 8 and q.kind == "rtn (Q6_K source: blocks of 16, this layout has 32)"
    err = np.abs(q.dequantize() - w).reshape(96, -1, 32).max(-1)
    step = np.abs(w).reshape(96, -1, 32).max(-1) / 128  # 8-bit rounding: half a step per block, plus the
    assert err.max() > 0 and np.median(err / step) <= 0.57  # float16 scale's rounding (128 * 2^-11 steps);
    assert (err <= 1.07 * step).all()  # a block holding both +max and -max clips one of them by a step


def _kernels(bits, scale_dtype, int8=False):
    import tvm

    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_llvm_target

    target = tvm.target.Target(host_llvm_target(2))
    build = lambda f: tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target)["main"]
    one, many = ((tvm_quant.gemv_int8_kernel, tvm_quant.gemm_int8_kernel) if int8 else
                 (tvm_quant.gemv_kernel, tvm_quant.gemm_kernel))
    return build(one(512, 96, bits, scale_dtype)), build(many(512, 96, bits, scale_dtype))


def _run_kernels(q, x, int8=False):
    """(rows, 96) from the multi-row kernel, each row checked equal to the decode kernel's bits."""
    import tvm

    one, many = _kernels(q.bits, q.scale_dtype, int8)
    args = [tvm.runtime.tensor(a) for a in (q.words, q.scale, q.offset)]
    rows = x.shape[1]
    y = tvm.runtime.tensor(np.zeros((1, rows, 96), np.float32))
    many(tvm.runtime.tensor(x), *args, y)
    for i in range(rows):
        yi = tvm.runtime.tensor(np.zeros((1, 1, 96), np.float32))
        one(tvm.runtime.tensor(x[:, i:i + 1]), *args, yi)
        np.testing.assert_array_equal(y.numpy()[0, i], yi.numpy()[0, 0])
    return y.numpy()[0]


@pytest.mark.parametrize("type_name, factors, scale_dtype", [
    ("Q4_K", True, "k"), ("Q4_K", False, "float32"), ("Q5_K", True, "k"), ("Q5_0", False, "float16")])
def test_tvm_kernels_with_source_scales_compute_the_exact_weight(small_gguf, type_name, factors, scale_dtype):
    """The decode and multi-row kernels on an exact k-quant (two levels, or float32 scales) / Q5_0 (8 bits)
    weight: numpy's product with the GGUF's dequantized weight, and each row the decode kernel's bits."""
    pytest.importorskip("tvm")
    import dataclasses

    from edgedec.targets import tvm_quant

    form, w = _form(small_gguf, type_name)
    q = tvm_quant.quantize(w, 4, form if factors else dataclasses.replace(form, factors=None))
    assert q.scale_dtype == scale_dtype and float(np.abs(q.dequantize() - w).max()) == 0.0
    x = np.random.default_rng(7).standard_normal((1, 5, 512)).astype(np.float32)
    ref = x[0].astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(_run_kernels(q, x), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("int8", [False, True])
def test_tvm_two_level_scales_give_the_float32_layouts_bits(small_gguf, int8):
    """d*sc and (-dmin)*m computed in the kernel are exact, so the two-level layout (4.6 bits per weight)
    gives the float32 layout's (6 bits) outputs bit for bit, with float and with int8 activations."""
    pytest.importorskip("tvm")
    import dataclasses

    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_cpu_flags

    if int8 and tvm_quant.VNNI_FLAG not in host_cpu_flags():
        pytest.skip("int8 activations need AVX512-VNNI")
    form, w = _form(small_gguf, "Q4_K")
    two, flat = tvm_quant.quantize(w, 4, form), tvm_quant.quantize(w, 4, dataclasses.replace(form, factors=None))
    assert (two.scale_dtype, flat.scale_dtype) == ("k", "float32")
    assert (two.scale.nbytes + two.offset.nbytes) * 8 == 2.5 * (flat.scale.nbytes + flat.offset.nbytes)  # B/block
    x = np.random.default_rng(8).standard_normal((1, 6, 512)).astype(np.float32)
    np.testing.assert_array_equal(_run_kernels(two, x, int8), _run_kernels(flat, x, int8))


def test_tvm_embedding_kernel_reads_two_level_rows(small_gguf):
    pytest.importorskip("tvm")
    import tvm

    from edgedec.targets import tvm_quant
    from edgedec.targets.tvm_target import host_llvm_target

    form, w = _form(small_gguf, "Q4_K")  # a (96, 512) table: 96 tokens of 512
    q = tvm_quant.quantize(w, 4, form)
    f = tvm_quant.embed_kernel(96, 512, 4, q.scale_dtype).with_attr("global_symbol", "main")
    embed = tvm.tirx.build(f, target=tvm.target.Target(host_llvm_target(2)))["main"]
    ids = np.array([0, 95, 17, 17], np.int32)
    out = tvm.runtime.tensor(np.zeros((1, 4, 512), np.float32))
    embed(tvm.runtime.tensor(ids), *(tvm.runtime.tensor(a) for a in (q.words, q.scale, q.offset)), out)
    np.testing.assert_array_equal(out.numpy()[0], w[ids])


# ---------------------------------------------------------------------------------------------------
# The ORT cpu target (int4 pass: MatMulNBits, 8 bits where the source has more than 4, block-sum offsets)
# ---------------------------------------------------------------------------------------------------
ORT_TYPES = ("Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_0")  # the 0.5B and 1.5B Qwen GGUFs' types, and a legacy one


def _matmul_graph(weights: dict):
    """x (1, n, 512) -> one MatMul per (512, 96) weight, each an output (through an Identity: a MatMul that
    writes a graph output is the LM head)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [n for name in weights for n in (helper.make_node("MatMul", ["x", name], [f"m.{name}"]),
                                              helper.make_node("Identity", [f"m.{name}"], [f"y.{name}"]))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 512])],
        [helper.make_tensor_value_info(f"y.{name}", TensorProto.FLOAT, [1, "n", 96]) for name in weights],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.fixture(scope="module")
def ort_case(small_gguf):
    path, tensors = small_gguf
    weights = {f"layers.0.{t.lower()}.weight": np.ascontiguousarray(
        gguf_values(tensors[f"blk.0.{t.lower()}.weight"][1], t).T) for t in ORT_TYPES}
    context = {"kind": "gguf", "path": str(path), "weight_format": ",".join(ORT_TYPES + ("F32",))}
    return _matmul_graph(weights), context


def test_int4_pass_re_expresses_k_quants_and_q5_0_exactly(ort_case):
    from edgedec.passes.base import PassContext
    from edgedec.passes.int4 import Int4Config, Int4Pass

    model, source = ort_case
    report = Int4Pass(Int4Config(), PassContext(source=source))(model).report
    records = {r["weight"].split(".")[2].upper(): r for r in report["tensors"]}
    assert {t: (r["method"], r["bits"], r["block_size"], r["max_abs_error"]) for t, r in records.items()} == {
        "Q4_K": ("exact Q4_K grid", 4, 32, 0.0), "Q6_K": ("exact Q6_K grid", 8, 16, 0.0),
        "Q5_0": ("exact Q5_0 grid", 8, 32, 0.0), "Q8_0": ("exact Q8_0 grid", 8, 32, 0.0),
        "Q4_0": ("exact Q4_0 grid", 4, 32, 0.0)}
    assert records["Q4_K"]["zero_points"] == "float (block-sum correction)"
    assert report["settings"]["source_blocks"] is True
    assert any("stored exactly in 8 bits" in n for n in report["notes"])
    # Q6_K in 8 bits reads more than its 6.56 bits per weight: the record says how much
    assert records["Q6_K"]["bytes_after"] == 96 * 512 + 96 * 32 * 4


@pytest.mark.parametrize("accuracy_level, tolerance", [(0, 2e-6), (4, 0.02)])
def test_int4_pass_k_quants_run_on_onnxruntime(ort_case, accuracy_level, tolerance):
    """Float activations: the exact weights give the float graph's outputs up to summation order; int8
    activations (the default): within their rounding."""
    from edgedec.passes.base import PassContext
    from edgedec.passes.int4 import Int4Config, Int4Pass

    model, source = ort_case
    out_model = Int4Pass(Int4Config(accuracy_level=accuracy_level, lm_head="fp32"), PassContext(source=source))(model).model
    x = np.random.default_rng(11).standard_normal((1, 3, 512)).astype(np.float32)
    for got, ref in zip(_run(out_model, x), _run(model, x)):
        assert np.abs(got - ref).max() <= tolerance * np.abs(ref).max()


def test_int4_pass_records_weights_without_a_source_form(ort_case):
    """A weight that is no GGUF row is re-rounded, and its record says why; source_grid=never reads no blocks."""
    from onnx import numpy_helper

    from edgedec.passes.base import PassContext
    from edgedec.passes.int4 import Int4Config, Int4Pass

    model, source = ort_case
    changed = type(model)()
    changed.CopyFrom(model)
    init = changed.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w[0, 3] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    report = Int4Pass(Int4Config(), PassContext(source=source))(changed).report
    rec = next(r for r in report["tensors"] if r["weight"] == init.name)
    assert rec["method"] == "rtn" and rec["source"] == "no exact source form: 1 of 96 columns are no GGUF row"
    assert rec["max_abs_error"] > 0
    assert any("1 weights had no exact form" in n for n in report["notes"])
    never = Int4Pass(Int4Config(source_grid="never"), PassContext(source=source))(model).report
    assert never["settings"]["source_blocks"] is False and set(never["by_method"]) == {"rtn"}


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_k_quant_forms_carry_their_two_levels(small_gguf, type_name):
    """d*sc and dmin*m of a k-quant form, recomputed in float32 from its two levels, are its scale and offset."""
    form, _ = _form(small_gguf, type_name)
    d, dmin, sc, m = form.factors
    assert d.shape == dmin.shape == (96, 2) and sc.shape == m.shape == (96, 16) and sc.max() < 64 and m.max() < 64
    assert np.array_equal(np.repeat(d, 8, axis=1) * sc.astype(np.float32), form.scale)
    assert np.array_equal(-(np.repeat(dmin, 8, axis=1) * m.astype(np.float32)), form.offset)
    assert np.array_equal(d.astype(np.float16).astype(np.float32), d)
    assert _form(small_gguf, "Q6_K")[0].factors is None


# ---------------------------------------------------------------------------------------------------
# End to end: a tiny Llama written as a quantized GGUF (q/k rows permuted as llama.cpp does), loaded by
# transformers, compiled for cpu (ONNX) and cpu-tvm: every projection found in the file's own blocks
# ---------------------------------------------------------------------------------------------------
E2E_TYPES = {"attn_q": "Q5_0", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q5_0", "ffn_gate": "Q5_1",
             "ffn_up": "Q4_1", "ffn_down": "Q5_0"}  # the tiny model's 64 / 128 inputs take only blocks of 32


@pytest.fixture(scope="module")
def quantized_tiny_gguf(tiny_llama_dir, tmp_path_factory):
    import importlib.util
    import sys
    from pathlib import Path

    import gguf

    spec = importlib.util.spec_from_file_location("tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)  # tests/conftest.py's GGUF writer (this folder has its own)
    sys.modules[spec.name] = conftest
    spec.loader.exec_module(conftest)

    original = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        if kind in E2E_TYPES:
            qtype = GGMLQuantizationType[E2E_TYPES[kind]]
            return original(self, name, quantize(tensor, qtype), raw_dtype=qtype)
        return original(self, name, tensor, raw_shape, raw_dtype, tensor_endianess)

    gguf.GGUFWriter.add_tensor = add_tensor
    try:
        return conftest._write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.mixed.gguf")
    finally:
        gguf.GGUFWriter.add_tensor = original


def _quant_report(bundle):
    import json

    m = json.loads((bundle / "manifest.json").read_text())
    return m


def test_tiny_quantized_gguf_compiles_exactly_for_cpu_tvm(quantized_tiny_gguf, tmp_path):
    pytest.importorskip("tvm")
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path / "tvm"
    compile_model(str(quantized_tiny_gguf), out, CompileOptions(target="cpu-tvm", passes=(("int4", {}),)))
    graph = _quant_report(out)["graphs"]["decoder"]
    q = graph["quantization"]
    kinds = {k: v for k, v in q["kinds"].items()}
    assert kinds == {"Q5_0 8-bit": {"weights": 6, "max_abs_error": 0.0},
                     "Q4_0 4-bit": {"weights": 2, "max_abs_error": 0.0},
                     "Q8_0 8-bit": {"weights": 2, "max_abs_error": 0.0},
                     "Q5_1 8-bit": {"weights": 2, "max_abs_error": 0.0},
                     "Q4_1 4-bit": {"weights": 2, "max_abs_error": 0.0},
                     "rtn 8-bit": {"weights": 1, "max_abs_error": q["kinds"]["rtn 8-bit"]["max_abs_error"]}}
    assert q["bits"]["layers.0.self_attn.q_proj.weight"] == 8  # Q5_0 widened
    assert q["kinds"]["rtn 8-bit"]["max_abs_error"] > 0  # the F32 embedding table is rounded, as before
    assert list(q["lossy"]) == ["embed_tokens.weight"]  # and is the one weight recorded as losing something
    assert q["lossy"]["embed_tokens.weight"]["source"] == "not found in the GGUF: 384 of 384 columns are no GGUF row"


def test_tiny_quantized_gguf_compiles_exactly_for_cpu(quantized_tiny_gguf, tmp_path):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path / "cpu"
    compile_model(str(quantized_tiny_gguf), out, CompileOptions(passes=(("int4", {}),)))
    log = next(p for p in _quant_report(out)["passes"] if p["pass"] == "int4")
    methods = {r["weight"].replace("layers.1.", "layers.0."): (r["method"], r["bits"], r["max_abs_error"])
               for r in log["report"]["tensors"]}
    assert methods == {  # q/k/v and gate/up fused along N: one form from several formats, in 8 bits
        "layers.0.self_attn.qkv_proj.weight": ("exact Q4_0+Q5_0+Q8_0 grid", 8, 0.0),
        "layers.0.self_attn.o_proj.weight": ("exact Q5_0 grid", 8, 0.0),
        "layers.0.mlp.gate_proj+layers.0.mlp.up_proj.weight": ("exact Q4_1+Q5_1 grid", 8, 0.0),
        "layers.0.mlp.down_proj.weight": ("exact Q5_0 grid", 8, 0.0),
        "lm_head.weight": ("rtn", 8, methods["lm_head.weight"][2])}  # the F32 tied table: no source blocks
    head = next(r for r in log["report"]["tensors"] if r["weight"] == "lm_head.weight")
    assert head["source"] == "no exact source form: 384 of 384 columns are no GGUF row"
