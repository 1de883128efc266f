"""Speculative decoding in the runtime: drafters, chain verification, and losslessness.

Greedy: output with speculation is token-for-token the output without it. Sampling: the distribution
of the generated tokens equals the model's; a chi-square test against the exact distribution (computed
from the model) passes, and the same test catches a deliberately wrong verifier.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgedec.errors import GenerationError
from edgedec.runtime import Engine, engine as engine_mod
from edgedec.runtime.drafters import (CombinedDrafter, DraftLengthPolicy, PromptLookupDrafter,
                                      TokenRecyclingDrafter, make_drafter)
from edgedec.runtime.sampler import Sampler

from _tiny import chi2_pvalue, exact_two_token_distribution

DRAFTERS = ["ngram", "recycling", "ngram+recycling"]
PROMPTS = [
    "def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "import os\nimport sys\nimport os\n",
    "Hello",
]


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return Engine.load(tiny["bundle"], threads=1)


# --- drafters ------------------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = PromptLookupDrafter(max_ngram=2)
    hist = np.array([5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6], np.int32)
    assert d.propose(hist, 3) == [9, 4, 5]  # latest earlier "5 6" is at index 5
    assert d.propose(np.array([1, 2, 3], np.int32), 3) == []  # nothing repeats
    assert d.propose(np.array([3, 1, 2, 3], np.int32), 2) == [1, 2]  # falls back to a 1-gram


def test_token_recycling_learns_from_observations():
    d = TokenRecyclingDrafter(vocab_size=10, width=2)
    assert d.propose(np.array([1], np.int32), 3) == []
    d.observe(np.array([1, 4], np.int32), np.array([[4, 2], [7, 3]], np.int32))
    assert d.propose(np.array([1], np.int32), 3) == [4, 7]  # 1 -> 4 -> 7 -> (unknown)


def test_make_drafter():
    assert isinstance(make_drafter("ngram+recycling", 10), CombinedDrafter)
    with pytest.raises(GenerationError, match="unknown drafter 'medusa'; valid: ngram, recycling"):
        make_drafter("medusa", 10)


def test_draft_length_policy_follows_acceptance():
    policy = DraftLengthPolicy(max_k=6)
    for _ in range(30):
        policy.update(drafted=6, accepted=6)
    assert policy.alpha > 0.9 and policy.next_k() == 6  # everything accepted: draft as far as allowed
    for _ in range(60):
        policy.update(drafted=4, accepted=0)
    assert policy.alpha < 0.05
    ks = [policy.next_k() for _ in range(16)]
    assert ks == [0] * 7 + [2] + [0] * 7 + [2]  # drafting pauses, with a short probe every 8 steps
    mid = DraftLengthPolicy(max_k=8)
    mid.successes, mid.trials = 6.0, 10.0  # alpha = 0.6: a short draft pays, a long one does not
    assert 1 <= mid.next_k() < 8 and mid.value(mid.next_k()) > mid.value(8)


def test_draft_length_policy_learns_what_a_draft_costs_here():
    """The cost per draft token follows the timings: the same acceptance drafts shorter, or not at all,
    where verifying is dear; a plain step is asked for again after ``calibrate_every`` drafts."""
    cheap, dear = DraftLengthPolicy(max_k=8), DraftLengthPolicy(max_k=8)
    for p in (cheap, dear):
        p.successes, p.trials = 6.0, 10.0  # alpha = 0.6
        p.timed_verify(drafted=4, seconds=1.0)  # no plain step timed yet: nothing to compare with
        assert p.cost == 0.12  # the drafter's prior
        p.timed_plain(0.01)
    for _ in range(60):
        cheap.timed_verify(drafted=4, seconds=0.01 * (1 + 0.05 * 4))
        dear.timed_verify(drafted=4, seconds=0.01 * (1 + 0.8 * 4))
    assert cheap.cost == pytest.approx(0.05, abs=0.01) and dear.cost == pytest.approx(0.8, abs=0.02)
    assert cheap.next_k() > 1 and dear.next_k() == 0  # k=1: 1.6 tokens for 1.8 steps, not worth it
    p = DraftLengthPolicy(max_k=4, calibrate_every=3)
    p.successes, p.trials = 9.0, 10.0
    assert [p.next_k() for _ in range(4)] == [4, 4, 4, 0]  # the fourth: a plain step to re-time
    p.timed_plain(0.01)
    assert p.next_k() == 4


def test_verify_chain_greedy():
    rows = np.full((4, 6), -1.0, np.float32)
    rows[0, 2] = rows[1, 3] = rows[2, 5] = rows[3, 1] = 1.0  # argmax: 2, 3, 5, 1
    sampler = Sampler()
    assert engine_mod.verify_chain(rows, [2, 3, 5], sampler) == [2, 3, 5, 1]  # all accepted + bonus
    assert engine_mod.verify_chain(rows, [2, 4, 5], sampler) == [2, 3]  # second rejected, corrected
    assert engine_mod.verify_chain(rows, [0, 3, 5], sampler) == [2]


# --- greedy losslessness on the tiny models -------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_greedy_speculation_is_lossless(engine, drafter, adaptive):
    accepted = 0
    for prompt in PROMPTS:
        base = [t.id for t in engine.generate(prompt, max_new_tokens=40, ignore_eos=True)]
        for k in (1, 3, 6):
            spec = [t.id for t in engine.generate(prompt, max_new_tokens=40, ignore_eos=True, drafter=drafter,
                                                  draft_len=k, adaptive_draft=adaptive)]
            assert spec == base, (prompt, drafter, k)
            s = engine.last_stats
            assert s.drafter == drafter and s.accepted_tokens <= s.drafted_tokens
            accepted += s.accepted_tokens
    assert accepted > 0  # the test really exercised accepted drafts and cache rollback


def test_the_engine_times_plain_and_verify_steps_for_the_policy(engine):
    """With the adaptive length the engine times plain steps and verifications, and the policy's cost
    per draft token moves off the drafter's prior (0.12); without it there is no estimate."""
    prompt = PROMPTS[0]
    list(engine.generate(prompt, max_new_tokens=120, ignore_eos=True, drafter="recycling", draft_len=3))
    s = engine.last_stats
    assert s.verify_steps > 0 and s.draft_cost is not None and s.draft_cost != 0.12
    list(engine.generate(prompt, max_new_tokens=20, ignore_eos=True, drafter="recycling", adaptive_draft=False))
    assert engine.last_stats.draft_cost is None


def test_speculation_near_a_full_context(tiny):
    eng = Engine.load(tiny["bundle"], threads=1, context_length=80)
    prompt = PROMPTS[1]
    base = [t.id for t in eng.generate(prompt, max_new_tokens=64, ignore_eos=True)]
    spec = [t.id for t in eng.generate(prompt, max_new_tokens=64, ignore_eos=True, drafter="ngram")]
    assert spec == base and eng.last_stats.stop_reason == "context_full"


def test_draft_len_is_checked(engine):
    with pytest.raises(GenerationError, match="draft_len must be in"):
        engine.generate("Hello", drafter="ngram", draft_len=0)


# --- sampling: the distribution is the model's -----------------------------------------------------
class FixedDrafter:
    """Always proposes the same chain: rejected often, accepted often, depending on the position."""

    name, width = "fixed", 0

    def __init__(self, draft):
        self.draft = list(draft)

    def reset(self, prompt):
        pass

    def propose(self, history, k):
        return self.draft[:k]

    def observe(self, inputs, candidates):
        pass


def _sample_two_tokens(engine, ids, drafter, n, **kw):
    out = np.zeros((n, 2), np.int64)
    for seed in range(n):
        out[seed] = [t.id for t in engine.generate(ids, max_new_tokens=2, ignore_eos=True, seed=seed,
                                                   drafter=drafter, draft_len=2, **kw)]
    return out


def test_sampling_distribution_is_preserved(engine, monkeypatch):
    """The first token comes from the prefill; the drafted chain decides the second (accepted or
    rejected and resampled), so the second token's distribution is what speculation could distort."""
    ids = engine.encode("The quick brown")
    kw = dict(temperature=1.0, top_k=6)
    p1, p2 = exact_two_token_distribution(engine, ids, Sampler(**kw))
    # the likeliest second token, drafted after whatever the first is: accepted often, not always
    drafter = FixedDrafter([int(np.argmax(p2)), int(np.argmax(p1))])
    n = 1500
    samples = _sample_two_tokens(engine, ids, drafter, n, **kw)
    assert engine.last_stats.verify_steps == 1
    assert 0 < np.mean(samples[:, 1] == drafter.draft[0]) < 1
    assert chi2_pvalue(samples[:, 0], p1) > 1e-3
    assert chi2_pvalue(samples[:, 1], p2) > 1e-3

    # the same test catches a verifier that accepts every draft token
    def accept_all(rows, draft, sampler):
        return [*draft, sampler(rows[len(draft)])]

    monkeypatch.setattr(engine_mod, "verify_chain", accept_all)
    wrong = _sample_two_tokens(engine, ids, drafter, 300, **kw)
    assert chi2_pvalue(wrong[:, 1], p2) < 1e-6


def test_named_drafter_keeps_what_it_learned(engine):
    list(engine.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, drafter="recycling"))
    learned = engine._drafters["recycling"].table.copy()
    assert (learned >= 0).any()
    list(engine.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True, drafter="recycling"))
    table = engine._drafters["recycling"].table
    assert (table[learned >= 0] >= 0).all()  # the second call started from the first call's table


# --- int8-activation kernels: one row differs from several; exact_rows makes every step multi-row ------
@pytest.fixture(scope="module")
def int4_bundle(tiny, tmp_path_factory):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("int4") / "bundle"
    compile_model(str(tiny["dir"]), out, CompileOptions(passes=(("int4", {}),)))
    return out


def test_multi_row_chunkings_agree_bit_for_bit(int4_bundle):
    """The property exact_rows relies on: any split of a sequence into runs of >= 2 rows gives the same logits."""
    dec = Engine.load(int4_bundle, threads=1).decoder
    ids = list(range(3, 17))
    dec.kv.length = 0
    whole = dec.forward(ids, logits_rows=range(len(ids)))
    dec.kv.length = 0
    parts = [dec.forward(ids[a:b], logits_rows=range(b - a)) for a, b in ((0, 5), (5, 7), (7, 14))]
    assert np.array_equal(whole, np.concatenate(parts))


@pytest.fixture(scope="module")
def int4_spec_bundle(tiny, tmp_path_factory):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("int4spec") / "bundle"
    compile_model(str(tiny["dir"]), out, CompileOptions(passes=(("int4", {}),), spec="ngram"))
    return out


def test_exact_rows_is_on_by_default_where_speculation_needs_it(int4_bundle, int4_spec_bundle, tiny):
    assert Engine.load(int4_spec_bundle, threads=1).decoder.exact_rows  # speculates, accuracy_level 4
    assert not Engine.load(int4_spec_bundle, threads=1, exact_rows=False).decoder.exact_rows
    assert not Engine.load(int4_bundle, threads=1).decoder.exact_rows  # no default speculation: the faster row
    assert not Engine.load(tiny["bundle"], threads=1).decoder.exact_rows  # float: one row is exact anyway


def test_bench_measures_speculation_against_the_fastest_plain_decode(int4_spec_bundle):
    """bench --spec's "(no spec)" row is the bundle's plain decode at its fastest, one row per token;
    the speculating row keeps what the bundle asks for."""
    from edgedec.bench_worker import Session

    request = {"bundle": str(int4_spec_bundle), "prompts": PROMPTS[:1], "new_tokens": 4, "threads": 1}
    assert not Session({**request, "drafter": None}).engine.decoder.exact_rows
    assert Session({**request, "drafter": "auto"}).engine.decoder.exact_rows
    assert Session({**request, "drafter": "ngram"}).engine.decoder.exact_rows


def test_int4_spec_bundle_equals_its_no_spec_run(int4_spec_bundle):
    """A bundle compiled with --spec: generate() speculates by default, drafter=None is --no-spec."""
    eng = Engine.load(int4_spec_bundle, threads=1)
    for prompt in PROMPTS:
        spec = [t.id for t in eng.generate(prompt, max_new_tokens=40, ignore_eos=True)]
        assert eng.last_stats.drafter == "ngram"
        base = [t.id for t in eng.generate(prompt, max_new_tokens=40, ignore_eos=True, drafter=None)]
        assert spec == base, prompt


def test_int4_cache_spec_bundle_equals_its_no_spec_run(tiny, tmp_path_factory):
    """int4 weights, an int4 cache with centred keys, --spec: rolled-back positions are rewritten in the
    quantized cache, and the centring shift follows each row's position."""
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("int4kv4spec") / "bundle"
    compile_model(str(tiny["dir"]), out, CompileOptions(passes=(("int4", {}),), spec="ngram", kv="int4"))
    eng = Engine.load(out, threads=1)
    assert eng.bundle.manifest["kv_cache"]["quantization"]["key_offsets_file"]
    for prompt in PROMPTS:
        spec = [t.id for t in eng.generate(prompt, max_new_tokens=40, ignore_eos=True)]
        # drafts verified, rejected ones rolled back
        assert eng.last_stats.drafter == "ngram" and eng.last_stats.verify_steps > 0
        base = [t.id for t in eng.generate(prompt, max_new_tokens=40, ignore_eos=True, drafter=None)]
        assert spec == base, prompt


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_exact_rows_makes_int4_speculation_token_exact(int4_bundle, drafter):
    eng = Engine.load(int4_bundle, threads=1, exact_rows=True)
    for prompt in PROMPTS:
        base = [t.id for t in eng.generate(prompt, max_new_tokens=40, ignore_eos=True, drafter=None)]
        spec = [t.id for t in eng.generate(prompt, max_new_tokens=40, ignore_eos=True, drafter=drafter, draft_len=4)]
        assert spec == base, (prompt, drafter)


def test_exact_rows_changes_nothing_on_float_bundles(engine, tiny):
    exact = Engine.load(tiny["bundle"], threads=1, exact_rows=True)
    for prompt in PROMPTS:
        assert [t.id for t in exact.generate(prompt, max_new_tokens=24, ignore_eos=True, drafter=None)] == \
            [t.id for t in engine.generate(prompt, max_new_tokens=24, ignore_eos=True, drafter=None)]


def test_exact_rows_decode_steps_equal_the_multi_row_pass(int4_bundle):
    dec = Engine.load(int4_bundle, threads=1, exact_rows=True).decoder
    ids = list(range(3, 17))
    dec.kv.length = 0
    whole = dec.forward(ids, logits_rows=range(len(ids)))
    dec.kv.length = 0
    steps = [dec.decode_one(t).copy() for t in ids]
    assert dec.kv.length == len(ids)
    assert np.array_equal(whole, np.stack(steps))


def test_forget_drafters_clears_what_they_learned_and_keeps_them(engine):
    list(engine.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, drafter="ngram+recycling"))
    combined = engine._drafters["ngram+recycling"]
    recycling = combined.drafters[1]
    assert (recycling.table >= 0).any()
    engine.forget_drafters()
    assert engine._drafters["ngram+recycling"] is combined  # still loaded
    assert (recycling.table == -1).all()
