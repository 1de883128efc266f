"""Budget gate: check a bundle against the size, memory, speed and quality limits a TOML file states.

``edgedec gate BUNDLE --budget budget.toml`` measures only what the budget asks for, compares each
measurement with its limit, and exits 0 when every limit holds, 1 when one does not, and 2 when the
budget, a bundle or a text is invalid (never a silent pass).

Budget schema (TOML; every limit is optional, at least one is required)::

    # size and memory: a number with a unit (B, kB, MB, GB, KiB, MiB, GiB; MB = 10^6 bytes)
    max_size = "300 MB"                # bundle files + manifest on disk
    max_peak_rss = "400 MB"            # peak resident memory of a runtime-only process generating
    # speed: tokens/s as a number or "N tok/s"; time as "N ms" or "N s"
    min_decode_tok_s = 100             # median over the timed runs
    max_ttft = "50 ms"                 # median time to first token
    min_prefill_tok_s = 1000
    # quality, on the --text files
    max_perplexity = 20.0              # needs --text
    max_perplexity_ratio = 1.05        # perplexity / the --reference bundle's; needs --reference and --text
    max_greedy_disagreement = "5%"     # 1 - greedy agreement with --reference (or 0.05); needs both

    [settings]                         # how to measure (all optional)
    prompts = "prompts.jsonl"          # bench prompts, relative to this file (default: the built-in set)
    warmup = 1                         # untimed passes over the prompts
    runs = 3                           # timed passes; speed limits compare medians
    new_tokens = 32                    # tokens generated per prompt per pass
    threads = 2                        # ONNX Runtime threads (default: physical cores)
    window = 512                       # perplexity window, tokens
    stride = 256                       # perplexity stride, tokens
    max_tokens = 4096                  # read at most this many tokens of text

Relative limits. The size, memory and speed limits (``max_size``, ``max_peak_rss``,
``min_decode_tok_s``, ``max_ttft``, ``min_prefill_tok_s``) may instead be written ``"F x baseline"``
(or ``"F× baseline"``): the limit is F times the same metric of the ``--baseline`` bundle, measured in
the same run with the same settings (in interleaved rounds, see :mod:`edgedec.bench`). ``min_decode_tok_s = "2.5x baseline"`` asks for a 2.5× decode
speed-up; ``max_size = "0.3x baseline"`` for a bundle under 30% of the baseline's size. Relative speed
limits are the ones to use on shared CI machines, where absolute speeds drift.

Errors (exit 2): an unknown key (the message lists the valid ones), a number without its unit or with
a wrong one, an unparsable or non-positive value, a relative limit without ``--baseline``, a quality
limit without ``--reference``/``--text``, a budget with no limits, a missing file, an invalid bundle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

from .errors import BudgetError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LimitSpec:
    key: str
    metric: str  # the measurement it bounds (a key of GateReport.measurements)
    bound: str  # "max": measured <= limit; "min": measured >= limit
    unit: str  # how to parse the value: "size", "time", "rate", "number", "fraction"
    needs: str  # what to measure: "size", "bench", "text", "reference"
    description: str

    @property
    def relative_ok(self) -> bool:
        return self.needs in ("size", "bench")


LIMITS: dict[str, LimitSpec] = {s.key: s for s in (
    LimitSpec("max_size", "size_mb", "max", "size", "size", "bundle size on disk"),
    LimitSpec("max_peak_rss", "peak_rss_mb", "max", "size", "bench", "peak resident memory of the runtime"),
    LimitSpec("min_decode_tok_s", "decode_tok_s", "min", "rate", "bench", "median decode speed"),
    LimitSpec("max_ttft", "ttft_ms", "max", "time", "bench", "median time to first token"),
    LimitSpec("min_prefill_tok_s", "prefill_tok_s", "min", "rate", "bench", "median prefill speed"),
    LimitSpec("max_perplexity", "perplexity", "max", "number", "text", "perplexity on the --text files"),
    LimitSpec("max_perplexity_ratio", "perplexity_ratio", "max", "number", "reference",
              "perplexity / the reference bundle's perplexity"),
    LimitSpec("max_greedy_disagreement", "greedy_disagreement", "max", "fraction", "reference",
              "fraction of positions whose greedy token differs from the reference's"),
)}

SETTING_MAX = 10**9  # the largest integer a [settings] value may take

METRIC_UNITS = {"size_mb": "MB", "peak_rss_mb": "MB", "decode_tok_s": "tok/s", "ttft_ms": "ms",
                "prefill_tok_s": "tok/s", "perplexity": "", "perplexity_ratio": "", "greedy_disagreement": ""}

# the units each kind of value accepts (lower-cased) and the factor to the metric's unit
UNITS = {
    # sizes are case-sensitive: B is a byte; "Mb" (megabit) or "mb" is refused, not read as MB
    "size": {"B": 1e-6, "kB": 1e-3, "KB": 1e-3, "MB": 1.0, "GB": 1e3, "KiB": 1024 / 1e6, "MiB": 2**20 / 1e6,
             "GiB": 2**30 / 1e6},  # -> MB
    "time": {"ms": 1.0, "s": 1000.0},  # -> ms
    "rate": {"": 1.0, "tok/s": 1.0},
    "number": {"": 1.0},
    "fraction": {"": 1.0, "%": 0.01},
}
UNIT_REQUIRED = ("size", "time")  # a bare number is ambiguous for these
UNIT_HELP = {
    "size": 'a size with a unit, e.g. "300 MB" (units, case-sensitive: B, kB, MB, GB, KiB, MiB, GiB)',
    "time": 'a time with a unit, e.g. "50 ms" (units: ms, s)',
    "rate": 'tokens per second, e.g. 100 or "100 tok/s"',
    "number": "a positive number, e.g. 1.05",
    "fraction": 'a fraction in [0, 1] or a percentage, e.g. 0.05 or "5%"',
}
_NUM = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
_RELATIVE = re.compile(rf"^\s*{_NUM}\s*[x×]\s*baseline\s*$", re.IGNORECASE)
_WITH_UNIT = re.compile(rf"^\s*{_NUM}\s*([A-Za-z/%]*)\s*$")


@dataclass(frozen=True)
class Limit:
    spec: LimitSpec
    text: str  # as written in the budget
    value: float  # the limit in the metric's unit, or the factor when relative
    relative: bool = False

    def threshold(self, baseline: float | None) -> float:
        return self.value * baseline if self.relative else self.value


@dataclass(frozen=True)
class GateSettings:
    prompts: Path | None = None
    warmup: int = 1
    runs: int = 3
    new_tokens: int = 32
    threads: int | None = None
    window: int = 512
    stride: int = 256
    max_tokens: int | None = None


@dataclass(frozen=True)
class Budget:
    path: Path
    limits: tuple[Limit, ...]
    settings: GateSettings = GateSettings()

    def needs(self, what: str) -> bool:
        return any(l.spec.needs == what for l in self.limits)

    @property
    def relative(self) -> list[Limit]:
        return [l for l in self.limits if l.relative]

    @classmethod
    def load(cls, path: str | Path) -> "Budget":
        path = Path(path)
        if not path.is_file():
            raise BudgetError(f"budget file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            # ValueError: an integer beyond Python's 4,300-digit limit; RecursionError: arrays nested too deep
            raise BudgetError(f"budget file {path} is not valid TOML: {' '.join(str(exc).split())[:200]}") from exc
        except OSError as exc:
            raise BudgetError(f"cannot read budget file {path}: {exc.strerror or exc}") from exc
        return parse_budget(data, path)


def format_value(v: float, unit: str = "") -> str:
    """A value with its unit for people: ``"12.5 MB"``, ``"1.032"``, ``"13,429 tok/s"``."""
    text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return f"{text} {unit}".strip()


def parse_value(spec: LimitSpec, raw, where: str) -> Limit:
    """Parse one limit's value as written in the budget; raise BudgetError naming the key."""
    bad = f"{where}: {spec.key} = {raw!r}"
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise BudgetError(f"{bad} is not {UNIT_HELP[spec.unit]}")
    if isinstance(raw, str) and (m := _RELATIVE.match(raw)):
        if not spec.relative_ok:
            raise BudgetError(f"{bad}: {spec.key} cannot be relative to a baseline; write {UNIT_HELP[spec.unit]}")
        factor = float(m.group(1))
        if not factor > 0:
            raise BudgetError(f"{bad}: the factor must be > 0")
        return Limit(spec, raw, factor, relative=True)
    if isinstance(raw, str):
        m = _WITH_UNIT.match(raw)
        if not m:
            raise BudgetError(f"{bad} is not {UNIT_HELP[spec.unit]}"
                              + (' or "F x baseline"' if spec.relative_ok else ""))
        number, unit = float(m.group(1)), m.group(2)
    else:
        try:
            number, unit = float(raw), ""
        except OverflowError:  # a TOML integer of hundreds of digits
            raise BudgetError(f"{where}: {spec.key} = {str(raw)[:20]}... is too large a number") from None
    if not math.isfinite(number):
        raise BudgetError(f"{bad} is not a finite number")
    units = UNITS[spec.unit]
    if not unit and spec.unit in UNIT_REQUIRED:
        raise BudgetError(f"{bad} has no unit; write {UNIT_HELP[spec.unit]}")
    key = unit if spec.unit == "size" else unit.lower()
    if key not in units:
        problem = "takes no unit" if spec.unit == "number" else f"has an unknown unit {unit!r}"
        raise BudgetError(f"{bad} {problem}; write {UNIT_HELP[spec.unit]}")
    value = number * units[key]
    if spec.unit == "fraction":
        if not 0 <= value <= 1:
            raise BudgetError(f"{bad} is not {UNIT_HELP[spec.unit]}")
    elif not value > 0:
        raise BudgetError(f"{bad} must be > 0")
    return Limit(spec, str(raw), value)


def _settings(raw, path: Path) -> GateSettings:
    where = f"{path} [settings]"
    if not isinstance(raw, dict):
        raise BudgetError(f"{path}: settings must be a table ([settings])")
    valid = [f.name for f in fields(GateSettings)]
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            raise BudgetError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        if key == "prompts":
            if not isinstance(value, str) or not value:
                raise BudgetError(f"{where}: prompts = {value!r} is not a file name")
            p = Path(value)
            kwargs[key] = p if p.is_absolute() else path.parent / p
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BudgetError(f"{where}: {key} = {str(value)[:40]!r} is not an integer")
        if not -SETTING_MAX <= value <= SETTING_MAX:
            raise BudgetError(f"{where}: {key} = {str(value)[:20]}... is too large (at most {SETTING_MAX:,})")
        if key == "threads":
            from .runtime.engine import machine_cores

            if value > machine_cores():
                log.warning("%s: threads = %d capped at this machine's %d cores", where, value, machine_cores())
                value = machine_cores()
        kwargs[key] = value
    settings = GateSettings(**kwargs)
    try:  # the measuring modules check ranges; say where the value came from
        bench_options(settings)
        eval_options(settings)
    except ConfigError as exc:
        raise BudgetError(f"{where}: {exc}") from exc
    return settings


def parse_budget(data: dict, path: str | Path = "budget") -> Budget:
    """A :class:`Budget` from parsed TOML; every key checked, every problem a BudgetError."""
    path = Path(path)
    limits, settings = [], GateSettings()
    for key, raw in data.items():
        if key == "settings":
            settings = _settings(raw, path)
        elif key in LIMITS:
            limits.append(parse_value(LIMITS[key], raw, str(path)))
        else:
            raise BudgetError(f"{path}: unknown key {key!r}; valid keys: {', '.join(LIMITS)} and the [settings] table "
                              f"({', '.join(f.name for f in fields(GateSettings))})")
    if not limits:
        raise BudgetError(f"{path} states no limits; give at least one of: {', '.join(LIMITS)}")
    return Budget(path, tuple(limits), settings)


def bench_options(s: GateSettings, trust=None):
    from .bench import BenchOptions

    return BenchOptions(warmup=s.warmup, runs=s.runs, new_tokens=s.new_tokens, threads=s.threads, trust=trust)


def eval_options(s: GateSettings, trust=None):
    from .evaluate import EvalOptions

    return EvalOptions(window=s.window, stride=s.stride, max_tokens=s.max_tokens, threads=s.threads, trust=trust)


# ------------------------------------------------------------------------------------------------
@dataclass
class LimitResult:
    key: str
    description: str
    bound: str  # "max" | "min"
    written: str  # the limit as written in the budget
    threshold: float  # the limit in the metric's unit (relative ones resolved against the baseline)
    unit: str
    measured: float
    baseline: float | None  # the baseline's measurement, for relative limits
    passed: bool

    @property
    def message(self) -> str:
        op = "<=" if self.bound == "max" else ">="
        q = lambda v: format_value(v, self.unit)
        rel = f" ({self.written}, baseline {q(self.baseline)})" if self.baseline is not None else ""
        verdict = "holds" if self.passed else "broken"
        return f"{self.key}: measured {q(self.measured)}, limit {op} {q(self.threshold)}{rel}: {verdict}"

    def to_dict(self) -> dict:
        return {"key": self.key, "description": self.description, "limit": self.written, "bound": self.bound, "threshold": self.threshold,
                "unit": self.unit, "measured": self.measured, "baseline": self.baseline, "passed": self.passed}


@dataclass
class GateReport:
    bundle: str
    budget: str
    results: list[LimitResult]
    measurements: dict  # metric -> value for the bundle
    baseline: str | None = None
    baseline_measurements: dict = field(default_factory=dict)
    reference: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[LimitResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict:
        """JSON shape: ``passed``, ``limits`` (one entry per limit: key, description, limit as written, bound,
        threshold, unit, measured, baseline, passed), ``measurements`` and ``baseline_measurements`` (metric -> value),
        plus ``bundle``, ``budget``, ``baseline``, ``reference``, ``seconds``."""
        return {"edgedec_gate": 1, "bundle": self.bundle, "budget": self.budget, "passed": self.passed,
                "limits": [r.to_dict() for r in self.results], "measurements": self.measurements,
                "baseline": self.baseline, "baseline_measurements": self.baseline_measurements,
                "reference": self.reference, "seconds": self.seconds}

    def to_junit(self) -> str:
        """JUnit XML: one testcase per limit, a <failure> for each broken one."""
        name = f"edgedec gate {Path(self.bundle).name}"
        counts = {"tests": str(len(self.results)), "failures": str(len(self.failures)), "errors": "0",
                  "skipped": "0", "time": f"{self.seconds:.3f}"}
        suites = ET.Element("testsuites", {"name": "edgedec gate", **counts})
        suite = ET.SubElement(suites, "testsuite", {"name": name, **counts})
        props = ET.SubElement(suite, "properties")
        for k, v in (("bundle", self.bundle), ("budget", self.budget), ("baseline", self.baseline),
                     ("reference", self.reference)):
            if v is not None:
                ET.SubElement(props, "property", {"name": k, "value": v})
        for k, v in self.measurements.items():
            ET.SubElement(props, "property", {"name": f"measured.{k}", "value": repr(v)})
        for r in self.results:
            case = ET.SubElement(suite, "testcase", {"classname": "edgedec.gate", "name": r.key, "time": "0"})
            if not r.passed:
                failure = ET.SubElement(case, "failure", {"message": r.message, "type": "BudgetExceeded"})
                failure.text = r.message
            else:
                ET.SubElement(case, "system-out").text = r.message
        ET.indent(suites)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _check_inputs(budget: Budget, baseline, reference, texts) -> None:
    if budget.relative and baseline is None:
        keys = ", ".join(f"{l.spec.key} = {l.text!r}" for l in budget.relative)
        raise BudgetError(f"{budget.path}: {keys} is relative to a baseline; pass --baseline BUNDLE")
    quality = [l.spec.key for l in budget.limits if l.spec.needs in ("text", "reference")]
    if quality and not texts:
        raise BudgetError(f"{budget.path}: {', '.join(quality)} needs text to evaluate on; pass --text FILE")
    needs_ref = [l.spec.key for l in budget.limits if l.spec.needs == "reference"]
    if needs_ref and reference is None:
        raise BudgetError(f"{budget.path}: {', '.join(needs_ref)} compares with a reference; pass --reference BUNDLE")


def _measure(bundle, budget: Budget, which: set[str], prompts, texts, reference, phase, role: str,
             benched=None, trust=None) -> dict:
    """What ``which`` asks for, of one bundle; ``benched``: its bench figures, when already measured."""
    from . import bench, evaluate

    m: dict = {}
    if "size" in which:
        m["size_mb"] = bench.bundle_size_bytes(bundle, verify=False) / 1e6
    if "bench" in which:
        b = benched
        if b is None:
            with phase(f"benchmarking the {role} ({len(prompts)} prompts, {budget.settings.runs} runs)"):
                b = bench.measure(bundle, prompts, bench_options(budget.settings, trust))
        m.update({k: b.median(k) for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_mb")})
    if which & {"text", "reference"}:
        ref = reference if "reference" in which else None
        with phase(f"evaluating the {role} on {len(texts)} text(s)" + (" with the reference" if ref else "")):
            e = evaluate.evaluate(bundle, texts, eval_options(budget.settings, trust), reference=ref)
        m.update(perplexity=e.perplexity, eval_tokens=e.tokens)
        if ref is not None:
            m.update(reference_perplexity=e.reference_perplexity, perplexity_ratio=e.perplexity_ratio,
                     greedy_agreement=e.greedy_agreement, greedy_disagreement=1 - e.greedy_agreement)
    return m


def run_gate(bundle: str | Path, budget: Budget, baseline: str | Path | None = None,
             reference: str | Path | None = None, texts: Sequence[str | Path] = (),
             phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
             trust=None) -> GateReport:
    """Measure what ``budget`` asks for and compare. Raises (an EdgedecError) on invalid input before
    measuring anything; returns a report whose ``passed`` says whether every limit holds. ``trust``:
    ``Engine.load``'s, for every bundle measured (bundles with native code need it)."""
    from . import bench, evaluate
    from .runtime.bundle import Bundle

    t0 = time.perf_counter()
    _check_inputs(budget, baseline, reference, texts)
    for given, used, what in ((baseline, budget.relative, "--baseline"),
                              (reference, budget.needs("reference"), "--reference"),
                              (texts, budget.needs("text") or budget.needs("reference"), "--text")):
        if given and not used:
            log.warning("%s is not used: %s states no limit that needs it", what, budget.path)
    text_pairs = evaluate.read_texts(texts) if (budget.needs("text") or budget.needs("reference")) else []
    which = {l.spec.needs for l in budget.limits}
    prompts = []
    if "bench" in which:
        s = budget.settings
        prompts = bench.load_prompts(s.prompts) if s.prompts else list(bench.BUILTIN_PROMPTS)
    with phase("validating bundles"):
        Bundle.open(bundle)
        base_which = {l.spec.needs for l in budget.relative}
        if base_which:
            Bundle.open(baseline)
        if "reference" in which:
            Bundle.open(reference)
    benched = [None, None]
    if "bench" in which and "bench" in base_which:  # both in the same rounds: relative limits compare like with like
        benched = bench.measure_many([(bundle, "bundle", "auto"), (baseline, "baseline", "auto")], prompts,
                                     bench_options(budget.settings, trust), phase)
    measured = _measure(bundle, budget, which, prompts, text_pairs, reference, phase, "bundle", benched[0], trust)
    base = (_measure(baseline, budget, base_which, prompts, text_pairs, None, phase, "baseline", benched[1], trust)
            if base_which else {})
    results = []
    for l in budget.limits:
        metric = l.spec.metric
        b = base.get(metric) if l.relative else None
        threshold = l.threshold(b)
        value = measured[metric]
        ok = value <= threshold if l.spec.bound == "max" else value >= threshold
        results.append(LimitResult(l.spec.key, l.spec.description, l.spec.bound, l.text, threshold,
                                   METRIC_UNITS[metric], value, b, ok))
        log.info("%s", results[-1].message)
    return GateReport(str(bundle), str(budget.path), results, measured,
                      str(baseline) if base_which else None, base,
                      str(reference) if "reference" in which else None, time.perf_counter() - t0)
