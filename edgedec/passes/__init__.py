"""ONNX -> ONNX graph passes, one module each. The contract lives in :mod:`edgedec.passes.base`."""

from .base import Pass, PassConfig, PassError, PassResult, option, run_passes

__all__ = ["Pass", "PassConfig", "PassError", "PassResult", "option", "run_passes"]
