"""Which ONNX Runtime execution providers a bundle's graph runs on (torch-free).

A graph entry names its ``execution_provider`` and may name a ``fallback_execution_provider``. The
wanted provider is used when this onnxruntime build has it; otherwise the recorded fallback, with a
warning; otherwise loading fails with one line naming what is missing.
"""

from __future__ import annotations

import logging

from ..errors import BundleError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def select_provider(graph: dict) -> str:
    """The graph's ``execution_provider`` if available, else its ``fallback_execution_provider`` (logged)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want = graph.get("execution_provider", CPU)
    if want in available:
        return want
    fallback = graph.get("fallback_execution_provider")
    if fallback in available:
        log.warning("%s is not available in this onnxruntime; running the graph on its recorded fallback %s",
                    want, fallback)
        return fallback
    hint = " (install onnxruntime-gpu on a machine with a CUDA GPU)" if want == "CUDAExecutionProvider" else ""
    raise BundleError(f"this bundle needs {want}, which this onnxruntime does not provide "
                      f"(available: {', '.join(available)}){hint}")


def session_providers(provider: str) -> list[str]:
    """The providers list for an InferenceSession: the chosen one, then the CPU for what it does not take."""
    return [provider] if provider == CPU else [provider, CPU]
