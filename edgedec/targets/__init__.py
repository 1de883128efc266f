"""Targets: one module each, named in :data:`edgedec.registry.TARGETS`."""

from __future__ import annotations

import importlib

from ..errors import UnsupportedError
from ..registry import TARGETS


def get_target(name: str):
    """The target object for ``name``; an unknown name lists the valid ones."""
    if name not in TARGETS:
        raise UnsupportedError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name]["module"]).TARGET
