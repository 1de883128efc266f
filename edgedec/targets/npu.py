"""Target ``npu``: a static-shape, standard-ops, QDQ-quantized graph for NPU execution providers.

What NPU runtimes (ONNX Runtime's QNN EP for Qualcomm Hexagon, NNAPI, CoreML) need, and what this
target therefore builds:

* **static shapes**: the graph runs a fixed chunk of C tokens (``--chunk``, default 32) over a fixed cache
  of T positions (``--max-context``, default 512); see :mod:`edgedec.compiler.export_static`;
* **standard ONNX operators only**: attention spelled out with MatMul/Softmax/Concat, no
  GroupQueryAttention / MatMulNBits / SimplifiedLayerNormalization (contrib ops the NPU EPs do not take);
* **QDQ quantization** (the ``qdq`` pass, required): int8 weights, 16-bit activations by default.

The bundle has two graphs over one weight file: ``prefill.onnx`` (C tokens per call) and ``decoder.onnx``
(the same nodes declared for one token per call, see :func:`with_chunk`). The host owns the KV cache and
writes the new keys/values into it
(:mod:`edgedec.runtime.static`). ``edgedec check BUNDLE --target npu`` validates the graph against the
rule sets in :mod:`edgedec.targets.npu_rules`. On a machine without an NPU the runtime runs the same graph on
ONNX Runtime's CPU provider (logged as a fallback), which is how its numerics are checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ..errors import UnsupportedError
from .base import Target, value_info

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 32
DEFAULT_CAPACITY = 512


class NpuTarget(Target):
    name = "npu"
    backend = "onnxruntime"
    description = "static-shape QDQ graph of standard ONNX ops for NPU execution providers (QNN, NNAPI, CoreML)"
    static_shapes = True
    required_passes = ("qdq",)
    refused_passes = {
        "fuse-projections": "it packs q/k/v into GroupQueryAttention's input, a contrib op NPU runtimes lack "
                            "(the npu graph spells attention out in standard ops)",
        "int4": "it emits com.microsoft MatMulNBits, which no NPU execution provider implements; use qdq",
        "int8": "it emits com.microsoft MatMulNBits / DynamicQuantizeLinear (dynamic activation scales); "
                "NPUs need static QDQ: use qdq",
    }
    default_max_context = DEFAULT_CAPACITY
    # activation dtypes the NPU execution providers can run (QNN HTP: uint8/uint16/int8/int16 QDQ)
    activation_types = ("uint8", "uint16", "int8", "int16")

    def check_pass_options(self, name: str, options: dict) -> None:
        if name == "qdq" and options.get("lm_head") == "fp32":
            raise UnsupportedError("target npu cannot take qdq:lm_head=fp32: a float32 MatMul over the whole "
                                   "vocabulary has no quantized NPU kernel; keep lm_head=int8")
        act = options.get("activation_type")
        if name == "qdq" and act is not None and act not in self.activation_types:
            raise UnsupportedError(f"target npu cannot take qdq:activation_type={act}: NPU runtimes take "
                                   f"{', '.join(self.activation_types)}")

    @staticmethod
    def chunk_of(options) -> int:
        return getattr(options, "chunk", None) or DEFAULT_CHUNK

    def export(self, hf_model, arch, out_path: Path, max_positions: int, options=None) -> Path:
        from ..compiler.export_static import export_static_decoder

        chunk = self.chunk_of(options)
        if chunk > max_positions:
            raise UnsupportedError(f"target npu: chunk {chunk} is larger than the cache of {max_positions} positions")
        return export_static_decoder(hf_model, arch, out_path, max_positions, chunk)

    def verify(self, hf_model, graph_path: Path, arch, max_positions: int, options=None) -> dict:
        from ..compiler.export_static import verify_static_against_source

        return verify_static_against_source(hf_model, graph_path, arch, self.chunk_of(options), max_positions)

    def kv_cache_entry(self, arch, max_positions: int) -> dict:
        return {
            "layout": "per_layer_bnsh_host",
            "in_place": False,
            "static": True,
            "outputs": ["new_key.{layer}", "new_value.{layer}"],
            "note": "past_* are (1, kv_heads, T, head_dim) with T = max_capacity; the graph returns the chunk's "
                    "keys/values as new_* (1, kv_heads, C, head_dim) and the host copies the valid rows to "
                    "positions [start, start + n); attention_mask masks cache slots not yet written",
        }

    def build(self, model: onnx.ModelProto, out_dir: Path, role: str) -> dict:
        """Two graphs over one weight file: ``prefill.onnx`` (the exported chunk of C tokens) and the
        ``role`` graph (one token: the same nodes and weights re-declared for C = 1, so decoding does not
        pay for a whole chunk per token)."""
        data = "weights.data"
        onnx.save_model(model, str(out_dir / "prefill.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data, size_threshold=1024)
        prefill = onnx.load(str(out_dir / "prefill.onnx"), load_external_data=False)
        onnx.save(with_chunk(prefill, 1), str(out_dir / f"{role}.onnx"))  # weights stay in weights.data
        data_files = [data] if (out_dir / data).exists() else []
        decoder = onnx.load(str(out_dir / f"{role}.onnx"), load_external_data=False)
        return self._graph_entry(decoder, f"{role}.onnx", data_files, role)

    def extra_graphs(self, out_dir: Path) -> dict:
        """The prefill graph's manifest entry (``build`` wrote it beside the decoder graph)."""
        prefill = onnx.load(str(out_dir / "prefill.onnx"), load_external_data=False)
        data = [f for f in ("weights.data",) if (out_dir / f).exists()]
        return {"prefill": self._graph_entry(prefill, "prefill.onnx", data, "prefill")}

    @staticmethod
    def _graph_entry(model: onnx.ModelProto, file: str, data: list, role: str) -> dict:
        inputs = [value_info(v) for v in model.graph.input]
        chunk = next(i["shape"][1] for i in inputs if i["name"] == "input_ids")
        return {
            "role": role,
            "file": file,
            "data": data,
            "inputs": inputs,
            "outputs": [value_info(v) for v in model.graph.output],
            "shapes": "static",
            "chunk": chunk,
            "execution_provider": "QNNExecutionProvider",
            "fallback_execution_provider": "CPUExecutionProvider",
            "layouts": {
                "input_ids": "(1, C) int32 token ids; unused slots padded",
                "position_ids": "(1, C) int32 positions of the chunk's tokens",
                "attention_mask": "(1, 1, C, T + C) float additive mask: 0 attends, -10000 does not; "
                                  "columns [0, T) the cache, [T, T + C) the chunk",
            },
        }

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend, "execution_provider": "QNNExecutionProvider",
                "fallback_execution_provider": "CPUExecutionProvider", "shapes": "static"}


def with_chunk(model: onnx.ModelProto, chunk: int) -> onnx.ModelProto:
    """The static graph re-declared for ``chunk`` tokens per call (its reshapes use -1 for the chunk axis)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = {v.name: v.type.tensor_type.shape.dim for v in list(out.graph.input) + list(out.graph.output)}
    old = dims["input_ids"][1].dim_value
    capacity = dims["past_key.0"][2].dim_value
    dims["input_ids"][1].dim_value = dims["position_ids"][1].dim_value = chunk
    dims["attention_mask"][2].dim_value = chunk
    dims["attention_mask"][3].dim_value = capacity + chunk
    dims["logits"][1].dim_value = chunk
    for name, d in dims.items():
        if name.startswith(("new_key.", "new_value.")):
            d[2].dim_value = chunk
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    log.info("static graph re-declared from %d to %d tokens per call", old, chunk)
    return out


TARGET = NpuTarget()
