"""What edgedec can do, as data: passes, targets, the optional dependencies they need.

Plain tables, so ``edgedec targets list`` and ``edgedec passes list`` import nothing heavy.
"""

from __future__ import annotations

TARGETS: dict[str, dict] = {
    "cpu": {
        "module": "edgedec.targets.cpu",
        "backend": "onnxruntime",
        "description": "ONNX Runtime, CPU execution provider; in-place KV cache via GroupQueryAttention",
        "passes": [],
        "requires": ["onnxruntime"],
    },
}

# name -> {"impl": "module:Class", "description": one line, "targets": [...], "requires": [packages]}
PASSES: dict[str, dict] = {}


def target_names() -> list[str]:
    return list(TARGETS)
