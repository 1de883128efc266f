"""Speculation from the outside: `compile --spec` makes a bundle speculate by default, `run --no-spec`
turns it off with the same greedy output, `bench --spec` measures both in one run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgedec.runtime import Engine

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


@pytest.fixture(scope="module")
def spec_bundle(tiny_llama_dir, tmp_path_factory):
    from typer.testing import CliRunner

    from edgedec.cli import app

    out = tmp_path_factory.mktemp("spec") / "tiny-spec"
    r = CliRunner().invoke(app, ["compile", str(tiny_llama_dir), "-o", str(out), "--spec", "ngram+recycling",
                                 "--draft-len", "3"])
    assert r.exit_code == 0, r.stderr
    return out


def test_compiled_bundle_speculates_by_default(spec_bundle, tiny_llama_bundle):
    manifest = json.loads((spec_bundle / "manifest.json").read_text())
    assert manifest["speculation"] == {"drafter": "ngram+recycling", "draft_len": 3}
    eng = Engine.load(spec_bundle, threads=1)
    spec = [t.id for t in eng.generate(PROMPT, max_new_tokens=32, ignore_eos=True)]
    assert eng.last_stats.drafter == "ngram+recycling" and eng.last_stats.verify_steps > 0
    off = [t.id for t in eng.generate(PROMPT, max_new_tokens=32, ignore_eos=True, drafter=None)]
    assert eng.last_stats.drafter == "" and eng.last_stats.verify_steps == 0
    plain = Engine.load(tiny_llama_bundle, threads=1)
    assert spec == off == [t.id for t in plain.generate(PROMPT, max_new_tokens=32, ignore_eos=True)]
    assert plain.last_stats.drafter == ""  # a bundle compiled without --spec does not speculate


def test_recycling_candidates_come_from_the_graph(spec_bundle):
    """--spec with recycling adds the top-candidates pass: each run emits the top tokens of every logits row,
    the same the host would pick (the tiny model's random logits have no ties)."""
    from edgedec.runtime.engine import candidates, top_candidates

    manifest = json.loads((spec_bundle / "manifest.json").read_text())
    assert manifest["passes"][-1]["pass"] == "top-candidates"
    dec = Engine.load(spec_bundle, threads=1).decoder
    assert dec.top_width == 4
    ids = dec_ids = list(range(5, 17))
    dec.kv.length = 0
    rows = dec.forward(dec_ids, logits_rows=range(len(ids)))
    assert dec.top_rows.shape == (len(ids), 4)
    assert np.array_equal(candidates(dec, rows, 4), top_candidates(rows, 4))
    logits = dec.decode_one(7)  # the pre-bound one-token path
    assert np.array_equal(candidates(dec, logits[None], 3), top_candidates(logits[None], 3))
    assert np.array_equal(candidates(dec, logits[None], 6), top_candidates(logits[None], 6))  # wider: the host


def test_run_spec_and_no_spec(spec_bundle, cli):
    args = ("run", spec_bundle, "-p", PROMPT, "-n", "24", "--json")
    with_spec, without = json.loads(cli(*args).stdout), json.loads(cli(*args, "--no-spec").stdout)
    assert with_spec["drafter"] == "ngram+recycling" and without["drafter"] == ""
    assert with_spec["token_ids"] == without["token_ids"]


def test_bad_drafter_is_one_line(spec_bundle, tiny_llama_dir, tmp_path, cli, one_line_error):
    one_line_error(cli("run", spec_bundle, "-p", "x", "--spec", "medusa"), "unknown drafter 'medusa'")
    one_line_error(cli("compile", tiny_llama_dir, "-o", tmp_path / "b", "--spec", "medusa"),
                   "spec must be one of ngram, recycling, ngram\\+recycling")
    assert not (tmp_path / "b").exists()


def test_bench_spec_measures_both(tiny_llama_bundle, tmp_path, cli):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    r = cli("bench", tiny_llama_bundle, "--prompts", prompts, "--warmup", "0", "--runs", "1", "--new-tokens", "16",
            "--threads", "1", "--spec", "ngram", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    off, on = json.loads((tmp_path / "b.json").read_text())["bundles"]
    assert off["speculation"] is None and off["name"].endswith("(no spec)")
    sp = on["speculation"]
    assert sp["drafter"] == "ngram" and sp["verify_steps"] > 0
    assert 0 <= sp["accepted_tokens"] <= sp["drafted_tokens"]
    assert 0 < sp["model_share"] <= 1 and 0 <= sp["draft_share"] < 1
    assert "draft_cost" in sp and (sp["draft_cost"] is None or sp["draft_cost"] >= 0)
    assert "draft token cost" in r.stdout
    assert on["ratios"]["decode_tok_s"] > 0


def test_bench_warns_when_recycling_picks_candidates_on_the_host(spec_bundle, tiny_llama_bundle, tmp_path, cli):
    from edgedec.bench import spec_warnings

    assert spec_warnings([spec_bundle], "ngram+recycling") == []  # compile --spec added top-candidates
    assert spec_warnings([tiny_llama_bundle], "ngram") == []  # no recycling, nothing to pick
    assert spec_warnings([tmp_path / "missing"], "recycling") == []  # bench refuses it with its own error
    (warning,) = spec_warnings([spec_bundle, tiny_llama_bundle], "ngram+recycling")
    assert "compiled without --spec" in warning and tiny_llama_bundle.name in warning
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    r = cli("bench", tiny_llama_bundle, "--prompts", prompts, "--warmup", "0", "--runs", "1", "--new-tokens", "4",
            "--threads", "1", "--spec", "recycling")
    assert r.exit_code == 0 and "warning:" in r.stderr and "picked on the host" in " ".join(r.stderr.split())


@pytest.mark.parametrize("vocab", [49152, 1024, 96])
def test_top_candidates_are_the_largest_logits_best_first(vocab):
    """The two-pass search (chunk maxima, then the best chunks) returns what a full sort does: the
    ``width`` largest logits' ids, largest first; with ties, logits of the same values."""
    from edgedec.runtime.engine import top_candidates

    rng = np.random.default_rng(7)
    rows = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
    for width in (1, 4, 8):
        np.testing.assert_array_equal(top_candidates(rows, width), np.argsort(-rows, axis=-1)[:, :width])
    rows[:, [5, vocab - 7, vocab // 2]] = 40.0  # a three-way tie at the top, in different chunks
    got = top_candidates(rows, 4)
    np.testing.assert_array_equal(np.take_along_axis(rows, got, -1), -np.sort(-rows, axis=-1)[:, :4])
    assert {5, vocab - 7, vocab // 2} == set(got[0, :3].tolist())
