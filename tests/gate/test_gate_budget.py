"""edgedec.gate budgets: every value form that parses, every one that must not, and input checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedec.errors import BudgetError
from edgedec.gate import LIMITS, Budget, GateSettings, _check_inputs, parse_budget

ROOT = Path(__file__).resolve().parents[2]


def one(key, value):
    budget = parse_budget({key: value}, "b.toml")
    (limit,) = budget.limits
    return limit


@pytest.mark.parametrize("key,value,expected", [
    ("max_size", "300 MB", 300.0),
    ("max_size", "300MB", 300.0),
    ("max_size", "1.5 GB", 1500.0),
    ("max_size", "1 GiB", 2**30 / 1e6),
    ("max_size", "512 KiB", 512 * 1024 / 1e6),
    ("max_size", "250 kB", 0.25),
    ("max_size", "1000000 B", 1.0),
    ("max_peak_rss", "2 MiB", 2 * 2**20 / 1e6),
    ("max_ttft", "50 ms", 50.0),
    ("max_ttft", "0.2 s", 200.0),
    ("min_decode_tok_s", 100, 100.0),
    ("min_decode_tok_s", 12.5, 12.5),
    ("min_decode_tok_s", "100 tok/s", 100.0),
    ("min_prefill_tok_s", "1e3", 1000.0),
    ("max_perplexity", 20, 20.0),
    ("max_perplexity_ratio", 1.05, 1.05),
    ("max_greedy_disagreement", "5%", 0.05),
    ("max_greedy_disagreement", 0.05, 0.05),
    ("max_greedy_disagreement", 0, 0.0),
])
def test_absolute_values(key, value, expected):
    limit = one(key, value)
    assert not limit.relative
    assert limit.value == pytest.approx(expected)
    assert limit.threshold(None) == pytest.approx(expected)


@pytest.mark.parametrize("value,factor", [("0.9x baseline", 0.9), ("2.5 x baseline", 2.5), ("2.5× baseline", 2.5),
                                          ("1X Baseline", 1.0)])
@pytest.mark.parametrize("key", ["max_size", "max_peak_rss", "min_decode_tok_s", "max_ttft", "min_prefill_tok_s"])
def test_relative_values(key, value, factor):
    limit = one(key, value)
    assert limit.relative and limit.value == factor
    assert limit.threshold(40.0) == pytest.approx(40.0 * factor)


@pytest.mark.parametrize("key,value,match", [
    ("max_size", 300, r"max_size = 300 has no unit; write a size with a unit, e.g. \"300 MB\""),
    ("max_size", "300", "has no unit"),
    ("max_size", "300 ms", "has an unknown unit 'ms'"),
    ("max_size", "300 Mbit", "has an unknown unit 'Mbit'"),
    ("max_size", "big", "is not a size with a unit"),
    ("max_size", "-3 MB", "is not a size with a unit"),
    ("max_size", "0 MB", "must be > 0"),
    ("max_size", True, "is not a size"),
    ("max_size", ["300 MB"], "is not a size"),
    ("max_ttft", 50, "has no unit"),
    ("max_ttft", "50 MB", "has an unknown unit 'MB'"),
    ("min_decode_tok_s", "100 tokens", "has an unknown unit 'tokens'"),
    ("min_decode_tok_s", "fast", "is not tokens per second"),
    ("min_decode_tok_s", 0, "must be > 0"),
    ("min_decode_tok_s", "0x baseline", "the factor must be > 0"),
    ("max_perplexity_ratio", "1.05x baseline", "cannot be relative to a baseline"),
    ("max_perplexity_ratio", "1.05 MB", "takes no unit"),
    ("max_perplexity", float("inf"), "is not a finite number"),
    ("max_greedy_disagreement", 1.5, r"is not a fraction in \[0, 1\]"),
    ("max_greedy_disagreement", "150%", r"is not a fraction in \[0, 1\]"),
    ("max_greedy_disagreement", "5 MB", "has an unknown unit 'MB'"),
])
def test_invalid_values(key, value, match):
    with pytest.raises(BudgetError, match=match) as info:
        one(key, value)
    assert str(info.value).startswith(f"b.toml: {key} = ")


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(BudgetError) as info:
        parse_budget({"max_size": "1 MB", "max_sise": "1 MB"}, "b.toml")
    msg = str(info.value)
    assert "unknown key 'max_sise'" in msg
    for key in LIMITS:
        assert key in msg
    assert "[settings]" in msg


def test_no_limits_is_not_a_pass():
    with pytest.raises(BudgetError, match="states no limits"):
        parse_budget({}, "b.toml")
    with pytest.raises(BudgetError, match="states no limits"):
        parse_budget({"settings": {"runs": 2}}, "b.toml")


def test_settings(tmp_path):
    budget = parse_budget({"max_size": "1 MB", "settings": {"runs": 5, "warmup": 0, "new_tokens": 8, "threads": 2,
                                                            "window": 64, "stride": 32, "max_tokens": 1000,
                                                            "prompts": "p.jsonl"}}, tmp_path / "b.toml")
    assert budget.settings == GateSettings(prompts=tmp_path / "p.jsonl", warmup=0, runs=5, new_tokens=8, threads=2,
                                           window=64, stride=32, max_tokens=1000)
    assert parse_budget({"max_size": "1 MB"}).settings == GateSettings()


@pytest.mark.parametrize("settings,match", [
    ({"runz": 3}, r"\[settings\]: unknown key 'runz'; valid keys: prompts, warmup, runs"),
    ({"runs": 0}, r"\[settings\]: runs must be >= 1"),
    ({"runs": "3"}, r"\[settings\]: runs = '3' is not an integer"),
    ({"runs": 2.5}, "is not an integer"),
    ({"threads": True}, "is not an integer"),
    ({"window": 64, "stride": 65}, r"stride must be in \[1, window=64\]"),
    ({"new_tokens": 1}, "new_tokens must be >= 2"),
    ({"prompts": 3}, "is not a file name"),
])
def test_invalid_settings(settings, match):
    with pytest.raises(BudgetError, match=match):
        parse_budget({"max_size": "1 MB", "settings": settings}, "b.toml")


def test_settings_must_be_a_table():
    with pytest.raises(BudgetError, match="settings must be a table"):
        parse_budget({"max_size": "1 MB", "settings": 3}, "b.toml")


def test_load_from_file(tmp_path):
    p = tmp_path / "budget.toml"
    p.write_text('max_size = "300 MB"\nmin_decode_tok_s = "0.9x baseline"\n\n[settings]\nruns = 2\n')
    budget = Budget.load(p)
    assert [l.spec.key for l in budget.limits] == ["max_size", "min_decode_tok_s"]
    assert budget.settings.runs == 2 and budget.needs("bench") and budget.needs("size")
    assert [l.spec.key for l in budget.relative] == ["min_decode_tok_s"]


def test_load_errors(tmp_path):
    with pytest.raises(BudgetError, match="does not exist"):
        Budget.load(tmp_path / "missing.toml")
    p = tmp_path / "bad.toml"
    p.write_text('max_size = "300 MB\n')
    with pytest.raises(BudgetError, match="is not valid TOML"):
        Budget.load(p)


@pytest.mark.parametrize("budget,args,match", [
    ({"max_size": "0.5x baseline"}, {}, r"max_size = '0.5x baseline' is relative to a baseline; pass --baseline"),
    ({"max_perplexity": 10}, {}, "max_perplexity needs text to evaluate on; pass --text"),
    ({"max_perplexity_ratio": 1.1}, {"texts": ["t"]}, "compares with a reference; pass --reference"),
    ({"max_greedy_disagreement": 0.1}, {"reference": "r"}, "needs text to evaluate on"),
])
def test_missing_inputs(budget, args, match):
    b = parse_budget(budget, "b.toml")
    with pytest.raises(BudgetError, match=match):
        _check_inputs(b, args.get("baseline"), args.get("reference"), args.get("texts", []))


def test_ci_budget_parses():
    budget = Budget.load(ROOT / "benchmarks" / "ci-budget.toml")
    assert {l.spec.key for l in budget.limits} == {"max_size", "max_peak_rss", "min_decode_tok_s", "max_ttft"}
    assert not budget.relative and not budget.needs("reference") and not budget.needs("text")
