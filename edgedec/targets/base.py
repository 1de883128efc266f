"""What a target is: the passes it needs and refuses, how it builds, which runtime backend runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import onnx

from ..errors import UnsupportedError


def write_onnx_graph(model: onnx.ModelProto, out_dir: Path, role: str) -> dict:
    """Save ``model`` as ``<role>.onnx`` with its weights in one ``<role>.onnx.data`` beside it; return
    the manifest's graph entry (file, data files, inputs, outputs) for the target to complete."""
    file = f"{role}.onnx"
    data = f"{file}.data"
    onnx.save_model(model, str(out_dir / file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return {
        "role": role,
        "file": file,
        "data": [data] if (out_dir / data).exists() else [],
        "inputs": [value_info(v) for v in model.graph.input],
        "outputs": [value_info(v) for v in model.graph.output],
    }


def value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "dtype": dtype, "shape": shape}


class Target(ABC):
    name: str
    backend: str
    description: str
    required_passes: tuple[str, ...] = ()
    kv_window: bool = False  # the runtime backend can evict a sink + sliding window (--kv-window)
    refused_passes: dict[str, str] = {}  # pass name -> reason

    def check_passes(self, passes: list[str]) -> None:
        for p in passes:
            if p in self.refused_passes:
                raise UnsupportedError(f"target {self.name} cannot take pass {p}: {self.refused_passes[p]}")

    default_max_context: int | None = None  # cache capacity when the user gives none (None: the pipeline's)

    def take_passes(self, specs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        """Claim the passes this target carries out itself, on its own weights instead of the ONNX graph
        (e.g. ``int4`` on the TVM targets); returns the (name, options) pairs left for the ONNX pipeline."""
        return specs

    def check_pass_options(self, name: str, options: dict) -> None:
        """Refuse, before any work, pass options this target cannot run (e.g. a dtype an NPU lacks)."""

    def export(self, hf_model, arch, out_path: Path, max_positions: int, options=None) -> Path:
        """Export the reference ONNX graph this target's passes start from (default: GQA, dynamic shapes)."""
        from ..compiler import export

        return export.export_decoder(hf_model, arch, out_path, max_positions)

    def verify(self, hf_model, graph_path: Path, arch, max_positions: int, options=None) -> dict:
        """Compare the exported graph's logits with the source model's (``max_abs_logit_diff``)."""
        from ..compiler import export

        return export.verify_against_source(hf_model, graph_path, arch)

    def kv_cache_entry(self, arch, max_positions: int) -> dict:
        """Keys of the manifest's ``kv_cache`` that differ from the in-place GQA cache (default: none)."""
        return {}

    def extra_graphs(self, out_dir: Path) -> dict:
        """Manifest entries of graphs ``build`` wrote besides the decoder (e.g. a prefill graph); default none."""
        return {}

    @abstractmethod
    def build(self, model: onnx.ModelProto, out_dir: Path, role: str) -> dict:
        """Write the graph(s) for ``model`` into ``out_dir``; return the manifest's graph entry."""

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend}
