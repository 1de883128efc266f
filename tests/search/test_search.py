"""``edgedec compile --budget``: the search's choice, pruning, the time limit and the exit codes, on the tiny
Llama with every figure measured on the tiny bundles it builds (no mocks; no assertion on a speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgedec.gate import Budget
from edgedec.runtime import Engine
from edgedec.search import Config, SearchOptions, SearchSpace, search

# quick measuring: one timed pass of 4 tokens per prompt, perplexity over 256 tokens
SETTINGS = "[settings]\nruns = 1\nwarmup = 0\nnew_tokens = 4\nmax_tokens = 256\nwindow = 128\nstride = 64\n"
CPU = (Config("cpu", None), Config("cpu", "int8"), Config("cpu", "int4"))


def _budget(tmp_path: Path, limits: str, name: str = "budget.toml") -> Path:
    path = tmp_path / name
    path.write_text(limits + "\n" + SETTINGS)
    return path


@pytest.fixture(scope="module")
def size_search(tiny_llama_dir, tmp_path_factory):
    """A size limit only the int4 bundles fit (tiny Llama: int4 0.13 MB, int8 0.17 MB, fp32 0.45 MB; the
    tokenizer is most of int4's size), with a quality limit so that every candidate is also evaluated."""
    tmp = tmp_path_factory.mktemp("search")
    budget = Budget.load(_budget(tmp, 'max_size = "0.15 MB"\nmax_perplexity_ratio = 1.5'))
    out = tmp / "winner"
    result = search(str(tiny_llama_dir), out, budget, SearchSpace(CPU),
                    SearchOptions(time_limit_s=900, drafters=(("ngram", 2),)))
    return result, out


def test_the_only_kind_that_fits_wins(size_search):
    result, out = size_search
    assert result.winner is not None and result.winner.config.quant == "int4"
    by_name = {c.name: c for c in result.candidates}
    int8 = by_name["cpu int8"]
    assert int8.status == "not met" and int8.measurements["size_mb"] > 0.15
    assert any(b.startswith("max_size") for b in int8.broken)
    for c in result.candidates:  # every built candidate measured: size, speed, quality against the reference
        if c.status in ("met", "not met"):
            assert {"size_mb", "decode_tok_s", "ttft_ms", "peak_rss_mb", "perplexity_ratio",
                    "greedy_agreement"} <= set(c.measurements)
    # the winner is the bundle, and it is what the report says it is
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["search"]["candidate"] == result.winner.name
    assert manifest["target"]["name"] == "cpu" and "int4" in [p["pass"] for p in manifest["passes"]]
    if result.winner.drafter:
        assert manifest["speculation"] == {"drafter": result.winner.drafter, "draft_len": result.winner.draft_len}
    assert list(Engine.load(out, threads=1).generate("def f(x):", max_new_tokens=4))
    assert not out.with_name(f".{out.name}.search").exists()  # the other candidates are gone


def test_what_cannot_fit_is_not_built(size_search):
    result, _ = size_search
    fp32 = next(c for c in result.candidates if c.name == "cpu fp32")
    assert fp32.status == "pruned" and "max_size" in fp32.why
    assert fp32.build_s is None and not fp32.measurements
    assert fp32.predicted_size_mb > 0.15  # the weights alone: 4 bytes a parameter
    report = result.to_dict()
    assert {c["name"]: c["status"] for c in report["candidates"]}["cpu fp32"] == "pruned"


def test_pareto_plot(size_search, tmp_path):
    from edgedec.search import pareto_front, plot

    result, _ = size_search
    front = pareto_front(result.candidates)
    assert front and all("size_mb" in c.measurements for c in front)
    sizes = [c.measurements["size_mb"] for c in front]
    speeds = [c.measurements["decode_tok_s"] for c in front]
    assert sizes == sorted(sizes) and speeds == sorted(speeds)  # bigger only when faster
    path = plot(result, tmp_path / "front.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speculation_is_searched_on_the_built_bundle(size_search):
    """Drafters are tried at run time on a candidate that meets the non-speed limits, beside its plain
    decoding in the same rounds; the row carries the acceptance it measured."""
    result, _ = size_search
    rows = [c for c in result.candidates if c.drafter]
    assert rows and all(r.config.quant == "int4" or r.config.quant == "int8" for r in rows)
    r = rows[0]
    assert r.drafter == "ngram" and r.draft_len == 2
    assert r.measurements["speedup_vs_plain"] > 0 and r.measurements["accepted_per_verify"] is not None
    assert r.measurements["size_mb"] == next(c for c in result.candidates
                                             if c.config == r.config and not c.drafter).measurements["size_mb"]


def test_no_candidate_meets_the_budget_exit_1_names_the_closest(tiny_llama_dir, tmp_path, cli):
    budget = _budget(tmp_path, "min_decode_tok_s = 1e9")
    out = tmp_path / "b"
    r = cli("compile", tiny_llama_dir, "-o", out, "--budget", budget, "--target", "cpu", "-q", "int4",
            "--report", tmp_path / "r.json")
    assert r.exit_code == 1, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["winner"] is None and report["closest"].startswith("cpu int4")
    assert f"closest: {report['closest']}" in " ".join(r.stdout.split())
    assert not out.exists()
    measured = [c for c in report["candidates"] if c["status"] == "not met"]
    assert measured and all(c["broken"][0].startswith("min_decode_tok_s") for c in measured)


def test_time_limit_skips_builds(tiny_llama_dir, tmp_path):
    budget = Budget.load(_budget(tmp_path, 'max_size = "1 GB"'))
    result = search(str(tiny_llama_dir), tmp_path / "b", budget, SearchSpace(CPU),
                    SearchOptions(time_limit_s=1e-9, drafters=()))  # any setup outlasts it
    assert result.winner is None
    assert {c.status for c in result.candidates} == {"skipped"}
    assert all("time limit" in c.why for c in result.candidates)
    assert result.closest is not None and result.closest.config.quant == "int4"  # smallest predicted size


@pytest.mark.parametrize("text, pattern", [
    ("max_sise = '1 MB'", r"unknown key 'max_sise'"),
    ("max_size = 100", r"has no unit"),
    ("min_decode_tok_s = '2x baseline'", r"relative to a baseline; --budget searches absolute limits"),
])
def test_invalid_budget_exit_2(tiny_llama_dir, tmp_path, cli, one_line_error, text, pattern):
    budget = tmp_path / "bad.toml"
    budget.write_text(text + "\n")
    one_line_error(cli("compile", tiny_llama_dir, "-o", tmp_path / "b", "--budget", budget), pattern)
    assert not (tmp_path / "b").exists()


def test_budget_options_need_budget(tiny_llama_dir, tmp_path, cli, one_line_error):
    one_line_error(cli("compile", tiny_llama_dir, "-o", tmp_path / "b", "--time-limit", "5", "--plot",
                       tmp_path / "p.png"), r"--plot goes with --budget")
