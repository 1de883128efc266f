"""Hostile bundles for the security tests.

``make_native_bundle(dir)``: the issue's reproducer. A copy of the tiny Llama bundle whose manifest
declares a TVM graph ``decoder.so``, a real shared library built here with the C compiler, whose
constructor (``__attribute__((constructor))``, run by ``dlopen`` itself) writes a marker file; the
manifest is rehashed, so every sha256 matches. If the marker exists, the bundle's native code ran.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from _hostile import CONSTRUCTOR_C, edit_manifest, rehash


@dataclass
class NativeBundle:
    path: Path
    marker: Path  # written by the library's constructor: exists iff the native code ran

    @property
    def ran(self) -> bool:
        return self.marker.exists()


@pytest.fixture
def make_native_bundle(tiny_llama_bundle, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the constructor library")
    count = [0]

    def make(path: Path | None = None) -> NativeBundle:
        count[0] += 1
        path = path or tmp_path / f"native{count[0]}"
        marker = tmp_path / f"marker{count[0]}"
        shutil.copytree(tiny_llama_bundle, path)
        src = tmp_path / f"constructor{count[0]}.c"
        src.write_text(CONSTRUCTOR_C)
        subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(path / "decoder.so"), str(src)],
                       check=True, capture_output=True)

        def declare(m):
            m["target"] = {"name": "cpu-tvm", "backend": "tvm"}
            m["graphs"] = {"decoder": {"role": "decoder", "file": "decoder.so", "format": "tvm-relax-vm",
                                       "params_file": "decoder.onnx.data", "inputs": [], "outputs": [],
                                       # one empty weight per layer: what the validator checks the layers by
                                       "params": [{"name": f"layers.{l}.w", "shape": [0], "dtype": "float32",
                                                   "offset": 0, "bytes": 0}
                                                  for l in range(m["architecture"]["num_layers"])]}}

        edit_manifest(path, declare)
        rehash(path)
        return NativeBundle(path, marker)

    return make


@pytest.fixture
def keys(tmp_path):
    """Two ed25519 key pairs: ``keys["a"]`` / ``keys["b"]`` -> (private path, public path, key id)."""
    from edgedec.runtime.trust import generate_key_pair

    return {name: generate_key_pair(tmp_path / f"key-{name}") for name in ("a", "b")}
