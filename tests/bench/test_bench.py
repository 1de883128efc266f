"""edgedec.bench: prompt files, the runtime-only worker, the report's shape and values, the plot.

No timing assertions: speeds are only checked to be positive and ordered min <= median <= max.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from _tiny import copy_bundle, edit_manifest
from edgedec import bench
from edgedec.errors import BundleError, ConfigError, GenerationError, MeasurementError
from edgedec.runtime import Bundle, Engine

FAST = bench.BenchOptions(warmup=1, runs=2, new_tokens=4, threads=1)
PROMPTS = ["What is a tuple?", "def add(a, b):"]


# --- prompt files ------------------------------------------------------------------------------
def test_plain_prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("first prompt\n\n  \nsecond {not json}\n")
    assert bench.load_prompts(p) == ["first prompt", "second {not json}"]


def test_jsonl_prompt_file(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    for name in ("prompts.jsonl", "prompts.txt"):  # by extension, or by a first line that is a JSON object
        p = tmp_path / name
        p.write_text(json.dumps(chat) + "\n\n" + json.dumps({"prompt": "plain"}) + "\n")
        assert bench.load_prompts(p) == [chat, "plain"]


@pytest.mark.parametrize("content,match", [
    ('{"messages": []}\n', r"prompts.jsonl:1: \"messages\" must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', r"prompts.jsonl:1: \"messages\" must be"),
    ('{"prompt": "ok"}\n{"messages": [\n', r"prompts.jsonl:2: not valid JSON"),
    ('{"text": "x"}\n', r"prompts.jsonl:1: expected a JSON object with \"messages\""),
    ('"just a string"\n', r"prompts.jsonl:1: expected a JSON object"),
    ("\n \n", "has no prompts"),
])
def test_bad_prompt_files(tmp_path, content, match):
    p = tmp_path / "prompts.jsonl"
    p.write_text(content)
    with pytest.raises(ConfigError, match=match):
        bench.load_prompts(p)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        bench.load_prompts(tmp_path / "nope.txt")


def test_prompt_directory_gives_one_category_per_file(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    (tmp_path / "b_questions.jsonl").write_text(json.dumps(chat) + "\n"
                                                + json.dumps({"prompt": "What is rain?"}) + "\n")
    (tmp_path / "a_code.txt").write_text("def f(x):\n")
    (tmp_path / "notes.md").write_text("not a prompt file\n")
    prompts, categories = bench.load_prompt_set(tmp_path)
    assert prompts == ["def f(x):", chat, "What is rain?"]  # files in name order
    assert categories == ["a_code", "b_questions", "b_questions"]
    assert bench.load_prompts(tmp_path) == prompts
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no .jsonl, .ndjson, .txt files"):
        bench.load_prompt_set(tmp_path / "empty")


def test_jsonl_lines_may_carry_a_category(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"prompt": "a", "category": "code"}\n{"prompt": "b"}\n')
    assert bench.load_prompt_set(p) == (["a", "b"], ["code", "other"])
    p.write_text('{"prompt": "a"}\n')
    assert bench.load_prompt_set(p) == (["a"], None)
    p.write_text('{"prompt": "a", "category": 3}\n')
    with pytest.raises(ConfigError, match=r"mixed.jsonl:1: \"category\" must be a non-empty string"):
        bench.load_prompt_set(p)


def test_builtin_prompts_cover_questions_code_and_summaries():
    ps = bench.BUILTIN_PROMPTS
    assert len(ps) >= 5 and all(isinstance(p, str) and p for p in ps)
    assert any(p.rstrip().endswith("?") for p in ps)
    assert any("def " in p for p in ps)
    assert any(p.lower().startswith("summarise") for p in ps)


@pytest.mark.parametrize("kwargs,match", [
    (dict(warmup=-1), "warmup must be >= 0"),
    (dict(runs=0), "runs must be >= 1"),
    (dict(new_tokens=1), "new_tokens must be >= 2"),
    (dict(threads=0), "threads must be >= 1"),
])
def test_invalid_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bench.BenchOptions(**kwargs)


# --- measuring ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    _, bundle = tiny
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    return bench.bench([bundle, bundle], prompts, FAST)


def test_report_has_required_keys_and_sane_values(report, tiny):
    _, bundle = tiny
    d = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable
    assert d["settings"] == {"warmup": 1, "runs": 2, "new_tokens": 4, "threads": 1, "context": None,
                             "context_tokens": None, "prompts": 2, "prompt_source": d["settings"]["prompt_source"]}
    assert len(d["bundles"]) == 2
    size_mb = Bundle.open(bundle).size_bytes() / 1e6
    for b in d["bundles"]:
        for m in ("decode_tok_s", "ttft_ms", "prefill_tok_s"):
            assert 0 < b[f"{m}_min"] <= b[m] <= b[f"{m}_max"], m
        assert len(b["runs"]) == 2
        assert b["peak_rss_mb"] > 0 and b["size_mb"] == pytest.approx(size_mb)
        assert b["threads"] == 1 and b["speculation"] is None
        assert b["kv_bytes_per_token"] == Bundle.open(bundle).manifest["kv_cache"]["bytes_per_token"] > 0
        assert b["new_tokens"] == 2 * 4  # ignore_eos: every prompt makes exactly new_tokens
        assert set(b["ratios"]) == {"decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_mb", "size_mb"}
    assert d["bundles"][0]["ratios"] == {k: 1.0 for k in d["bundles"][0]["ratios"]}
    assert d["bundles"][0]["round_ratios"] == {m: {"median": 1.0, "min": 1.0, "max": 1.0}
                                               for m in ("decode_tok_s", "ttft_ms", "prefill_tok_s")}
    by_round = [p["decode_tok_s"] / q["decode_tok_s"]
                for p, q in zip(report.bundles[1].passes, report.bundles[0].passes)]
    assert d["bundles"][1]["round_ratios"]["decode_tok_s"] == {
        "median": pytest.approx(statistics.median(by_round)), "min": min(by_round), "max": max(by_round)}
    assert d["bundles"][1]["ratios"]["size_mb"] == 1.0
    assert [b["name"] for b in d["bundles"]] == ["bundle (1)", "bundle (2)"]


@pytest.mark.parametrize("interleave", [True, False])
def test_bundles_take_turns_in_rounds(tiny, tmp_path, monkeypatch, interleave):
    """Interleaved: every worker is loaded, each round runs one pass of each (the first rotates).
    Sequential: one bundle's passes, then the next's, one worker alive at a time."""
    _, bundle = tiny
    second = copy_bundle(bundle, tmp_path / "second")
    calls, alive = [], []
    one_pass, init = bench.Worker.one_pass, bench.Worker.__init__

    def recording_init(self, request, *args, **kwargs):
        init(self, request, *args, **kwargs)
        alive.append(self)

    def recording_pass(self, measured):
        calls.append((self.label, measured, sum(w.proc.poll() is None for w in alive)))
        return one_pass(self, measured)

    monkeypatch.setattr(bench.Worker, "__init__", recording_init)
    monkeypatch.setattr(bench.Worker, "one_pass", recording_pass)
    options = bench.BenchOptions(warmup=1, runs=2, new_tokens=3, threads=1, interleave=interleave)
    report = bench.bench([bundle, second], None, options)
    a, b = str(bundle), str(second)
    if interleave:
        assert [(c[0], c[1]) for c in calls] == [(a, False), (b, False), (b, True), (a, True), (a, True), (b, True)]
        assert {c[2] for c in calls} == {2}
    else:
        assert [(c[0], c[1]) for c in calls] == [(a, False), (a, True), (a, True), (b, False), (b, True), (b, True)]
        assert {c[2] for c in calls} == {1}
    assert all(w.proc.poll() is not None for w in alive)  # every worker finished
    assert [len(x.passes) for x in report.bundles] == [2, 2]
    rr = report.to_dict()["bundles"][1]["round_ratios"]
    assert (rr is not None) == interleave  # rounds pair passes in time only when interleaved


def test_prompt_tokens_match_the_runtime_tokenizer(report, tiny):
    _, bundle = tiny
    engine = Engine.load(bundle)
    assert report.bundles[0].prompt_tokens == sum(len(engine.encode(p)) for p in PROMPTS)


def test_chat_prompts_use_the_chat_template(tiny, tmp_path):
    _, bundle = tiny
    chat = [{"role": "user", "content": "What is a tuple?"}]
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": chat}) + "\n")
    b = bench.measure(bundle, bench.load_prompts(p), bench.BenchOptions(warmup=0, runs=1, new_tokens=3, threads=1))
    engine = Engine.load(bundle)
    templated = engine.codec.encode(engine.codec.apply_chat_template(chat), add_special_tokens=False)
    assert b.prompt_tokens == len(templated) and b.new_tokens == 3


def test_errors_inside_the_worker_keep_their_type(tiny, tmp_path):
    _, bundle = tiny
    plain = copy_bundle(bundle, tmp_path / "no-template")
    edit_manifest(plain, lambda m: m["tokenizer"].update(chat_template=None))
    with pytest.raises(GenerationError, match="no chat template"):
        bench.measure(plain, [{"messages": [{"role": "user", "content": "hi"}]}], FAST)


def test_invalid_bundle_is_refused_before_any_worker(tiny, tmp_path):
    _, bundle = tiny
    broken = copy_bundle(bundle, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="tokenizer.json"):
        bench.bench([bundle, broken], None, FAST)
    with pytest.raises(BundleError, match="not a bundle directory"):
        bench.bench([tmp_path / "missing"], None, FAST)


def test_a_crashed_worker_is_a_measurement_error(tiny, monkeypatch):
    _, bundle = tiny
    monkeypatch.setattr(bench, "worker_command",
                        lambda: [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(7)"])
    with pytest.raises(MeasurementError, match="exited with code 7: boom"):
        bench.measure(bundle, PROMPTS, FAST)


def test_a_hung_worker_is_killed_once_it_is_far_slower_than_its_first_pass(tiny):
    """After the first pass, a worker that stops answering is reported as stalled and killed (here it is
    frozen with SIGSTOP), instead of being waited on for the full hour."""
    import os
    import signal

    _, bundle = tiny
    request = {"bundle": str(bundle), "prompts": PROMPTS, "new_tokens": 2, "threads": 1, "drafter": None}
    worker = bench.Worker(request, timeout_s=60, stall_floor_s=1.0)  # without the watchdog: "ran past 60s"
    try:
        worker.one_pass(measured=False)
        assert worker.first_pass_s is not None
        os.kill(worker.proc.pid, signal.SIGSTOP)
        with pytest.raises(MeasurementError, match=r"gave no reply in \d+s, 10x its first pass .*stalled"):
            worker.one_pass(measured=True)
        assert worker.proc.poll() == -signal.SIGKILL
    finally:
        worker.close()


def test_worker_imports_neither_torch_nor_transformers(tiny, tmp_path):
    """Shadow torch and transformers with packages that leave a mark when imported, then run a worker."""
    _, bundle = tiny
    shadow, marks = tmp_path / "shadow", tmp_path / "marks"
    marks.mkdir()
    for name in ("torch", "transformers"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(
            f"open({str(marks / name)!r}, 'w').close()\nraise ImportError('{name} imported by the worker')\n")
    env = {"PYTHONPATH": str(shadow), "PATH": "/usr/bin:/bin"}
    # the shadow works: a plain `import torch` through it leaves its mark
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0 and (marks / "torch").exists()
    (marks / "torch").unlink()

    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(json.dumps({"bundle": str(bundle), "prompts": PROMPTS, "warmup": 0, "runs": 1,
                                   "new_tokens": 3, "threads": 1, "context": None}))
    proc = subprocess.run(bench.worker_command() + [str(request), str(result)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(marks.iterdir()) == []
    out = json.loads(result.read_text())
    assert out["peak_rss_bytes"] > 0 and len(out["runs"]) == 1 and len(out["runs"][0]) == len(PROMPTS)


def test_peak_rss_reads_this_process():
    from edgedec.bench_worker import peak_rss_bytes

    assert peak_rss_bytes() > 10e6  # a Python process with numpy loaded is well above 10 MB


def test_plot_is_a_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    out = bench.plot(report, tmp_path / "plots" / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_other_formats(report, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigError, match="ending in .png"):
        bench.plot(report, tmp_path / "bench.svg")


def test_every_pass_starts_with_a_cold_drafter(tiny):
    """Replayed prompts must not draft from the previous pass's record of the same greedy output."""
    from edgedec.bench_worker import Session

    _, bundle = tiny
    session = Session({"bundle": str(bundle), "prompts": PROMPTS, "new_tokens": 32, "threads": 1,
                       "drafter": "recycling", "draft_len": 4})
    session.kwargs["adaptive_draft"] = False  # a fixed draft length: acceptance depends on the tokens alone
    for _ in range(2):
        session.one_pass(measured=True)
    first, second = session.stats[: len(PROMPTS)], session.stats[len(PROMPTS):]
    assert sum(s.verify_steps for s in first) > 0
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    assert ([(s.verify_steps, s.accepted_tokens) for s in first]
            == [(s.verify_steps, s.accepted_tokens) for s in second])


def test_categories_are_reported_apart_from_the_same_passes(tiny, tmp_path):
    """bench --spec with a prompts directory: per category, the decode speed of the same timed passes
    restricted to its prompts, its ratio round by round, and the accepted drafts of its prompts."""
    _, bundle = tiny
    (tmp_path / "code.txt").write_text("def add(a, b):\ndef mul(a, b):\n")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. The quick brown fox\n")
    options = bench.BenchOptions(warmup=0, runs=2, new_tokens=24, threads=1, spec="recycling")
    report = bench.bench([bundle], tmp_path, options)
    assert report.categories == ["code", "code", "text"]
    off, on = report.bundles
    d = json.loads(json.dumps(report.to_dict()))["bundles"]
    for b, row in zip((off, on), d):
        cats = row["categories"]
        assert list(cats) == ["code", "text"] and cats["code"]["prompts"] == 2
        for name, idx in (("code", [0, 1]), ("text", [2])):
            speeds = [bench._pass_figures([run[i] for i in idx])["decode_tok_s"] for run in b.prompt_runs]
            assert cats[name]["decode_tok_s"] == statistics.median(speeds)
            assert cats[name]["decode_tok_s_min"] == min(speeds) and cats[name]["decode_tok_s_max"] == max(speeds)
    assert d[0]["categories"]["text"]["mean_accepted_per_step"] is None  # no drafter
    text = d[1]["categories"]["text"]
    steps = sum(run[2]["verify_steps"] for run in on.prompt_runs)
    assert steps > 0, [r[2] for r in on.prompt_runs]
    assert text["mean_accepted_per_step"] == sum(run[2]["accepted_tokens"] for run in on.prompt_runs) / steps
    base = [bench._pass_figures([run[2]])["decode_tok_s"] for run in off.prompt_runs]
    mine = [bench._pass_figures([run[2]])["decode_tok_s"] for run in on.prompt_runs]
    assert text["round_ratio"]["median"] == statistics.median(x / y for x, y in zip(mine, base))
    assert report.to_dict()["bundles"][0]["categories"]["code"]["round_ratio"] is not None  # base vs itself: 1.0
