"""Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M) through ``--target cpu-tvm -q int4``: greedy output against
transformers on the dequantized GGUF, 8 prompts x 32 tokens.

Marked ``large`` and left out of the default run (``pytest -m large tests/test_qwen_large.py``): it needs the
1.1 GB GGUF, ~8 GB of memory for transformers' float32 copy, and ~5 minutes more if it compiles the bundle.

    EDGEDEC_QWEN15_GGUF    the GGUF (default: the registry's Qwen2.5-Coder-1.5B-Instruct when it is cached)
    EDGEDEC_QWEN15_BUNDLE  a cpu-tvm -q int4 bundle compiled from that GGUF (default: compiled here, in tmp)

A prompt whose tokens differ from transformers' passes only when, at the first differing step, the
reference's logits for its own token and the bundle's token are within ``NEAR_TIE`` of each other (the
bundle sums in another order, and its weights are the source's re-expressed blocks); each such flip is
printed with its gap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.large

NEW_TOKENS = 32
NEAR_TIE = 0.05  # logits; a flip between two tokens this close is the summation order, not the model
PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "# Python: read a CSV file and print the sum of the second column\nimport csv\n",
    "def is_prime(n: int) -> bool:\n",
    "Explain what a Python list comprehension is.\n\nA list comprehension is",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "// JavaScript: debounce a function\nfunction debounce(fn, ms) {\n",
    "SELECT name, COUNT(*) FROM orders\n",
    "The difference between a process and a thread is",
]
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def _gguf() -> Path:
    if path := os.environ.get("EDGEDEC_QWEN15_GGUF"):
        return Path(path)
    from edgedec.models import registry

    entry = registry.lookup("Qwen2.5-Coder-1.5B-Instruct")
    local = registry.local_path(entry) if entry is not None else None
    if local is None:
        pytest.skip("no Qwen2.5-Coder-1.5B-Instruct GGUF: set EDGEDEC_QWEN15_GGUF or `edgedec models pull` it")
    return Path(local)


@pytest.fixture(scope="module")
def gguf() -> Path:
    return _gguf()


@pytest.fixture(scope="module")
def bundle(gguf, tmp_path_factory) -> Path:
    from edgedec.runtime.bundle import sha256_file

    if path := os.environ.get("EDGEDEC_QWEN15_BUNDLE"):
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        assert manifest["source"]["sha256"] == sha256_file(gguf), "the bundle was compiled from another file"
        assert manifest["target"]["name"] == "cpu-tvm"
        return Path(path)
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("qwen15") / "bundle"
    compile_model(str(gguf), out, CompileOptions(target="cpu-tvm", passes=(("int4", ()),)))
    return out


@pytest.fixture(scope="module")
def reference(gguf):
    """transformers' model on the dequantized GGUF (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def _gap(model, ids: list[int], want: int, got: int) -> float:
    """The reference's logit of its own token minus the bundle's token's, after ``ids``."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return float(logits[want] - logits[got])


def test_manifest_records_what_was_verified(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    v = m["verification"]
    assert v == m["graphs"]["decoder"]["verification"]
    assert v["reference"].startswith("transformers") and "decoder.so" in v["subject"]
    assert v["max_abs_logit_diff"] <= v["tolerance"]
    assert "export_s" not in m["timings"]  # no ONNX graph is exported for a TVM target


def test_greedy_matches_transformers_on_the_dequantized_gguf(bundle, reference, hf_generate, capsys):
    from edgedec.runtime import Engine

    engine = Engine.load(bundle, threads=2, trust=True)
    flips, same = [], 0
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        want = hf_generate(reference, ids, NEW_TOKENS)
        got = [t.id for t in engine.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        if got == want:
            same += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        gap = _gap(reference, ids + want[:i], want[i], got[i])
        flips.append((prompt, i, gap))
    with capsys.disabled():
        print(f"\nqwen2.5-coder-1.5b cpu-tvm int4: {same}/{len(PROMPTS)} prompts identical to transformers "
              f"over {NEW_TOKENS} tokens")
        for prompt, i, gap in flips:
            print(f"  flip at token {i} of {prompt[:40]!r}: reference logit gap {gap:.4f}")
    assert all(gap < NEAR_TIE for _, _, gap in flips), flips


def test_chat_answer_is_python(bundle):
    from edgedec.runtime import Engine

    engine = Engine.load(bundle, threads=2, trust=True)
    text = "".join(t.text for t in engine.chat(CHAT, max_new_tokens=96))
    assert "def " in text and ("[::-1]" in text or "reverse" in text), text
