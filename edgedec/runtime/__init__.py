"""edgedec's torch-free runtime: ``Engine.load(bundle_dir)`` then ``engine.generate(...)``.

Depends only on numpy, onnxruntime, tokenizers, jinja2 and cryptography (bundle signatures). A bundle
with native code (TVM) loads only when trusted: ``Engine.load(path, trust=True)`` or a signature by a
trusted key (:class:`TrustPolicy`, docs/security.md).
"""

from .bundle import FORMAT_VERSION, Bundle
from .engine import Engine, GenerationStats, KVCache, Token, physical_cores
from .sampler import Sampler
from .trust import TrustPolicy

__all__ = ["Bundle", "Engine", "FORMAT_VERSION", "GenerationStats", "KVCache", "Sampler", "Token", "TrustPolicy",
           "physical_cores"]
