"""The gpu target on a machine without a GPU: the float16 graph's structure and numerics (on the CPU
provider), the manifest, and the runtime's one-line refusal when CUDA is not available."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgedec.errors import BundleError, UnsupportedError
from edgedec.runtime import Engine


def test_manifest_and_float16_graph(gpu_bundle):
    m = json.loads((gpu_bundle / "manifest.json").read_text())
    assert m["target"]["execution_provider"] == "CUDAExecutionProvider"
    assert m["kv_cache"]["dtype"] == "float16" and m["kv_cache"]["device"] == "cuda"
    model = onnx.load(str(gpu_bundle / "decoder.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types["past_key.0"] == types["present_value.1"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert any(n.op_type == "GroupQueryAttention" for n in model.graph.node)


def test_float16_graph_runs_and_matches_fp32(gpu_bundle, tiny_llama_bundle):
    """The float16 graph on ONNX Runtime's CPU provider against the float32 cpu bundle."""
    m = json.loads((gpu_bundle / "manifest.json").read_text())["architecture"]
    fp16 = ort.InferenceSession(str(gpu_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(tiny_llama_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    n, cap = 12, 32
    feed = {"input_ids": np.arange(3, 3 + n, dtype=np.int64)[None], "seqlens_k": np.array([n - 1], np.int32),
            "total_sequence_length": np.array(n, np.int32), "logits_index": np.arange(n, dtype=np.int64)}
    kv = np.zeros((1, m["num_kv_heads"], cap, m["head_dim"]), np.float16)
    half = dict(feed, **{f"past_{k}.{l}": kv for l in range(m["num_layers"]) for k in ("key", "value")})
    full = dict(feed, **{f"past_{k}.{l}": kv.astype(np.float32)
                         for l in range(m["num_layers"]) for k in ("key", "value")})
    a = fp16.run(["logits"], half)[0]
    b = fp32.run(["logits"], full)[0]
    assert a.dtype == np.float32
    assert np.abs(a - b).max() < 2e-2 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build is present")
def test_missing_cuda_is_one_clear_error(gpu_bundle, cli, one_line_error):
    with pytest.raises(BundleError, match="needs CUDAExecutionProvider, which this onnxruntime does not provide"):
        Engine.load(gpu_bundle)
    one_line_error(cli("run", gpu_bundle, "--prompt", "hello", "-n", "2"), "needs CUDAExecutionProvider")


@pytest.mark.parametrize("name, match", [
    ("int8", "CPU-only"), ("qdq", "NPU exchange format"), ("int4", "MatMulNBits"),
])
def test_refused_passes(name, match, tmp_path):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    with pytest.raises(UnsupportedError, match=f"target gpu cannot take pass {name}: .*{match}"):
        compile_model("/nonexistent/model", tmp_path / "b", CompileOptions(target="gpu", passes=((name, ()),)))


def test_targets_list_shows_passes(cli):
    r = cli("targets", "list")
    assert r.exit_code == 0
    for name in ("cpu", "npu", "gpu"):
        assert name in r.stdout
    assert "qdq" in r.stdout
