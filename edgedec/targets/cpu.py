"""Target ``cpu``: ONNX Runtime's CPU execution provider.

The decoder graph is saved as ONNX with its weights in one external-data file beside it. The runtime
binds the KV cache through IOBinding (past and present share one buffer per layer), so decoding never
copies or concatenates the cache.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .base import Target, write_onnx_graph


class CpuTarget(Target):
    name = "cpu"
    backend = "onnxruntime"
    description = "ONNX Runtime, CPU execution provider"
    # fewer, larger nodes: decoding is launch-bound on a CPU once the weights are small
    required_passes = ("fuse-projections", "fuse-norms")
    kv_window = True  # the host-side cache shifts the window in place (runtime/kv_cache.py)

    def build(self, model: onnx.ModelProto, out_dir: Path, role: str) -> dict:
        return {**write_onnx_graph(model, out_dir, role), "execution_provider": "CPUExecutionProvider"}

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend, "execution_provider": "CPUExecutionProvider"}


TARGET = CpuTarget()
