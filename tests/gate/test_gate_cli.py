"""`edgedec gate` end to end on the tiny bundles: exit 0 / 1 / 2, the JSON and JUnit reports.

Speed limits here are either relative with factors no run can miss (1e-6x or 1000x the bundle itself
as baseline) or absent: no test depends on how fast this machine is.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from _tiny import copy_bundle, rehash
from edgedec.cli import app
from edgedec.runtime import Bundle

runner = CliRunner()
SETTINGS = '\n[settings]\nwarmup = 0\nruns = 1\nnew_tokens = 3\nthreads = 1\nwindow = 64\nstride = 32\n' \
           'max_tokens = 200\nprompts = "prompts.txt"\n'


@pytest.fixture
def env(tiny, tiny_other, text_file, tmp_path):
    """Paths the budgets refer to, and a helper that writes a budget and runs the gate."""
    (tmp_path / "prompts.txt").write_text("What is a tuple?\n")
    _, bundle = tiny
    _, other = tiny_other

    def gate(budget: str, *args: str, target=None):
        path = tmp_path / "budget.toml"
        path.write_text(budget)
        subs = dict(bundle=str(bundle), other=str(other), text=str(text_file), tmp=str(tmp_path))
        cmd = ["gate", str(target or bundle), "--budget", str(path), *(a.format(**subs) for a in args)]
        return runner.invoke(app, cmd)

    gate.bundle, gate.other, gate.tmp = bundle, other, tmp_path
    gate.size = Bundle.open(bundle).size_bytes()
    return gate


# --- exit 0: every limit holds -----------------------------------------------------------------
@pytest.mark.parametrize("budget,args", [
    ('max_size = "{size_plus} B"', []),
    ('max_size = "10 MB"\nmax_peak_rss = "100 GB"', []),
    ('min_decode_tok_s = "1e-6x baseline"\nmax_ttft = "1e6x baseline"\nmin_prefill_tok_s = "1e-6x baseline"\n'
     'max_size = "1x baseline"', ["--baseline", "{bundle}"]),
    ("max_perplexity_ratio = 1.0\nmax_greedy_disagreement = 0", ["--reference", "{bundle}", "--text", "{text}"]),
    ("max_perplexity = 1e6", ["--text", "{text}"]),
])
def test_pass(env, budget, args):
    r = env(budget.replace("{size_plus}", str(env.size + 1)) + SETTINGS, *args)
    assert r.exit_code == 0, r.output
    assert "gate passed" in r.stdout


# --- exit 1: a limit is broken -----------------------------------------------------------------
@pytest.mark.parametrize("budget,args,broken", [
    ('max_size = "{size_minus} B"', [], ["max_size"]),
    ('max_size = "0.5x baseline"', ["--baseline", "{bundle}"], ["max_size"]),
    ('min_decode_tok_s = "1000x baseline"', ["--baseline", "{bundle}"], ["min_decode_tok_s"]),
    ("max_greedy_disagreement = 0", ["--reference", "{other}", "--text", "{text}"], ["max_greedy_disagreement"]),
    ("max_perplexity = 1.0", ["--text", "{text}"], ["max_perplexity"]),
    ('max_size = "10 MB"\nmax_ttft = "1e-6x baseline"', ["--baseline", "{bundle}"], ["max_ttft"]),
])
def test_fail(env, budget, args, broken):
    out = env.tmp / "report.json"
    r = env(budget.replace("{size_minus}", str(env.size - 1)) + SETTINGS, *args, "--json", str(out))
    assert r.exit_code == 1, r.output
    assert "gate failed" in r.stdout and "FAIL" in r.stdout
    report = json.loads(out.read_text())  # written even when the gate fails
    assert report["passed"] is False
    assert [l["key"] for l in report["limits"] if not l["passed"]] == broken


def test_a_bundle_that_grew_past_its_budget_fails(env):
    grown = copy_bundle(env.bundle, env.tmp / "grown")
    with open(grown / "tokenizer.json", "a") as f:
        f.write(" " * 100_000)  # still valid JSON, 100 kB bigger
    rehash(grown)
    Bundle.open(grown)  # a valid bundle, just bigger
    budget = f'max_size = "{(env.size + 10_000) / 1e6} MB"\n'
    assert env(budget).exit_code == 0
    r = env(budget, target=grown)
    assert r.exit_code == 1, r.output
    assert "max_size" in r.stdout and "FAIL" in r.stdout


# --- exit 2: the budget, a bundle or a text is invalid -----------------------------------------
@pytest.mark.parametrize("budget,args,message", [
    ('max_sise = "1 MB"', [], "unknown key 'max_sise'; valid keys: max_size, max_peak_rss"),
    ("max_size = 300", [], "max_size = 300 has no unit"),
    ('max_size = "300 parsecs"', [], "has an unknown unit 'parsecs'"),
    ('max_ttft = "soon"', [], "is not a time with a unit"),
    ('max_size = "300 MB', [], "is not valid TOML"),
    ("", [], "states no limits"),
    ('max_size = "1 MB"\n[settings]\nrunz = 1', [], "unknown key 'runz'"),
    ('min_decode_tok_s = "0.9x baseline"', [], "is relative to a baseline; pass --baseline BUNDLE"),
    ("max_perplexity_ratio = 1.05", ["--text", "{text}"], "pass --reference BUNDLE"),
    ("max_greedy_disagreement = 0.1", ["--reference", "{bundle}"], "pass --text FILE"),
    ("max_perplexity = 10", ["--text", "{tmp}/missing.txt"], "missing.txt does not exist"),
    ('max_size = "1 MB"\nmax_ttft = "1 s"\n[settings]\nprompts = "nope.txt"', [], "nope.txt does not exist"),
    ('max_size = "0.5x baseline"', ["--baseline", "{tmp}/no-bundle"], "is not a bundle directory"),
    ("max_perplexity_ratio = 2", ["--text", "{text}", "--reference", "{tmp}/no-bundle"], "is not a bundle directory"),
])
def test_invalid(env, budget, args, message):
    r = env(budget, *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_missing_budget_file(env):
    r = runner.invoke(app, ["gate", str(env.bundle), "--budget", str(env.tmp / "missing.toml")])
    assert r.exit_code == 2 and "budget file" in r.stderr and "does not exist" in r.stderr


def test_corrupted_bundle(env):
    bad = copy_bundle(env.bundle, env.tmp / "corrupt")
    with open(bad / "tokenizer.json", "a") as f:
        f.write(" ")  # size no longer matches the manifest
    r = env('max_size = "10 MB"', target=bad)
    assert r.exit_code == 2
    assert "tokenizer.json has" in r.stderr and "manifest says" in r.stderr
    r = env('max_size = "10 MB"', target=env.tmp / "missing")
    assert r.exit_code == 2 and "is not a bundle directory" in r.stderr


# --- reports -----------------------------------------------------------------------------------
def test_junit_has_one_testcase_per_limit(env):
    junit, out = env.tmp / "reports" / "gate.xml", env.tmp / "reports" / "gate.json"
    budget = ('max_size = "10 MB"\nmax_peak_rss = "100 GB"\nmin_decode_tok_s = "1000x baseline"\n'
              "max_perplexity_ratio = 1.0\nmax_greedy_disagreement = 0\n" + SETTINGS)
    r = env(budget, "--baseline", "{bundle}", "--reference", "{other}", "--text", "{text}",
            "--junit", str(junit), "--json", str(out))
    assert r.exit_code == 1, r.output
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["max_size", "max_peak_rss", "min_decode_tok_s", "max_perplexity_ratio",
                                              "max_greedy_disagreement"]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert "min_decode_tok_s" in failed and "max_greedy_disagreement" in failed
    assert "max_size" not in failed and "max_peak_rss" not in failed
    assert suite.get("tests") == "5" and suite.get("failures") == str(len(failed))
    failure = cases[2].find("failure")
    assert "min_decode_tok_s: measured" in failure.get("message") and "1000x baseline" in failure.get("message")

    report = json.loads(out.read_text())
    assert report["passed"] is False and len(report["limits"]) == 5
    by_key = {l["key"]: l for l in report["limits"]}
    assert by_key["min_decode_tok_s"]["baseline"] > 0
    assert by_key["min_decode_tok_s"]["threshold"] == pytest.approx(1000 * by_key["min_decode_tok_s"]["baseline"])
    assert by_key["max_size"]["unit"] == "MB" and by_key["max_size"]["threshold"] == 10.0
    m = report["measurements"]
    assert m["greedy_disagreement"] == pytest.approx(1 - m["greedy_agreement"])
    assert set(report["baseline_measurements"]) >= {"decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_mb"}


def test_measures_only_what_the_budget_asks_for(env, caplog):
    out = env.tmp / "gate.json"
    r = env('max_size = "10 MB"', "--baseline", "{bundle}", "--reference", "{other}", "--json", str(out))
    assert r.exit_code == 0, r.output
    assert "--baseline is not used" in caplog.text and "--reference is not used" in caplog.text
    report = json.loads(out.read_text())
    assert set(report["measurements"]) == {"size_mb"}
    assert report["baseline"] is None and report["baseline_measurements"] == {} and report["reference"] is None


def test_ci_budget_runs_on_the_tiny_bundle(env):
    """The CI smoke gate (benchmarks/ci-budget.toml) measures all four limits; size and memory hold.

    Whether the speed limits hold depends on the machine, so this test does not assert it.
    """
    from pathlib import Path

    from edgedec.gate import Budget, run_gate

    budget = Budget.load(Path(__file__).resolve().parents[2] / "benchmarks" / "ci-budget.toml")
    report = run_gate(env.bundle, budget)
    results = {r.key: r for r in report.results}
    assert set(results) == {"max_size", "max_peak_rss", "min_decode_tok_s", "max_ttft"}
    assert results["max_size"].passed and results["max_peak_rss"].passed
    assert results["min_decode_tok_s"].measured > 0 and results["max_ttft"].measured > 0


def test_a_nan_measurement_never_passes(env, monkeypatch):
    from types import SimpleNamespace

    from edgedec import evaluate
    from edgedec.gate import parse_budget, run_gate

    nan = SimpleNamespace(perplexity=float("nan"), tokens=10)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: nan)
    report = run_gate(env.bundle, parse_budget({"max_perplexity": 1e9}), texts=[env.tmp / "prompts.txt"])
    assert not report.passed and report.results[0].passed is False
