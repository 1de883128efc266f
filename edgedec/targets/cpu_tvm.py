"""Target ``cpu-tvm``: Apache TVM (Relax) compiled for this machine's CPU (see :mod:`.tvm_target`)."""

from .tvm_target import TvmTarget

TARGET = TvmTarget("cpu-tvm", "Apache TVM (Relax) compiled for this machine's CPU; float32 or int4 weights, "
                              "in-place KV cache")
