"""Target ``gpu``: ONNX Runtime's CUDA execution provider, float16 weights and activations, KV cache on the device.

The graph is the cpu target's (GroupQueryAttention with rotary inside, packed q/k/v after
``fuse-projections``), converted to float16 with ``onnxruntime.transformers.float16`` so that every
MatMul, norm and the attention run in half precision. Inputs and outputs keep their roles:

    past_key.{i} / present_key.{i}   float16 (1, kv_heads, capacity, head_dim), one device buffer per layer
    logits                           float32 (1, N, vocab) (a Cast at the end; sampling stays in float32)

The bundle builds on any machine. At run time the engine opens it with ``CUDAExecutionProvider`` (and
the CPU provider for the few shape nodes ORT places there), allocates the cache with
``OrtValue.ortvalue_from_shape_and_type(..., "cuda", 0)`` and binds past and present to it, so the cache
never leaves the GPU; only the token ids go in and one row of logits comes out per step. Without a CUDA
build of onnxruntime and a GPU, loading the bundle fails with one line naming the missing provider.
``benchmarks/gpu_parity.py`` checks greedy parity against the cpu bundle and times decoding on a GPU machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .base import Target, write_onnx_graph

log = logging.getLogger(__name__)

KEEP_FLOAT32_IO = ["logits"]  # the cache is float16 end to end; only logits are handed to the host in float32


class GpuTarget(Target):
    name = "gpu"
    backend = "onnxruntime"
    description = "ONNX Runtime CUDA execution provider; float16 weights and KV cache on the device"
    required_passes = ("fuse-projections",)
    refused_passes = {
        "int4": "its MatMulNBits graph carries the cpu target's int8 head table and block-sum corrections, which "
                "the float16 conversion and the CUDA MatMulNBits kernel do not cover",
        "int8": "MatMulNBits with accuracy_level=4 (int8 activations) and quantize_dynamic's "
                "DynamicQuantizeLinear/MatMulInteger are CPU-only kernels",
        "qdq": "QDQ is the NPU exchange format; the CUDA provider would dequantize every weight at every call "
               "(use the float16 graph)",
    }

    def kv_cache_entry(self, arch, max_positions: int) -> dict:
        return {"dtype": "float16", "kv_dtype": "fp16", "device": "cuda",
                "note": "present_* are bound to the same float16 device buffer (OrtValue on cuda:0) as past_*; "
                        "the graph writes new entries at [total - new, total) and attends over [0, total)"}

    def build(self, model: onnx.ModelProto, out_dir: Path, role: str) -> dict:
        return {**write_onnx_graph(to_float16(model), out_dir, role), "precision": "float16",
                "execution_provider": "CUDAExecutionProvider"}

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend, "execution_provider": "CUDAExecutionProvider"}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph in float16 (weights, activations, KV cache inputs/outputs); logits stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnx's shape inference does not know GroupQueryAttention: the converter must not rely on it
    out = convert_float_to_float16(model, keep_io_types=KEEP_FLOAT32_IO, disable_shape_infer=True)
    left = [i.name for i in out.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]
    if left:
        log.warning("float16 conversion left %d float32 matrices (e.g. %s)", len(left), left[0])
    return out


TARGET = GpuTarget()
