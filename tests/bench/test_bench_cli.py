"""`edgedec bench`: table, --json file, --plot PNG, errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgedec.cli import app

runner = CliRunner()
FAST = ["--warmup", "0", "--runs", "1", "--new-tokens", "3", "--threads", "1"]


def test_bench_json_and_plot(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    _, bundle = tiny
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    r = runner.invoke(app, ["bench", str(bundle), "--prompts", str(prompts), *FAST,
                            "--json", str(tmp_path / "out" / "bench.json"), "--plot", str(tmp_path / "bench.png")])
    assert r.exit_code == 0, r.output
    assert "decode tok/s" in r.stdout and "peak RSS MB" in r.stdout
    d = json.loads((tmp_path / "out" / "bench.json").read_text())
    b = d["bundles"][0]
    for key in ("decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_mb", "size_mb", "decode_tok_s_min",
                "decode_tok_s_max", "ttft_ms_min", "ttft_ms_max", "prefill_tok_s_min", "prefill_tok_s_max"):
        assert b[key] > 0, key
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_json_to_stdout(tiny, tmp_path):
    _, bundle = tiny
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    r = runner.invoke(app, ["bench", str(bundle), "--prompts", str(prompts), *FAST, "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout[r.stdout.index('{\n  "edgedec_bench"'):])
    assert d["settings"]["runs"] == 1


@pytest.mark.parametrize("args,message", [
    (["--runs", "0"], "runs must be >= 1"),
    (["--new-tokens", "1"], "new_tokens must be >= 2"),
    (["--plot", "{tmp}/chart.jpg"], "ending in .png"),
    (["--prompts", "{tmp}/missing.txt"], "does not exist"),
])
def test_bench_errors(tiny, tmp_path, args, message):
    _, bundle = tiny
    r = runner.invoke(app, ["bench", str(bundle)] + [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.strip().startswith("error:")


def test_bench_missing_bundle(tmp_path):
    r = runner.invoke(app, ["bench", str(tmp_path / "nope")])
    assert r.exit_code == 2
    assert "is not a bundle directory" in r.stderr
