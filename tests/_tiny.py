"""Tiny seeded models and bundles for the eval, bench and gate tests (no download, ~10 s per bundle).

The Hugging Face directory comes from ``benchmarks/make_tiny_model.py`` (the script CI uses too):
a random Llama with hidden 64, 4 heads / 2 KV heads of head_dim 16, 2 layers, and a ~300-token BPE
tokenizer trained on ``pydoc_data.topics``. :func:`tiny_bundle` compiles it once per test session
and seed, and every caller gets the same directory.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKER = ROOT / "benchmarks" / "make_tiny_model.py"
MAX_POSITIONS = 512

_cache: dict = {}


def maker():
    """``benchmarks/make_tiny_model.py`` as a module (it is a script, not part of the package)."""
    if "maker" not in _cache:
        spec = importlib.util.spec_from_file_location("make_tiny_model", MAKER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _cache["maker"] = module
    return _cache["maker"]


def make_hf_dir(out: Path, seed: int = 0) -> Path:
    return maker().make_tiny_model(out, seed=seed, max_positions=MAX_POSITIONS)


def compile_bundle(hf_dir: Path, out: Path) -> Path:
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    compile_model(str(hf_dir), out, CompileOptions())
    return out


def tiny_bundle(tmp_path_factory, seed: int = 0) -> tuple[Path, Path]:
    """(HF directory, bundle directory) of the tiny model with ``seed``, built once per session."""
    key = ("bundle", seed)
    if key not in _cache:
        base = tmp_path_factory.mktemp(f"tiny-seed{seed}")
        hf = make_hf_dir(base / "hf", seed)
        _cache[key] = (hf, compile_bundle(hf, base / "bundle"))
    return _cache[key]


def sample_text(topic: str = "for") -> str:
    """English prose with code from the CPython docs (shipped with Python, not with edgedec)."""
    from pydoc_data.topics import topics

    return topics[topic]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(bundle: Path) -> None:
    """Recompute every file's size and sha256 in the manifest, so an edited bundle is valid again."""
    from edgedec.runtime.bundle import MANIFEST, sha256_file

    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    for name, info in manifest["files"].items():
        info["bytes"] = (bundle / name).stat().st_size
        info["sha256"] = sha256_file(bundle / name)
    path.write_text(json.dumps(manifest, indent=2))


def edit_manifest(bundle: Path, edit) -> None:
    """Apply ``edit(manifest)`` in place (the manifest itself is not among the hashed files)."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


# Fixtures for tests/eval, tests/bench and tests/gate (each conftest imports them).
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(HF directory, bundle) of the tiny random Llama, seed 0."""
    return tiny_bundle(tmp_path_factory, seed=0)


@pytest.fixture(scope="session")
def tiny_other(tmp_path_factory):
    """The same architecture and tokenizer with other random weights (seed 1)."""
    return tiny_bundle(tmp_path_factory, seed=1)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(sample_text("for"))
    return path


def exact_two_token_distribution(engine, ids, sampler):
    """p(t1) and p(t2) = sum over t1 of p(t1) p(t2 | t1), from the model itself (speculation tests)."""
    import numpy as np

    dec = engine.decoder
    dec.kv.length = 0
    p1 = sampler.probs(dec.forward(ids)[-1])
    p2 = np.zeros_like(p1)
    for t1 in np.flatnonzero(p1):
        dec.kv.length = 0
        p2 += p1[t1] * sampler.probs(dec.forward([*ids, int(t1)])[-1])
    return p1, p2


def chi2_pvalue(samples, p):
    """Chi-square p-value of integer ``samples`` against the distribution ``p``."""
    import numpy as np
    from scipy import stats

    samples = np.asarray(samples)
    support = np.flatnonzero(p > 0)
    observed = np.array([np.sum(samples == t) for t in support], float)
    assert observed.sum() == len(samples), "a sample fell outside the model's support"
    return stats.chisquare(observed, p[support] * len(samples)).pvalue
