"""Bundles for the target tests: the tiny Llama compiled for npu (chunk 8, cache 64) and for gpu."""

from __future__ import annotations

from pathlib import Path

import pytest

NPU_CHUNK, NPU_CAPACITY = 8, 64


@pytest.fixture(scope="session")
def npu_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("targets") / "tiny-npu"
    qdq = ("qdq", (("samples", 4), ("sequence_length", 32)))
    compile_model(str(tiny_llama_dir), out,
                  CompileOptions(target="npu", max_context=NPU_CAPACITY, chunk=NPU_CHUNK, passes=(qdq,)))
    return out


@pytest.fixture(scope="session")
def npu_float_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    """The static graph without quantization (qdq removed from the required passes for this fixture only)."""
    from edgedec.compiler.pipeline import CompileOptions, compile_model
    from edgedec.targets.npu import TARGET

    out = tmp_path_factory.mktemp("targets") / "tiny-npu-float"
    required = TARGET.required_passes
    TARGET.required_passes = ()
    try:
        compile_model(str(tiny_llama_dir), out, CompileOptions(target="npu", max_context=NPU_CAPACITY, chunk=NPU_CHUNK))
    finally:
        TARGET.required_passes = required
    return out


@pytest.fixture(scope="session")
def gpu_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("targets") / "tiny-gpu"
    compile_model(str(tiny_llama_dir), out, CompileOptions(target="gpu", max_context=128))
    return out
