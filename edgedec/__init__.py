"""edgedec: compile decoder-only language models into bundles that run fast on the device you ship to."""

__version__ = "0.1.0"
