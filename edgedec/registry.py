"""What edgedec can do, as data: passes, targets, the optional dependencies they need.

Plain tables, so ``edgedec targets list`` and ``edgedec passes list`` import nothing heavy.
"""

from __future__ import annotations

TARGETS: dict[str, dict] = {
    "cpu": {
        "module": "edgedec.targets.cpu",
        "backend": "onnxruntime",
        "description": "ONNX Runtime, CPU execution provider; in-place KV cache via GroupQueryAttention",
        "passes": ["fuse-projections"],  # required: always run first
        "requires": ["onnxruntime"],
    },
}

# name -> {"impl": "module:Class", "description": one line, "targets": [...], "requires": [packages]}
PASSES: dict[str, dict] = {
    "fuse-projections": {
        "impl": "edgedec.passes.fuse_projections:FuseProjectionsPass",
        "description": "q/k/v into one MatMul (packed GroupQueryAttention input), gate/up into one MatMul + Split",
        "targets": ["cpu"],
        "requires": [],
    },
    "int4": {
        "impl": "edgedec.passes.int4:Int4Pass",
        "description": "block-wise 4-bit weights (MatMulNBits); exact re-expression of GGUF Q4_0/Q4_1/Q8_0 sources",
        "targets": ["cpu"],
        "requires": ["onnxruntime"],
    },
    "int8": {
        "impl": "edgedec.passes.int8:Int8Pass",
        "description": "8-bit weights with int8 activations per block (MatMulNBits), or quantize_dynamic",
        "targets": ["cpu"],
        "requires": ["onnxruntime"],
    },
    "qdq": {
        "impl": "edgedec.passes.qdq:QdqPass",
        "description": "static QuantizeLinear/DequantizeLinear form for NPUs (int8 weights, 16-bit activations), "
                       "calibrated on text",
        "targets": ["cpu"],
        "requires": ["onnxruntime", "tokenizers"],
    },
}


def target_names() -> list[str]:
    return list(TARGETS)
