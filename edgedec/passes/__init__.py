"""ONNX -> ONNX graph passes, one module each. The contract lives in :mod:`edgedec.passes.base`."""

from .base import (Pass, PassConfig, PassContext, PassError, PassResult, create_pass, option, parse_pass_spec,
                   run_passes)

__all__ = ["Pass", "PassConfig", "PassContext", "PassError", "PassResult", "create_pass", "option",
           "parse_pass_spec", "run_passes"]
