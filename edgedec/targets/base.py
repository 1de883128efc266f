"""What a target is: the passes it needs and refuses, how it builds, which runtime backend runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import onnx

from ..errors import UnsupportedError


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
    refused_passes: dict[str, str] = {}  # pass name -> reason

    def check_passes(self, passes: list[str]) -> None:
        for p in passes:
            if p in self.refused_passes:
                raise UnsupportedError(f"target {self.name} cannot take pass {p}: {self.refused_passes[p]}")

    @abstractmethod
    def build(self, model: onnx.ModelProto, out_dir: Path, role: str) -> dict:
        """Write the graph(s) for ``model`` into ``out_dir``; return the manifest's graph entry."""

    def manifest_entry(self) -> dict:
        return {"name": self.name, "backend": self.backend}
