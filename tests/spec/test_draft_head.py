"""The trained draft head (edgedec calibrate draft-head + pass draft-head): VocabTrim, the fused graph
output checked against a numpy reimplementation, and lossless greedy speculation on the tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgedec.cli import app
from edgedec.compiler.pipeline import CompileOptions, compile_model
from edgedec.draft_head import DraftHead, choose_vocab, vocab_order
from edgedec.errors import ConfigError, GenerationError
from edgedec.runtime import Engine

PROMPTS = ["def fibonacci(n):\n    return", "The quick brown fox jumps over the lazy dog. The quick", "Hello",
           "import os\nimport sys\n", "Once upon a time", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def head_bundle(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("draft-head")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", " ") for p in PROMPTS) + "\n")
    weights = tmp / "head.npz"
    r = CliRunner().invoke(app, ["calibrate", "draft-head", str(tiny["bundle"]), "--model", str(tiny["dir"]),
                                 "--prompts", str(prompts), "--new-tokens", "48", "--epochs", "3",
                                 "-o", str(weights)])
    assert r.exit_code == 0, r.output
    out = tmp / "bundle"
    compile_model(str(tiny["dir"]), out, CompileOptions(passes=(("draft-head", {"weights": str(weights)}),),
                                                        spec="head"))
    return out, DraftHead.load(weights)


def test_vocab_trim_keeps_special_tokens_and_orders_by_frequency():
    targets = np.array([5, 5, 5, 7, 7, 9])
    order = vocab_order(targets, 16, keep=[0, 2])
    assert set(order[:2]) == {0, 2} and list(order[2:5]) == [5, 7, 9]


def test_choose_vocab_trades_coverage_for_latency():
    rng = np.random.default_rng(0)
    targets = np.minimum(rng.zipf(1.3, 20000), 4000) - 1  # a long-tailed token distribution
    order = vocab_order(targets, 4000, keep=[])
    cheap = choose_vocab(order, targets, agreement=0.5, hidden=64, step_flops=1e6, min_coverage=0.5, trials=40)
    assert cheap["coverage"] >= 0.5 and cheap["k"] < 4000
    assert cheap["utility"] >= cheap["utility_full_vocab"]
    with pytest.raises(ConfigError, match="no vocabulary size"):
        choose_vocab(order, targets, agreement=0.5, hidden=64, step_flops=1e6, min_coverage=1.01, trials=5)


def test_fused_output_matches_the_head_computed_in_numpy(head_bundle, tiny):
    bundle, head = head_bundle
    m = json.loads((bundle / "manifest.json").read_text())
    rec = next(p for p in m["passes"] if p["pass"] == "draft-head")
    assert rec["report"]["k"] == len(head.id_map) <= head.stats["k_train"]
    assert 0 < rec["report"]["coverage"] <= 1
    eng = Engine.load(bundle, threads=1)
    dec = eng.decoder
    ids = eng.encode(PROMPTS[0])
    dec.kv.length = 0
    logits = dec.forward(ids, logits_rows=range(len(ids)))
    # the same head in numpy, from the graph's own hidden states: re-run with the head input exposed
    from edgedec.models.source import load

    model = load(str(tiny["dir"])).model
    import torch

    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        emb = model.get_input_embeddings().weight.numpy()
    pick = logits.argmax(-1)
    a = np.concatenate([h, emb[pick]], axis=1) @ head.w1 + head.b1
    z = h + (a / (1 + np.exp(-a))) @ head.w2
    expected = head.id_map[(z @ head.table.T).argmax(-1)]
    assert np.mean(dec.draft_rows == expected) >= 0.95  # float ties aside, the same tokens


@pytest.mark.parametrize("drafter", ["head", "head+ngram"])
def test_greedy_speculation_with_the_head_is_lossless(head_bundle, drafter):
    eng = Engine.load(head_bundle[0], threads=1)
    drafted = 0
    for prompt in PROMPTS:
        base = [t.id for t in eng.generate(prompt, max_new_tokens=32, ignore_eos=True, drafter=None)]
        for k in (1, 4):
            spec = [t.id for t in eng.generate(prompt, max_new_tokens=32, ignore_eos=True, drafter=drafter,
                                               draft_len=k)]
            assert spec == base, (prompt, drafter, k)
            drafted += eng.last_stats.drafted_tokens
    assert drafted > 0
    # the bundle speculates with the head by default
    default = [t.id for t in eng.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True)]
    assert eng.last_stats.drafter == "head"
    assert default == [t.id for t in eng.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True, drafter=None)]


def test_head_drafter_needs_the_pass(tiny):
    eng = Engine.load(tiny["bundle"], threads=1)
    with pytest.raises(GenerationError, match="draft-head pass"):
        list(eng.generate("Hello", max_new_tokens=4, drafter="head"))


def test_pass_refuses_a_missing_weights_file(tiny, tmp_path):
    r = CliRunner().invoke(app, ["compile", str(tiny["dir"]), "-o", str(tmp_path / "b"),
                                 "--pass", f"draft-head:weights={tmp_path / 'nope.npz'}"])
    assert r.exit_code == 2 and "does not exist" in r.output and not (tmp_path / "b").exists()


def test_training_with_fewer_kept_tokens_than_the_vocabulary(tiny, tmp_path):
    from edgedec.draft_head import generate_sequences, train
    from edgedec.models.source import load

    seqs = generate_sequences(tiny["bundle"], PROMPTS, 24, threads=1)
    head = train(load(str(tiny["dir"])).model, seqs, special_ids=[0, 1, 2], k_train=64, epochs=1,
                 min_coverage=0.1, trials=10)
    assert len(head.id_map) <= 64 and {0, 1, 2} <= set(head.id_map.tolist())
    assert head.table.shape == (len(head.id_map), head.w2.shape[0])
    head.save(tmp_path / "h.npz")
    again = DraftHead.load(tmp_path / "h.npz")
    np.testing.assert_array_equal(again.id_map, head.id_map)


def test_sampling_with_the_head_keeps_the_model_distribution(head_bundle):
    """Temperature sampling with the (vocabulary-trimmed) head drafting: the second token, which the
    drafted chain decides, follows the model's exact two-step distribution (chi-square)."""
    from _tiny import chi2_pvalue, exact_two_token_distribution

    from edgedec.runtime.sampler import Sampler

    eng = Engine.load(head_bundle[0], threads=1)
    ids = eng.encode("The quick brown")
    kw = dict(temperature=1.0, top_k=5)
    _, p2 = exact_two_token_distribution(eng, ids, Sampler(**kw))
    n, second, drafted = 1200, [], 0
    for seed in range(n):
        out = [t.id for t in eng.generate(ids, max_new_tokens=2, ignore_eos=True, seed=seed, drafter="head",
                                          draft_len=1, adaptive_draft=False, **kw)]
        second.append(out[1])
        drafted += eng.last_stats.drafted_tokens
    assert drafted == n  # every sample went through one verification of one drafted token
    assert chi2_pvalue(second, p2) > 1e-3
