"""`edgedec eval`: JSON shape, plain output, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgedec.cli import app

runner = CliRunner()


def test_eval_json_with_reference(tiny, text_file):
    _, bundle = tiny
    r = runner.invoke(app, ["eval", str(bundle), "--text", str(text_file), "--window", "64", "--stride", "32",
                            "--reference", str(bundle), "--max-tokens", "200", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"perplexity", "tokens", "reference_perplexity", "perplexity_ratio", "greedy_agreement"} <= d.keys()
    assert d["tokens"] == 199 and d["perplexity"] > 1
    assert d["perplexity_ratio"] == 1.0 and d["greedy_agreement"] == 1.0


def test_eval_plain_output(tiny, text_file):
    _, bundle = tiny
    r = runner.invoke(app, ["eval", str(bundle), "--text", str(text_file), "--text", str(text_file),
                            "--window", "32", "--stride", "32", "--max-tokens", "100"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "windows of 32, stride 32" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--text", "{missing}"], "does not exist"),
    (["--text", "{empty}"], "is empty"),
    (["--text", "{text}", "--window", "1"], "window must be >= 2"),
    (["--text", "{text}", "--window", "16", "--stride", "17"], "stride must be in [1, window=16]"),
    (["--text", "{text}", "--stride", "0"], "stride must be in [1, window=512]"),
    (["--text", "{text}", "--window", "4096"], "window 4096 is larger than the context"),
    (["--text", "{text}", "--reference", "{missing}"], "is not a bundle directory"),
])
def test_eval_errors_are_one_line_exit_2(tiny, text_file, tmp_path, args, message):
    _, bundle = tiny
    (tmp_path / "empty.txt").write_text("")
    subs = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty.txt"), "text": str(text_file)}
    r = runner.invoke(app, ["eval", str(bundle)] + [a.format(**subs) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
