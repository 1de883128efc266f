"""Exit codes for ordinary bad input (issue 21, items 5-7): one line on stderr and exit 2, never 3; a
closed stdout ends quietly (141); work is bounded (threads capped at the machine's cores, chat
templates in a bounded sandbox)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgedec.errors import BudgetError, ConfigError
from edgedec.runtime import Engine

ROOT = Path(__file__).resolve().parents[2]


def edgedec(*args, stdin=None, stdout=subprocess.PIPE, timeout=300) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (argv bytes and stdin bytes as given)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "edgedec.cli", *[a if isinstance(a, bytes) else str(a) for a in args]]
    return subprocess.run(argv, input=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, pattern: str, code: int = 2) -> None:
    import re

    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == code, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), err


def set_template(bundle: Path, template: str) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["tokenizer"]["chat_template"] = template
    path.write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------
# run: stdin, argv, seed, broken pipe
# ---------------------------------------------------------------------------------------------
def test_binary_stdin_is_bad_input(tiny_llama_bundle):
    noise = bytes(range(256)) * 12  # like head -c3000 /dev/urandom: not UTF-8
    one_line(edgedec("run", tiny_llama_bundle, "-", "-n", "2", "--threads", "1", stdin=noise),
             r"stdin is not UTF-8 text \(byte 0x80 at offset 128\)")
    one_line(edgedec("run", tiny_llama_bundle, "-", "-n", "2", "--threads", "1", stdin=b"abc\x00def"),
             r"stdin looks binary \(a NUL byte at offset 3\)")


def test_lone_surrogate_in_argv_is_bad_input(tiny_llama_bundle):
    """Undecodable argv bytes reach Python as lone surrogates; the prompt is refused, not crashed on."""
    one_line(edgedec("run", tiny_llama_bundle, b"\xff\xfe hello", "-n", "2", "--threads", "1"),
             r"the prompt is not valid Unicode: a lone surrogate '\\udcff' at character 0")
    one_line(edgedec("run", tiny_llama_bundle, b"hi \xff", "--chat", "-n", "2", "--threads", "1"),
             r"the 'user' message is not valid Unicode")


def test_negative_seed_is_bad_input(tiny_llama_bundle, cli, one_line_error):
    one_line_error(cli("run", tiny_llama_bundle, "hi", "--seed", "-1", "--temperature", "1", "--threads", "1"),
                   r"seed must be an integer in \[0, 2\*\*128\), got -1")


def test_closed_stdout_exits_quietly_with_141(tiny_llama_bundle):
    """`edgedec run ... | head -c 1`: the reader is gone; exit 128 + SIGPIPE, nothing on stderr."""
    read, write = os.pipe()
    os.close(read)  # the reader has already gone: the first write fails
    try:
        proc = edgedec("run", tiny_llama_bundle, "def f(x):", "-n", "8", "--threads", "1", stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr.decode().strip() == ""


# ---------------------------------------------------------------------------------------------
# output paths: directories, unwritable, not UTF-8
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def size_budget(tmp_path) -> Path:
    path = tmp_path / "budget.toml"
    path.write_text('max_size = "300 MB"\n')
    return path


def test_report_paths_that_are_directories_are_refused_before_any_work(tiny_llama_bundle, size_budget, tmp_path,
                                                                       cli, one_line_error, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("measured before the report path was checked")

    monkeypatch.setattr("edgedec.gate.run_gate", no_work)
    monkeypatch.setattr("edgedec.bench.bench", no_work)
    one_line_error(cli("gate", tiny_llama_bundle, "--budget", size_budget, "--json", tmp_path),
                   r"--json .* is a directory; give a file name")
    one_line_error(cli("gate", tiny_llama_bundle, "--budget", size_budget, "--junit", tmp_path),
                   r"--junit .* is a directory")
    one_line_error(cli("bench", tiny_llama_bundle, "--json", tmp_path, "--runs", "1"), r"--json .* is a directory")
    (tmp_path / "file").write_text("x")
    one_line_error(cli("gate", tiny_llama_bundle, "--budget", size_budget, "--json", tmp_path / "file" / "r.json"),
                   r"--json .*: .*file is not a directory")
    real_access = os.access
    monkeypatch.setattr("edgedec.cli.os.access",  # a read-only file system: nothing is writable
                        lambda path, mode: False if mode & os.W_OK else real_access(path, mode))
    one_line_error(cli("gate", tiny_llama_bundle, "--budget", size_budget, "--json", tmp_path / "r.json"),
                   r"cannot be written \(permission denied or a read-only file system\)")


def test_a_failed_report_write_is_one_line(tiny_llama_bundle, size_budget, tmp_path, cli, one_line_error,
                                           monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    r = cli("gate", tiny_llama_bundle, "--budget", size_budget, "--json", tmp_path / "r.json")
    assert r.exit_code == 2, r.stderr  # the progress line of the measurement, then the error
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot write {tmp_path / 'r.json'}: Read-only file system"
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("*.tmp"))


def test_report_paths_that_are_not_utf8_work(tiny_llama_bundle, size_budget, tmp_path):
    target = os.fsencode(tmp_path) + b"/r\xff"
    proc = edgedec("gate", tiny_llama_bundle, "--budget", size_budget, "--json", target + b".json",
                   "--junit", target + b".xml")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(Path(os.fsdecode(target + b".json")).read_text())["passed"] is True
    assert "<testcase" in Path(os.fsdecode(target + b".xml")).read_text()


# ---------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("max_size = " + "9" * 401, r"max_size = 999.*\.\.\. is too large a number"),
    ('max_size = "1 MB"\n[settings]\nruns = ' + "9" * 401, r"runs = 999.*\.\.\. is too large"),
    ("max_size = " + "9" * 5000, r"is not valid TOML"),
    ('max_size = "4 Mb"', r"has an unknown unit 'Mb'; write a size with a unit, e\.g\. \"300 MB\" \(units, "
                          r"case-sensitive: B, kB, MB, GB, KiB, MiB, GiB\)"),
    ('max_size = "4 mb"', r"has an unknown unit 'mb'"),
    ("max_size = " + "[" * 5000 + "]" * 5000, r"is not valid TOML"),
], ids=["401-digits", "401-digit-setting", "5000-digits", "Mb", "mb", "deep-array"])
def test_bad_budgets_are_one_line(tiny_llama_bundle, tmp_path, text, message, cli, one_line_error):
    from edgedec.gate import Budget

    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(BudgetError, match=message):
        Budget.load(path)
    one_line_error(cli("gate", tiny_llama_bundle, "--budget", path), message)


def test_budget_threads_are_capped(tmp_path, caplog):
    from edgedec.gate import parse_budget
    from edgedec.runtime.engine import machine_cores

    budget = parse_budget({"max_size": "1 MB", "settings": {"threads": 100_000}}, "b.toml")
    assert budget.settings.threads == machine_cores()
    assert "capped" in caplog.text


# ---------------------------------------------------------------------------------------------
# chat templates
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, message", [
    ("{{ foo.bar }}", r"chat template failed to render: UndefinedError: 'foo' is undefined"),
    ("{{ [].append(1) }}", r"chat template failed to render: SecurityError: .*append"),
    ("{{ 'x' * 10**10 }}", r"SecurityError: repeating 1 items 10,000,000,000 times exceeds the chat template limit"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"SecurityError: range of 100,000 items exceeds the chat template limit of 10,000"),
    ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
     r"SecurityError: rendering took longer than 2 s"),
    ("{{ 'ab'" + "|replace('a', 'aaaaaaaaaa')" * 8 + " }}", r"exceeds the chat template limit"),
    ("{{ 'x'.center(10**9) }}", r"argument 1000000000 exceeds the chat template limit"),
    ("{{ '%099999999d' % 1 }}", r"a format width exceeds the chat template limit"),
    ("{% for i in range(10000) %}{{ messages[0]['content'] * 100 }}{% endfor %}",
     r"the rendered prompt exceeds [\d,]+ characters"),
    ("{{ raise_exception('roles must alternate') }}", r"^error: chat template: roles must alternate$"),
], ids=["undefined", "unsafe", "repeat-1e10", "range-1e5", "nested-1e8", "replace-growth", "center", "format-width",
        "output-size", "raise-exception"])
def test_chat_template_failures_are_one_line(bundle_copy, template, message, cli, one_line_error):
    set_template(bundle_copy, template)
    one_line_error(cli("run", bundle_copy, "hi", "--chat", "-n", "2", "--threads", "1"), message)


def test_a_sane_template_renders_as_before(bundle_copy):
    engine = Engine.load(bundle_copy, threads=1)
    text = engine.codec.apply_chat_template([{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), text


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------
def test_threads_are_capped_at_the_machines_cores(tiny_llama_bundle, caplog):
    from edgedec.runtime.engine import machine_cores

    proc = edgedec("run", tiny_llama_bundle, "def f(x):", "-n", "2", "--threads", "100000", timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"warning: --threads 100000 is more than this machine's {machine_cores()} cores; using " \
           f"{machine_cores()}" in err
    engine = Engine.load(tiny_llama_bundle, threads=100_000)  # the library caps too, and says so
    assert engine.threads == machine_cores()
    assert "capped at this machine's" in caplog.text
    with pytest.raises(Exception, match="threads must be >= 1, got 0"):
        Engine.load(tiny_llama_bundle, threads=0)


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_threads_warning_in_bench_and_eval(tiny_llama_bundle, command, cli, tmp_path, monkeypatch):
    seen = {}
    if command == "bench":
        monkeypatch.setattr("edgedec.bench.bench", lambda b, p, options, phase: seen.setdefault("t", options.threads)
                            and (_ for _ in ()).throw(ConfigError("stop")))
        r = cli("bench", tiny_llama_bundle, "--threads", "100000")
    else:
        (tmp_path / "t.txt").write_text("hello world " * 20)
        monkeypatch.setattr("edgedec.evaluate.evaluate", lambda b, t, options, reference=None:
                            seen.setdefault("t", options.threads) and (_ for _ in ()).throw(ConfigError("stop")))
        r = cli("eval", tiny_llama_bundle, "--text", tmp_path / "t.txt", "--threads", "100000")
    from edgedec.runtime.engine import machine_cores

    assert "warning: --threads 100000 is more than this machine's" in r.stderr
    assert seen["t"] == machine_cores()


# ---------------------------------------------------------------------------------------------
# item 7: smaller
# ---------------------------------------------------------------------------------------------
def test_compile_options_refused(tiny_llama_dir, tmp_path, cli, one_line_error):
    out = tmp_path / "b"
    one_line_error(cli("compile", tiny_llama_dir, "-o", out, "--max-context", str(10**12)),
                   r"max_context must be <= 4,194,304 \(the most a bundle may hold\), got 1,000,000,000,000")
    one_line_error(cli("compile", tiny_llama_dir, "-o", out, "--pass", "int4:block_size=32,block_size=64"),
                   r"pass option 'block_size' is given twice in 'int4:block_size=32,block_size=64'")
    one_line_error(cli("compile", tiny_llama_dir, "-o", out, "-q", "int4", "--pass", "int4"),
                   r"pass int4 is given twice")
    assert not out.exists()


def test_max_context_above_the_models_is_clamped_with_a_message(tiny_llama_dir, tmp_path, caplog):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    manifest = compile_model(str(tiny_llama_dir), tmp_path / "b", CompileOptions(max_context=100_000))
    assert manifest["kv_cache"]["max_capacity"] == 256
    assert "max context 100000 is more than the model's 256 positions; the bundle holds 256" in caplog.text


def test_corrupt_tokenizer_is_reported_as_such(tiny_llama_dir, tmp_path, cli, one_line_error):
    src = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, src)
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    one_line_error(cli("compile", src, "-o", tmp_path / "b"), r"cannot read tokenizer\.json of .* \(corrupt\?\)")


def test_eval_text_on_a_directory_says_so(tiny_llama_bundle, tmp_path, cli, one_line_error):
    one_line_error(cli("eval", tiny_llama_bundle, "--text", tmp_path), r"text file .* is a directory")
