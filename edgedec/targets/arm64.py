"""Target ``arm64``: Apache TVM (Relax) cross-compiled for aarch64 Linux/Android (see :mod:`.tvm_target`)."""

from .tvm_target import Arm64Target

TARGET = Arm64Target("arm64", "Apache TVM (Relax) cross-compiled for aarch64 Linux/Android (NEON); "
                              "float32 or int4 weights")
