"""Seeded manifest fuzz (issue 21): every mutation of a bundle's manifest ends in a clean refusal (one
EdgedecError line; exit 2 from the CLI) or a bundle that loads, generates and chats. The long run is
``benchmarks/fuzz_manifest.py --n 5000``; this one takes seconds."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_manifest", ROOT / "benchmarks" / "fuzz_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def window_bundle(tiny_llama_dir, tmp_path_factory):
    """int4 weights, int4 cache with a sink + window, ngram speculation: the most fields the runtime reads."""
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("fuzz") / "window"
    compile_model(str(tiny_llama_dir), out, CompileOptions(passes=(("int4", {}),), spec="ngram", kv="int4",
                                                           kv_window=32, kv_sinks=4))
    return out


def test_mutations_are_refused_cleanly_or_work(tiny_llama_bundle, window_bundle, tmp_path):
    result = fuzzer().fuzz([tiny_llama_bundle, window_bundle], n=300, seed=21, work=tmp_path, inspect_every=4)
    assert result["crash"] == 0, "\n".join(f"{c['edits']}: {c['detail']}" for c in result["crashes"])
    # the fuzzer must exercise both outcomes, or it tests nothing
    assert result["ok"] >= 20 and result["refused"] >= 100, result


def test_refusals_reach_the_cli_as_one_line_and_exit_2(tiny_llama_bundle, tmp_path, cli):
    fz = fuzzer()
    rng = random.Random(7)
    original = json.loads((tiny_llama_bundle / "manifest.json").read_text())
    bundle = tmp_path / "b"
    shutil.copytree(tiny_llama_bundle, bundle)
    codes = []
    for _ in range(25):
        m, edits = fz.mutate(original, rng)
        (bundle / "manifest.json").write_text(json.dumps(m))
        r = cli("run", bundle, "-p", "def f(x):", "-n", "2", "--threads", "1")
        assert r.exit_code in (0, 2), (edits, r.exit_code, r.stderr)
        if r.exit_code == 2:
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (edits, r.stderr)
        codes.append(r.exit_code)
    assert 2 in codes
