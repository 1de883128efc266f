"""A separate draft model (``--spec model:PATH``): another bundle with the same tokenizer drafts, the
target verifies. Greedy output must equal the target's own; a perfect draft (the target itself) must
have every draft accepted, which checks that the draft cache follows the history exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgedec.compiler.pipeline import CompileOptions, compile_model
from edgedec.errors import GenerationError
from edgedec.runtime import Engine

PROMPTS = ["def fibonacci(n):\n    return", "The quick brown fox jumps over the lazy dog. The quick", "Hello",
           "Once upon a time"]


@pytest.fixture(scope="module", params=["int4-weights", "int8-cache"])
def other_draft(request, tiny_llama_dir, tmp_path_factory):
    """The same tiny Llama compiled differently, same tokenizer: int4 weights (on a random tiny model a
    poor draft, nearly every draft rejected) or an int8 KV cache (a close one, most drafts accepted)."""
    out = tmp_path_factory.mktemp(f"draft-{request.param}") / "bundle"
    options = CompileOptions(passes=(("int4", {}),)) if request.param == "int4-weights" else CompileOptions(kv="int8")
    compile_model(str(tiny_llama_dir), out, options)
    return request.param, out


def _run(engine, prompt, drafter, n=40):
    return [t.id for t in engine.generate(prompt, max_new_tokens=n, ignore_eos=True, drafter=drafter, draft_len=4,
                                          adaptive_draft=False)]


def test_the_target_as_its_own_draft_is_always_accepted(tiny_llama_bundle):
    engine = Engine.load(tiny_llama_bundle, threads=1)
    drafter = f"model:{tiny_llama_bundle}"
    for prompt in PROMPTS:
        base = _run(engine, prompt, None)
        assert _run(engine, prompt, drafter) == base, prompt
        s = engine.last_stats  # of the speculative run
        assert s.drafted_tokens >= 30 and s.accepted_tokens == s.drafted_tokens, (prompt, s.accepted_tokens)


def test_draft_cache_follows_the_history_through_rollbacks(tiny_llama_bundle):
    """After any mix of accepted and rejected drafts (the history jumps back and forth against what the
    draft cache holds), the proposal equals the draft model's own greedy chain computed from scratch."""
    from edgedec.runtime.drafters import DraftModelDrafter

    target = Engine.load(tiny_llama_bundle, threads=1)
    history = np.random.default_rng(1).integers(5, 300, 90).astype(np.int32)
    drafter = DraftModelDrafter(str(tiny_llama_bundle), target.bundle, 1)
    fresh = Engine.load(tiny_llama_bundle, threads=1).decoder
    drafter.reset(history[:5])
    steps = np.random.default_rng(0).integers(-2, 5, 60)  # forward by up to 4, or back by up to 2 tokens
    i, checked = 6, 0
    for step in steps:
        i = int(np.clip(i + step, 2, len(history) - 1))
        out = drafter.propose(history[:i], 4)
        fresh.kv.length = 0
        ref = [int(np.argmax(fresh.forward([int(t) for t in history[:i]])[-1]))]
        for _ in range(3):
            ref.append(int(np.argmax(fresh.decode_one(ref[-1]))))
        assert out == ref, i
        checked += 1
    assert checked == len(steps)


def test_a_different_draft_model_is_lossless(tiny_llama_bundle, other_draft):
    kind, draft = other_draft
    engine = Engine.load(tiny_llama_bundle, threads=1)
    drafted = accepted = 0
    for prompt in PROMPTS:
        spec = _run(engine, prompt, f"model:{draft}")
        drafted += engine.last_stats.drafted_tokens
        accepted += engine.last_stats.accepted_tokens
        assert spec == _run(engine, prompt, None), prompt
    assert drafted >= 100
    if kind == "int8-cache":
        assert accepted > drafted / 2


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_llama_bundle, tiny_qwen2_bundle):
    engine = Engine.load(tiny_llama_bundle, threads=1)
    with pytest.raises(GenerationError, match="does not share the target's tokenizer"):
        _run(engine, "Hello", f"model:{tiny_qwen2_bundle}")


def test_cli_run_takes_a_draft_model(cli, one_line_error, tiny_llama_bundle, tmp_path):
    r = cli("run", tiny_llama_bundle, "--prompt", "Once upon a time", "-n", "24", "--spec",
            f"model:{tiny_llama_bundle}", "--json", "--threads", "1")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["drafter"] == f"model:{tiny_llama_bundle}" and out["drafted_tokens"] > 0
    r = cli("run", tiny_llama_bundle, "--prompt", "Hello", "--spec", f"model:{tmp_path / 'missing'}")
    one_line_error(r, "missing is not a bundle directory")
