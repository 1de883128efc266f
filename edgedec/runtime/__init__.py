"""edgedec's torch-free runtime: ``Engine.load(bundle_dir)`` then ``engine.generate(...)``.

Depends only on numpy, onnxruntime, tokenizers and jinja2.
"""

from .bundle import FORMAT_VERSION, Bundle
from .engine import Engine, GenerationStats, KVCache, Token, physical_cores
from .sampler import Sampler

__all__ = ["Bundle", "Engine", "FORMAT_VERSION", "GenerationStats", "KVCache", "Sampler", "Token", "physical_cores"]
