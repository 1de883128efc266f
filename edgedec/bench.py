"""Benchmark bundles: decode speed, time to first token, prefill speed, peak memory, size on disk.

Each bundle is measured in its own process (:mod:`edgedec.bench_worker`) that imports only the
torch-free runtime, so its peak resident memory is that of an app embedding the runtime, and bundles
do not share caches or allocations. A worker runs ``warmup`` untimed passes and then ``runs`` timed
passes over the prompts; each pass generates ``new_tokens`` tokens per prompt, greedy, ignoring
end-of-sequence (so every bundle does the same work).

Several bundles are measured in **interleaved rounds** by default: every worker loads its bundle and
waits, then each round runs one pass of every bundle in turn (the first bundle of a round rotates).
Shared machines drift: on this project's 2-core CI machines the same fp32 bundle measured 57 to 88
tokens/s in three runs of one session, so bundles measured one after another compare the machine's moods
as much as the bundles. In rounds, every bundle sees the same moods, and the ratios hold. ``interleave=False``
(``edgedec bench --sequential``) measures one bundle at a time, with one loaded at a time.

One pass gives one figure per metric, aggregated over its prompts:

- ``decode_tok_s``: decode steps over decode time, summed over the prompts (the first token, which
  comes out of the prefill, is not a decode step);
- ``ttft_ms``: mean time to first token over the prompts (tokenized prompt in, first token out);
- ``prefill_tok_s``: prompt tokens over prefill time, summed over the prompts.

The report gives, per metric, the median over the passes and the min and max (``<metric>_min``,
``<metric>_max``). ``peak_rss_mb`` is the worker's peak resident memory (VmHWM / ru_maxrss) and
``size_mb`` the bundle's files plus manifest on disk. MB means 10^6 bytes throughout.

JSON written by ``edgedec bench --json`` (:meth:`BenchReport.to_dict`)::

    {
      "edgedec_bench": 1,
      "settings": {"warmup": 1, "runs": 3, "new_tokens": 64, "threads": null, "context": null,
                   "prompts": 6, "prompt_source": "built-in"},
      "bundles": [                       # in the order given; the first is the base of "ratios"
        {"bundle": "path", "name": "dir name",
         "decode_tok_s": 80.1, "decode_tok_s_min": 78.0, "decode_tok_s_max": 81.2,
         "ttft_ms": 12.3, "ttft_ms_min": ..., "ttft_ms_max": ...,
         "prefill_tok_s": 900.0, "prefill_tok_s_min": ..., "prefill_tok_s_max": ...,
         "peak_rss_mb": 210.5, "size_mb": 98.7, "kv_bytes_per_token": 184320, "kv_cache_mb": 377.5,
         "threads": 2, "load_s": 0.4, "prompt_tokens": 250, "new_tokens": 384,
         "runs": [{"decode_tok_s": ..., "ttft_ms": ..., "prefill_tok_s": ...}, ...],
         "speculation": null,            # with --spec: drafter, verify_steps, accepted_tokens, ... (else null)
         "ratios": {"decode_tok_s": 1.0, "ttft_ms": 1.0, "prefill_tok_s": 1.0, "peak_rss_mb": 1.0,
                    "size_mb": 1.0},     # this bundle / the first bundle, per metric (medians)
         "round_ratios": {"decode_tok_s": {"median": 1.0, "min": 1.0, "max": 1.0}, ...},
                                         # interleaved runs: the same ratio within each round (else null)
         "categories": {"code": {"prompts": 4, "decode_tok_s": ..., "decode_tok_s_min": ..., "decode_tok_s_max": ...,
                                 "round_ratio": {"median": ..., "min": ..., "max": ...},
                                 "mean_accepted_per_step": ...}, ...}}
                                         # prompts in categories (a directory of files, or "category" in
                                         # JSONL): decode speed per category (else null)
      ]
    }
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import errors
from .errors import ConfigError, MeasurementError

log = logging.getLogger(__name__)

Prompt = str | dict  # a plain prompt, or {"messages": [{"role": ..., "content": ...}, ...]}

# Short, varied prompts: questions, code, and summarising a passage.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "What is the difference between a list and a tuple in Python?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True when n is prime.\"\"\"\n",
    "Summarise this passage in one sentence: The town council met on Tuesday to discuss the new bus "
    "routes. Residents of the northern districts asked for more frequent service in the mornings, while "
    "shop owners in the centre worried that fewer buses would stop near the market. The council agreed "
    "to run a three-month trial and to publish the passenger counts every month.",
    "List three things to check before going on a long bicycle ride.",
)

METRICS = ("decode_tok_s", "ttft_ms", "prefill_tok_s")  # per-pass metrics (median, min, max)
RATIO_METRICS = METRICS + ("peak_rss_mb", "size_mb")
WORKER_TIMEOUT_S = 3600  # loading and the first pass: nothing to compare them with yet
STALL_FACTOR, STALL_FLOOR_S = 10, 120.0  # later passes: a worker this much slower than its first pass is hung


@dataclass(frozen=True)
class BenchOptions:
    warmup: int = 1  # untimed passes over the prompts before the timed ones
    runs: int = 3  # timed passes over the prompts
    new_tokens: int = 64  # tokens generated per prompt per pass
    threads: int | None = None  # ONNX Runtime threads (default: physical cores)
    context: int | None = None  # KV-cache capacity (default: the runtime's)
    context_tokens: int | None = None  # prefill each prompt, repeated, to this many tokens, then decode
    spec: str | None = None  # measure each bundle without speculation and with this drafter
    draft_len: int | None = None  # tokens drafted per verification (default: the bundle's, else 4)
    interleave: bool = True  # several bundles: one pass of each per round (False: one bundle after another)
    trust: object = None  # Engine.load's trust: True, or a TrustPolicy, lets bundles with native code (TVM) load

    def __post_init__(self):
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.runs < 1:
            raise ConfigError(f"runs must be >= 1, got {self.runs}")
        if self.new_tokens < 2:
            raise ConfigError(f"new_tokens must be >= 2 (decode speed needs a step after the first token), "
                              f"got {self.new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.context is not None and self.context < 2:
            raise ConfigError(f"context must be >= 2, got {self.context}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ConfigError(f"context_tokens must be >= 1, got {self.context_tokens}")
        if self.spec is not None:
            from .runtime.drafters import DRAFTER_NAMES, is_drafter_name

            if not is_drafter_name(self.spec):
                raise ConfigError(f"spec must be one of {', '.join(DRAFTER_NAMES)} or model:PATH, got {self.spec!r}")


# ------------------------------------------------------------------------------------------------
PROMPT_SUFFIXES = (".jsonl", ".ndjson", ".txt")  # the files a prompts directory contributes


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file (see :func:`load_prompt_set`) or a directory of prompt files."""
    return load_prompt_set(path)[0]


def load_prompt_set(path: str | Path) -> tuple[list[Prompt], list[str] | None]:
    """Prompts and their categories (None: no categories).

    A file: JSONL of ``{"messages": [...]}`` (or ``{"prompt": "..."}``) objects when the file is
    ``.jsonl``/``.ndjson`` or its first non-blank line is a JSON object, each optionally with a
    ``"category"``; otherwise one plain prompt per non-blank line. A directory: every ``.jsonl``,
    ``.ndjson`` and ``.txt`` file in it, in name order, each file's name (without suffix) the category of
    its prompts. ``edgedec bench`` reports each category separately."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in PROMPT_SUFFIXES)
        if not files:
            raise ConfigError(f"prompts directory {path} has no {', '.join(PROMPT_SUFFIXES)} files")
        prompts, categories = [], []
        for f in files:
            ps = [p for p, _ in _prompt_file(f)]
            prompts += ps
            categories += [f.stem] * len(ps)
        return prompts, categories
    pairs = _prompt_file(path)
    if all(c is None for _, c in pairs):
        return [p for p, _ in pairs], None
    return [p for p, _ in pairs], [c or "other" for _, c in pairs]


def _prompt_file(path: Path) -> list[tuple[Prompt, str | None]]:
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist")
    try:
        lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts file {path} as UTF-8: {exc}") from exc
    if not lines:
        raise ConfigError(f"prompts file {path} has no prompts")
    if path.suffix.lower() in (".jsonl", ".ndjson") or _is_json_object(lines[0][1]):
        return [_parse_jsonl_line(path, i, line) for i, line in lines]
    return [(line, None) for _, line in lines]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> tuple[Prompt, str | None]:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"messages\" or \"prompt\"")
    category = obj.get("category")
    if category is not None and not (isinstance(category, str) and category):
        raise ConfigError(f"{where}: \"category\" must be a non-empty string")
    return _parse_prompt(obj, where), category


def _parse_prompt(obj: dict, where: str) -> Prompt:
    if "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return obj["prompt"]
    raise ConfigError(f"{where}: expected a JSON object with \"messages\" (chat) or \"prompt\" (text)")


# ------------------------------------------------------------------------------------------------
@dataclass
class BundleBench:
    bundle: str
    name: str
    size_bytes: int
    peak_rss_bytes: int
    threads: int
    load_s: float
    passes: list[dict]  # per timed pass: decode_tok_s, ttft_ms, prefill_tok_s
    prompt_tokens: int  # per pass
    new_tokens: int  # per pass
    speculation: dict | None = None  # with a drafter: bench_worker._speculation's figures (else None)
    kv_bytes_per_token: int = 0  # KV-cache bytes one token occupies (all layers, keys and values)
    kv_cache_bytes: int = 0  # the KV-cache buffer the runtime allocated
    prompt_runs: list[list[dict]] = field(default_factory=list)  # per timed pass, the worker's per-prompt figures

    def median(self, metric: str) -> float:
        if metric == "peak_rss_mb":
            return self.peak_rss_bytes / 1e6
        if metric == "size_mb":
            return self.size_bytes / 1e6
        return statistics.median(p[metric] for p in self.passes)

    def to_dict(self) -> dict:
        d = {"bundle": self.bundle, "name": self.name}
        for m in METRICS:
            vals = [p[m] for p in self.passes]
            d.update({m: statistics.median(vals), f"{m}_min": min(vals), f"{m}_max": max(vals)})
        d.update(peak_rss_mb=self.peak_rss_bytes / 1e6, size_mb=self.size_bytes / 1e6, threads=self.threads,
                 load_s=self.load_s, prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens,
                 runs=self.passes, speculation=self.speculation, kv_bytes_per_token=self.kv_bytes_per_token,
                 kv_cache_mb=self.kv_cache_bytes / 1e6)
        return d


@dataclass
class BenchReport:
    options: BenchOptions
    prompt_source: str
    prompts: int
    bundles: list[BundleBench] = field(default_factory=list)
    categories: list[str] | None = None  # per prompt, when the prompts came in categories

    def by_category(self, b: BundleBench) -> dict | None:
        """Per prompt category, in order of first appearance: decode tokens/s over the timed passes
        (median, min, max), its ratio to the first bundle within each round (interleaved runs), and the
        draft tokens accepted per verification (None without speculation). None without categories."""
        if not self.categories:
            return None
        base, out = self.bundles[0], {}
        paired = self._paired(b)
        for cat in dict.fromkeys(self.categories):
            idx = [i for i, c in enumerate(self.categories) if c == cat]
            speed = [_pass_figures([run[i] for i in idx])["decode_tok_s"] for run in b.prompt_runs]
            entry = {"prompts": len(idx), "decode_tok_s": statistics.median(speed), "decode_tok_s_min": min(speed),
                     "decode_tok_s_max": max(speed), "round_ratio": None, "mean_accepted_per_step": None}
            if paired:
                base_speed = [_pass_figures([run[i] for i in idx])["decode_tok_s"] for run in base.prompt_runs]
                r = [x / y for x, y in zip(speed, base_speed)]
                entry["round_ratio"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
            if b.speculation:
                steps = sum(run[i].get("verify_steps", 0) for run in b.prompt_runs for i in idx)
                accepted = sum(run[i].get("accepted_tokens", 0) for run in b.prompt_runs for i in idx)
                entry["mean_accepted_per_step"] = accepted / steps if steps else 0.0
            out[cat] = entry
        return out

    def _paired(self, b: BundleBench) -> bool:
        """Whether ``b``'s timed passes pair with the first bundle's round by round (interleaved runs)."""
        return self.options.interleave and len(self.bundles) > 1 and len(b.passes) == len(self.bundles[0].passes)

    def ratios(self, b: BundleBench) -> dict:
        base = self.bundles[0]
        return {m: (b.median(m) / base.median(m) if base.median(m) else None) for m in RATIO_METRICS}

    def round_ratios(self, b: BundleBench) -> dict | None:
        """Per metric, the ratio to the first bundle within each round: median, min and max. Only for
        interleaved runs (rounds pair the passes in time); None otherwise."""
        base = self.bundles[0]
        if not self._paired(b):
            return None
        out = {}
        for m in METRICS:
            r = [p[m] / q[m] for p, q in zip(b.passes, base.passes) if q[m]]
            if r:
                out[m] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
        return out

    def to_dict(self) -> dict:
        o = self.options
        return {
            "edgedec_bench": 1,
            "settings": {"warmup": o.warmup, "runs": o.runs, "new_tokens": o.new_tokens, "threads": o.threads,
                         "context": o.context, "context_tokens": o.context_tokens, "prompts": self.prompts,
                         "prompt_source": self.prompt_source},
            "bundles": [{**b.to_dict(), "ratios": self.ratios(b), "round_ratios": self.round_ratios(b),
                         "categories": self.by_category(b)}
                        for b in self.bundles],
        }


def _pass_figures(per_prompt: list[dict]) -> dict:
    steps = sum(max(p["new_tokens"] - 1, 0) for p in per_prompt)
    decode_s = sum(p["decode_s"] for p in per_prompt)
    prefill_s = sum(p["prefill_s"] for p in per_prompt)
    if steps == 0 or decode_s <= 0 or prefill_s <= 0:
        raise MeasurementError("a timed pass made no decode steps (is the context too small for the prompts?)")
    return {
        "decode_tok_s": steps / decode_s,
        "ttft_ms": 1000 * statistics.fmean(p["ttft_s"] for p in per_prompt),
        "prefill_tok_s": sum(p["prompt_tokens"] for p in per_prompt) / prefill_s,
    }


def worker_command() -> list[str]:
    """The command that starts a benchmark worker: this interpreter, this edgedec, the runtime only.

    Equivalent to ``python -m edgedec.bench_worker``, but it puts the directory this edgedec lives in
    on the worker's path when it is not there already (a source checkout run without installing).
    """
    root = str(Path(__file__).resolve().parent.parent)
    code = (f"import sys; r = {root!r}; r in sys.path or sys.path.insert(0, r); "
            "from edgedec.bench_worker import main; sys.exit(main())")
    return [sys.executable, "-c", code]


class Worker:
    """A benchmark worker process (``bench_worker --serve``): loads one bundle, then runs passes on request."""

    def __init__(self, request: dict, timeout_s: float = WORKER_TIMEOUT_S, stall_floor_s: float = STALL_FLOOR_S):
        self.label, self.timeout_s, self.stall_floor_s = request["bundle"], timeout_s, stall_floor_s
        self.first_pass_s: float | None = None  # sets the patience for the passes after it
        self._tmp = tempfile.TemporaryDirectory(prefix="edgedec-bench-")
        req = Path(self._tmp.name) / "request.json"
        req.write_text(json.dumps(request))
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+")
        self.proc = subprocess.Popen(worker_command() + ["--serve", str(req)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._reply("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, key: str, timeout_s: float | None = None):
        timeout_s = timeout_s or self.timeout_s
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self.proc.kill()  # hung: it would not exit when asked
            self.close()
            if self.first_pass_s is not None and timeout_s < self.timeout_s:
                why = (f"gave no reply in {timeout_s:.0f}s, {STALL_FACTOR}x its first pass "
                       f"({self.first_pass_s:.1f}s): stalled")
            else:
                why = f"ran past {timeout_s:.0f}s"
            raise MeasurementError(f"the benchmark worker for {self.label} {why}") from None
        if line is None:
            code = self.proc.wait()
            self._stderr.seek(0)
            tail = " ".join(self._stderr.read().strip().splitlines()[-3:]) or "no output"
            self.close()
            raise MeasurementError(f"the benchmark worker for {self.label} exited with code {code}: {tail}")
        msg = json.loads(line)
        if "error" in msg:
            self.close()
            cls = getattr(errors, msg.get("error_type", ""), None)
            cls = cls if isinstance(cls, type) and issubclass(cls, errors.EdgedecError) else MeasurementError
            raise cls(msg["error"])
        return msg[key]

    def _send(self, cmd: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: _reply reports why

    def one_pass(self, measured: bool) -> list[dict]:
        """Run one pass. After the first, a pass that takes STALL_FACTOR times as long (at least
        ``stall_floor_s``) is a hung worker: it is killed and reported, not waited on for an hour."""
        timeout_s = None
        if self.first_pass_s is not None:
            timeout_s = min(self.timeout_s, max(self.stall_floor_s, STALL_FACTOR * self.first_pass_s))
        t = time.perf_counter()
        self._send({"cmd": "pass", "measured": measured})
        reply = self._reply("pass", timeout_s)
        if self.first_pass_s is None:
            self.first_pass_s = time.perf_counter() - t
        return reply

    def finish(self) -> dict:
        self._send({"cmd": "finish"})
        result = self._reply("result")
        self.close()
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        self._tmp.cleanup()


def bundle_size_bytes(path: str | Path, verify: bool = True) -> int:
    """Bytes on disk of a bundle's files plus manifest; validates the bundle first."""
    from .runtime.bundle import Bundle

    return Bundle.open(path, verify_hashes=verify).size_bytes()


def measure(bundle: str | Path, prompts: Sequence[Prompt], options: BenchOptions = BenchOptions(),
            name: str | None = None, drafter: str | None = "auto") -> BundleBench:
    """Measure one bundle in a fresh runtime-only worker process.

    ``drafter``: ``"auto"`` speculates as the bundle says, ``None`` turns speculation off, or a drafter name.
    """
    return measure_many([(bundle, name, drafter)], prompts, options)[0]


def _trust_request(trust) -> bool | dict | None:
    """``BenchOptions.trust`` as the worker process receives it (JSON)."""
    from .runtime.trust import TrustPolicy

    return trust.to_dict() if isinstance(trust, TrustPolicy) else trust


def measure_many(entries: Sequence[tuple[str | Path, str | None, str | None]], prompts: Sequence[Prompt],
                 options: BenchOptions = BenchOptions(),
                 phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
                 ) -> list[BundleBench]:
    """Measure ``(bundle, name, drafter)`` entries, each in its own worker, in interleaved rounds
    (``options.interleave``) or one after another."""
    if not prompts:
        raise ConfigError("no prompts to benchmark with")
    sizes = [bundle_size_bytes(b, verify=False) for b, _, _ in entries]  # structure and sizes; workers check hashes
    names = [n or Path(b).resolve().name for b, n, _ in entries]
    requests = [{"bundle": str(b), "prompts": list(prompts), "warmup": options.warmup, "runs": options.runs,
                 "new_tokens": options.new_tokens, "threads": options.threads, "context": options.context,
                 "context_tokens": options.context_tokens, "drafter": drafter, "draft_len": options.draft_len,
                 "trust": _trust_request(options.trust)}
                for b, _, drafter in entries]
    passes = options.warmup + options.runs
    workers: list[Worker] = []
    try:
        if options.interleave and len(entries) > 1:
            for name, request in zip(names, requests):
                with phase(f"loading {name}"):
                    workers.append(Worker(request))
            for i in range(passes):
                label = "warm-up" if i < options.warmup else "timed"
                with phase(f"round {i + 1}/{passes} ({label}): one pass of each bundle"):
                    for k in range(len(workers)):  # the first bundle of a round rotates
                        workers[(i + k) % len(workers)].one_pass(measured=i >= options.warmup)
            results = [w.finish() for w in workers]
        else:
            results = []
            for name, request in zip(names, requests):
                with phase(f"benchmarking {name}"):
                    log.info("benchmarking %s (%d prompts, %d warm-up + %d timed passes)", request["bundle"],
                             len(prompts), options.warmup, options.runs)
                    workers = [Worker(request)]
                    for i in range(passes):
                        workers[0].one_pass(measured=i >= options.warmup)
                    results.append(workers[0].finish())
    finally:
        for w in workers:
            w.close()
    return [_bundle_bench(b, name, size, result)
            for (b, _, _), name, size, result in zip(entries, names, sizes, results)]


def _bundle_bench(bundle: str | Path, name: str, size: int, result: dict) -> BundleBench:
    passes = [_pass_figures(p) for p in result["runs"]]
    first = result["runs"][0]
    return BundleBench(
        bundle=str(bundle), name=name, size_bytes=size,
        peak_rss_bytes=int(result["peak_rss_bytes"]), threads=int(result["threads"]), load_s=float(result["load_s"]),
        passes=passes, prompt_tokens=sum(p["prompt_tokens"] for p in first),
        new_tokens=sum(p["new_tokens"] for p in first), speculation=result.get("speculation"),
        kv_bytes_per_token=int(result.get("kv_bytes_per_token", 0)),
        kv_cache_bytes=int(result.get("kv_cache_bytes", 0)),
        prompt_runs=result["runs"],
    )


def _names(paths: Sequence[str | Path]) -> list[str]:
    names = [Path(p).resolve().name for p in paths]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def spec_warnings(bundles: Sequence[str | Path], spec: str | None) -> list[str]:
    """What the user should know before ``--spec`` measures ``bundles``: a recycling drafter on a bundle
    whose graph does not emit its candidates (pass ``top-candidates``) picks them on the host, a slower
    path than ``compile --spec`` builds (about 5% of an int4 step)."""
    from .registry import PASSES
    from .runtime.bundle import MANIFEST

    if not spec or "recycling" not in spec.split("+"):
        return []
    out = []
    for b in bundles:
        try:
            manifest = json.loads((Path(b) / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # not a bundle: bench() refuses it with the reason
        if manifest["target"].get("name") not in PASSES["top-candidates"]["targets"]:
            continue
        if "top-candidates" not in [p.get("pass") for p in manifest.get("passes", [])]:
            out.append(f"{Path(b).name} was compiled without --spec: recycling's candidates are picked on the host, "
                       "slower than in a bundle built with compile --spec (or --pass top-candidates)")
    return out


def bench(bundles: Sequence[str | Path], prompts_file: str | Path | None = None,
          options: BenchOptions = BenchOptions(),
          phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
          ) -> BenchReport:
    """Benchmark ``bundles`` on the same prompts (``prompts_file`` or the built-in set), in interleaved
    rounds unless ``options.interleave`` is off.

    ``phase(name)`` wraps each long step (the CLI passes a progress display).
    """
    if not bundles:
        raise ConfigError("no bundle to benchmark")
    prompts, categories = load_prompt_set(prompts_file) if prompts_file else (list(BUILTIN_PROMPTS), None)
    for b in bundles:  # refuse a bad bundle before spending minutes on the good ones
        bundle_size_bytes(b, verify=False)
    report = BenchReport(options, str(prompts_file) if prompts_file else "built-in", len(prompts),
                         categories=categories)
    entries = []
    for path, name in zip(bundles, _names(bundles)):
        if options.spec is None:
            entries.append((path, name, "auto"))
        else:  # the same bundle without and with the drafter, in the same rounds
            entries += [(path, f"{name} (no spec)", None), (path, f"{name} ({options.spec})", options.spec)]
    report.bundles = measure_many(entries, prompts, options, phase)
    return report


# ------------------------------------------------------------------------------------------------
PLOT_PANELS = (  # (metric, title, better)
    ("decode_tok_s", "decode (tokens/s)", "higher"),
    ("ttft_ms", "time to first token (ms)", "lower"),
    ("size_mb", "size on disk (MB)", "lower"),
    ("peak_rss_mb", "peak resident memory (MB)", "lower"),
)


def _short(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def plot(report: BenchReport, out: str | Path) -> Path:
    """A PNG of bar charts, one panel per metric, bundles side by side (min-max as error bars)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'edgedec[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"the plot is a PNG: give a file name ending in .png, not {out.name}")
    names = [b.name for b in report.bundles]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(names))]
    fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(4 * len(PLOT_PANELS), 3.8), squeeze=False)
    for ax, (metric, title, better) in zip(axes[0], PLOT_PANELS):
        values = [b.median(metric) for b in report.bundles]
        yerr = None
        if metric in METRICS:
            lo = [v - min(p[metric] for p in b.passes) for v, b in zip(values, report.bundles)]
            hi = [max(p[metric] for p in b.passes) - v for v, b in zip(values, report.bundles)]
            yerr = [lo, hi]
        x = range(len(names))
        bars = ax.bar(x, values, yerr=yerr, capsize=4, color=colors)
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8, padding=2)
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{title}\n({better} is better)", fontsize=9)
        ax.margins(y=0.15)
    o = report.options
    fig.suptitle(f"edgedec bench: {report.prompts} prompts, {o.new_tokens} new tokens, median of {o.runs} runs",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out
