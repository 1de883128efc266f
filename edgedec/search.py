"""``edgedec compile MODEL --budget budget.toml``: the fastest bundle that meets every limit, measured here.

The budget is the gate's (:mod:`edgedec.gate`): size, peak memory, decode speed, time to first token,
prefill speed, perplexity, perplexity ratio and greedy disagreement against the source's float32 model.
The search:

1. **Plans** candidates over what this host's targets support (:class:`SearchSpace`): target, weight
   quantization and its options, KV-cache layout, FFN skipping. Each is one build.
2. **Prunes** before building what cannot meet the size or quality limits: a candidate whose size *lower
   bound* (weight bytes alone, from the source's parameter counts and the bits each weight gets) is over
   ``max_size``, and a lossy candidate whose known perplexity cost (:data:`KNOWN_COSTS`, measured on that
   model) is over ``max_perplexity_ratio`` or that meets a zero greedy-disagreement limit. Lossless candidates
   (the exact re-expression of a GGUF grid with float activations, float32) are never pruned on quality.
3. **Builds** the rest, most promising first (:data:`PRIOR_ORDER`), while ``time_limit_s`` allows, and
   measures each: size on disk, and with quality limits perplexity and greedy agreement against the float32
   ``cpu`` bundle of the same source (the reference; built once, or given).
4. **Measures speed** of every built candidate in one :func:`edgedec.bench.measure_many` run (interleaved
   rounds, so they compare like with like): decode tok/s, TTFT, prefill tok/s, peak RSS.
5. **Searches speculation at run time** on the best built candidates that meet the non-speed limits:
   each drafter and draft length on the same bundle, with its plain decoding in the same rounds (no
   rebuild: speculation is a run-time setting; it is lossless, so quality carries over). A drafter's
   decode speed is its speed-up over plain decoding in that run times the plain figure of step 4.
6. **Picks** the fastest candidate meeting every limit, writes it as the bundle (atomically; with the
   drafter and draft length in its manifest when speculation won) and returns every candidate's
   measurements (:class:`SearchResult`). No candidate meets the budget: the result names the closest
   (smallest worst excess over a limit) and the CLI exits 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import BudgetError, ConfigError, EdgedecError

log = logging.getLogger(__name__)

SPEED_CHECK_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SPEED_CHECK_TOKENS = 32

# run-time speculation settings tried on a built bundle (drafter, draft length)
DRAFTERS = (("ngram", 2), ("ngram", 4), ("recycling", 2), ("recycling", 4), ("ngram+recycling", 2),
            ("ngram+recycling", 4))
SPEC_CANDIDATES = 2  # built candidates whose speculation settings are searched
DEFAULT_EVAL_TOKENS = 2048  # perplexity tokens when the budget's [settings] give no max_tokens
BUILD_SHARE = 0.6  # no new build starts after this share of the time limit (the rest is for measuring)
SPEC_SHARE = 0.85  # no speculation search starts after this share
# lossy configurations' perplexity ratio against float32, measured with `edgedec eval --reference` on
# 8,191 held-out tokens (README / docs); a candidate is pruned when even half its measured excess is over
# the limit (measurements on other text differ, hence the margin)
KNOWN_COSTS = {
    "SmolLM2-135M-Instruct": {
        "cpu int4": 1.0044, "cpu int4:round_offsets=balanced": 1.0231, "cpu int4:round_offsets=fast": 1.0419,
        "cpu int8": 1.0059, "cpu-tvm int4:activations=int8": 1.0122,
        "cpu int4 ffn-skip": 2.81,  # ratio 0.25: x2.80 against the int4 bundle
    },
}


# ------------------------------------------------------------------------------------------------
def speed_check(bundle: str | Path, new_tokens: int = SPEED_CHECK_TOKENS, threads: int | None = None) -> dict:
    """A quick decode-speed figure for a freshly built bundle: load it, decode 8 tokens to warm up, then
    ``new_tokens`` greedy tokens (end of sequence ignored). A few seconds; ``edgedec bench`` measures properly."""
    from .runtime import Engine

    engine = Engine.load(bundle, threads=threads)
    for _ in engine.generate(SPEED_CHECK_PROMPT, max_new_tokens=8, ignore_eos=True):
        pass
    for _ in engine.generate(SPEED_CHECK_PROMPT, max_new_tokens=new_tokens, ignore_eos=True):
        pass
    st = engine.last_stats
    return {"decode_tok_s": st.decode_tok_s, "new_tokens": st.new_tokens, "ttft_ms": st.ttft_s * 1000,
            "threads": engine.threads, "drafter": st.drafter or None}


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One build: target, weight pass (``None``: float32), KV layout, extra passes (FFN skipping)."""

    target: str
    quant: str | None = None  # a pass spec: "int4", "int4:activations=int8", "int8", ...
    kv: str = "fp32"
    extra: tuple[str, ...] = ()  # more pass specs, e.g. ("ffn-skip",)

    @property
    def name(self) -> str:
        parts = [self.target, self.quant or "fp32"] + [f"kv {self.kv}"] * (self.kv != "fp32") + list(self.extra)
        return " ".join(parts)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name)

    def compile_options(self, max_context: int | None):
        from .compiler.pipeline import CompileOptions
        from .passes.base import parse_pass_spec

        specs = ([self.quant] if self.quant else []) + list(self.extra)
        passes = tuple((n, tuple(o.items())) for n, o in map(parse_pass_spec, specs))
        return CompileOptions(target=self.target, passes=passes, kv=self.kv, max_context=max_context, force=True)

    def weight_bits(self) -> tuple[float, float]:
        """(bits of a projection, bits of the embedding / head) this configuration stores, at least."""
        if self.quant is None:
            return 32.0, 32.0
        name = self.quant.split(":")[0]
        if name == "int8":
            return 8.0, 8.0
        if name == "int4":
            return 4.0, 8.0
        return 8.0, 8.0  # qdq: int8 weights

    def lossless(self, source_exact_int4: bool) -> bool:
        """Computes the source's model exactly (up to float32 summation order)?"""
        from .passes.int4 import LOSSLESS_TARGETS

        if self.kv != "fp32" or self.extra:
            return False
        if self.quant is None:
            return True
        return (self.quant == "int4" and self.target in LOSSLESS_TARGETS and source_exact_int4)


@dataclass(frozen=True)
class SearchSpace:
    """The builds to consider, most promising first."""

    configs: tuple[Config, ...]

    @classmethod
    def for_host(cls, targets: Sequence[str] | None = None, quants: Sequence[str] | None = None) -> "SearchSpace":
        """Every configuration this host can build and run, optionally restricted to ``targets`` and
        ``quants`` (pass specs; ``"none"`` for float32)."""
        from .targets.auto import host_cannot_run
        from .targets.tvm_target import host_cpu_flags
        from .targets.tvm_quant import VNNI_FLAG

        names = list(targets) if targets else ["cpu-tvm", "cpu"]
        for t in names:
            if t not in ("cpu", "cpu-tvm"):
                raise ConfigError(f"--budget searches the cpu and cpu-tvm targets, not {t}")
        usable = [t for t in names if host_cannot_run(t) is None]
        if not usable:
            raise ConfigError("--budget: this host cannot run " + ", ".join(
                f"{t} ({host_cannot_run(t)})" for t in names))
        configs = []
        for c in PRIOR_ORDER:
            if c.target not in usable:
                continue
            if c.quant == "int4:activations=int8" and VNNI_FLAG not in host_cpu_flags():
                continue
            configs.append(c)
        if quants:
            wanted = {None if q.lower() == "none" else q for q in quants}
            configs = [c for c in configs if c.quant in wanted]
            if not configs:
                configs = [Config(t, q) for t in usable for q in wanted]
        return cls(tuple(configs))


# most promising first (measured decode speed on SmolLM2, docs/budget-search.md); the time limit cuts the tail
PRIOR_ORDER = (
    Config("cpu-tvm", "int4:activations=int8"),
    Config("cpu-tvm", "int4", kv="fp16"),
    Config("cpu-tvm", "int4"),
    Config("cpu", "int4", extra=("ffn-skip",)),
    Config("cpu", "int4:round_offsets=fast"),
    Config("cpu", "int4:round_offsets=balanced"),
    Config("cpu", "int4"),
    Config("cpu", "int8"),
    Config("cpu-tvm", None),
    Config("cpu", None),
)


@dataclass(frozen=True)
class SearchOptions:
    time_limit_s: float = 1800.0
    prompts: Path | None = None  # bench prompts (default: the budget's [settings] prompts, else the built-in set)
    texts: tuple[Path, ...] = ()  # quality text (default: held-out prose from Python's own documentation)
    reference: Path | None = None  # a float32 bundle of the same source (default: built)
    max_context: int | None = None
    force: bool = False
    keep: bool = False  # keep every candidate's bundle in OUTPUT.candidates/ (default: only the winner)
    drafters: tuple = DRAFTERS  # (drafter, draft length) pairs tried on the best candidates; () for none

    def __post_init__(self):
        if not self.time_limit_s > 0:
            raise ConfigError(f"--time-limit must be > 0 seconds, got {self.time_limit_s}")


@dataclass
class Candidate:
    config: Config
    drafter: str | None = None
    draft_len: int | None = None
    status: str = "planned"  # planned | pruned | skipped | failed | met | not met
    why: str | None = None  # pruned / skipped / failed: the reason
    predicted_size_mb: float | None = None  # lower bound: weight bytes alone
    lossless: bool = False
    measurements: dict = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # the limits it breaks, with figures
    excess: float | None = None  # worst measured / limit over the broken limits (1 = on the limit)
    bundle: Path | None = None
    build_s: float | None = None

    @property
    def name(self) -> str:
        return self.config.name + (f" + {self.drafter} x{self.draft_len}" if self.drafter else "")

    @property
    def measured(self) -> bool:
        return bool(self.measurements)

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.config.target, "quant": self.config.quant or "none",
                "kv": self.config.kv, "extra_passes": list(self.config.extra), "drafter": self.drafter,
                "draft_len": self.draft_len, "status": self.status, "why": self.why,
                "predicted_min_size_mb": self.predicted_size_mb, "lossless": self.lossless,
                "measurements": self.measurements, "broken": self.broken, "excess": self.excess,
                "build_s": self.build_s}


@dataclass
class SearchResult:
    budget_path: str
    output: str
    candidates: list[Candidate]
    winner: Candidate | None
    closest: Candidate | None
    reason: str  # why the winner won, or why nothing did
    reference: str | None
    seconds: float
    settings: dict

    def verdict(self) -> str:
        if self.winner is not None:
            return f"winner: {self.winner.name} -> {self.output} ({self.reason})"
        return f"no candidate meets the budget; closest: {self.closest.name if self.closest else 'none'} ({self.reason})"

    def to_dict(self) -> dict:
        return {"edgedec_search": 1, "budget": self.budget_path, "output": self.output,
                "winner": self.winner.name if self.winner else None,
                "closest": self.closest.name if self.closest else None, "reason": self.reason,
                "reference": self.reference, "seconds": round(self.seconds, 1), "settings": self.settings,
                "pareto_front": [c.name for c in pareto_front(self.candidates)],
                "candidates": [c.to_dict() for c in self.candidates]}


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a source by role: embedding table, separate LM head (0 when tied), other matrices, vectors."""

    embedding: int
    head: int
    matrices: int
    vectors: int


def param_counts(model: str | None) -> ParamCounts:
    """From the GGUF header or the safetensors headers: no weight is read."""
    from .models import source as sources

    kind, path, _ = sources.resolve(model)
    shapes: dict[str, tuple[int, ...]] = {}
    if kind == "gguf":
        from gguf import GGUFReader

        for t in GGUFReader(str(path)).tensors:
            shapes[t.name] = tuple(int(d) for d in t.shape if int(d) > 1)
        emb, head = "token_embd.weight", "output.weight"
    else:
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    shapes[name] = tuple(int(d) for d in info["shape"] if int(d) > 1)
        emb, head = "model.embed_tokens.weight", "lm_head.weight"
    size = lambda s: int(__import__("math").prod(s)) if s else 1  # noqa: E731
    counts = {"embedding": 0, "head": 0, "matrices": 0, "vectors": 0}
    for name, shape in shapes.items():
        role = ("embedding" if name == emb else "head" if name == head else
                "matrices" if len(shape) >= 2 else "vectors")
        counts[role] += size(shape)
    return ParamCounts(**counts)


def min_size_mb(config: Config, params: ParamCounts) -> float:
    """A lower bound of the bundle's size: the weights' bytes at the bits they get, no scales, no tokenizer."""
    body, table = config.weight_bits()
    bits = params.matrices * body + (params.embedding + params.head) * table + params.vectors * 32
    return bits / 8 / 1e6


def _limit(budget, key: str):
    return next((l for l in budget.limits if l.spec.key == key), None)


def prune(candidate: Candidate, budget, registry_name: str | None) -> str | None:
    """Why ``candidate`` cannot meet ``budget`` before it is built (None: it may)."""
    from .gate import format_value

    if (l := _limit(budget, "max_size")) is not None and candidate.predicted_size_mb is not None \
            and candidate.predicted_size_mb > l.value:
        return (f"its weights alone take {format_value(candidate.predicted_size_mb, 'MB')} "
                f"> max_size {format_value(l.value, 'MB')}")
    if candidate.lossless:
        return None
    if (l := _limit(budget, "max_greedy_disagreement")) is not None and l.value == 0:
        return "lossy, and max_greedy_disagreement is 0"
    known = KNOWN_COSTS.get(registry_name or "", {}).get(candidate.config.name)
    if (l := _limit(budget, "max_perplexity_ratio")) is not None and known is not None:
        floor = 1 + (known - 1) / 2
        if floor > l.value:
            return (f"measured perplexity ratio {known:.4f} on this model (at least {floor:.4f} on other text) "
                    f"> max_perplexity_ratio {l.value:g}")
    return None


# ------------------------------------------------------------------------------------------------
QUALITY_KEYS = ("max_perplexity", "max_perplexity_ratio", "max_greedy_disagreement")


def check_budget(budget) -> None:
    """Refuse what the search cannot measure (exit 2)."""
    if budget.relative:
        keys = ", ".join(f"{l.spec.key} = {l.text!r}" for l in budget.relative)
        raise BudgetError(f"{budget.path}: {keys} is relative to a baseline; --budget searches absolute limits "
                          "(write the figure itself)")


def default_texts() -> list[tuple[str, str]]:
    """Held-out prose: the last 40 of Python's ``pydoc_data.topics`` entries (calibration uses the first)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[-40:]
    return [("pydoc_data.topics[-40:]", "\n\n".join(topics[k] for k in keys))]


def evaluate_limits(c: Candidate, budget) -> None:
    """Set ``c.status``, ``c.broken`` and ``c.excess`` from its measurements."""
    from .gate import METRIC_UNITS, format_value

    broken, excess = [], []
    for l in budget.limits:
        value = c.measurements.get(l.spec.metric)
        if value is None:
            continue
        ok = value <= l.value if l.spec.bound == "max" else value >= l.value
        if not ok:
            unit = METRIC_UNITS[l.spec.metric]
            op = "<=" if l.spec.bound == "max" else ">="
            broken.append(f"{l.spec.key} {format_value(value, unit)} (limit {op} {format_value(l.value, unit)})")
            if l.spec.metric in ("perplexity_ratio",):  # a ratio's excess is in its distance from 1
                excess.append((value - 1) / max(l.value - 1, 1e-9) if l.value > 1 else float("inf"))
            elif l.spec.bound == "max":
                excess.append(value / l.value if l.value else float("inf"))
            else:
                excess.append(l.value / value if value else float("inf"))
    c.broken = broken
    c.excess = max(excess) if excess else 1.0
    c.status = "not met" if broken else "met"


def _missing_measurements(c: Candidate, budget) -> list[str]:
    return [l.spec.key for l in budget.limits if l.spec.metric not in c.measurements]


def search(model: str | None, output: str | Path, budget, space: SearchSpace, options: SearchOptions = SearchOptions(),
           phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
           notify: Callable[[str], None] = log.info) -> SearchResult:
    """Search ``space`` for the fastest bundle meeting ``budget`` (a :class:`edgedec.gate.Budget`) and
    write it to ``output``. Raises on invalid input before any build; returns every candidate's figures."""
    from . import bench, evaluate, gate
    from .compiler import bundle_writer
    from .compiler.pipeline import compile_model
    from .models import source as sources

    t0 = time.perf_counter()
    output = Path(output)
    check_budget(budget)
    bundle_writer.check_output(output, options.force)
    s = budget.settings
    prompt_file = options.prompts or s.prompts
    prompts = bench.load_prompts(prompt_file) if prompt_file else list(bench.BUILTIN_PROMPTS)
    needs_quality = any(l.spec.key in QUALITY_KEYS for l in budget.limits)
    needs_reference = any(l.spec.needs == "reference" for l in budget.limits)
    texts = evaluate.read_texts(options.texts) if options.texts else default_texts()
    eval_opts = dataclasses.replace(gate.eval_options(s), max_tokens=s.max_tokens or DEFAULT_EVAL_TOKENS)
    bench_opts = gate.bench_options(s)
    if options.reference is not None:
        from .runtime.bundle import Bundle

        Bundle.open(options.reference)

    _, _, registry_name = sources.resolve(model)
    from .targets.auto import default_weight_passes, source_weights

    exact_int4 = bool(default_weight_passes(source_weights(model), "cpu-tvm")[0])
    params = param_counts(model)
    candidates = [Candidate(c) for c in space.configs]
    for c in candidates:
        c.predicted_size_mb = min_size_mb(c.config, params)
        c.lossless = c.config.lossless(exact_int4)
        if why := prune(c, budget, registry_name):
            c.status, c.why = "pruned", why

    work = output.with_name(f".{output.name}.search")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reference = options.reference
    built: list[Candidate] = []
    try:
        def out_of_time() -> str | None:  # checked before every build, the reference's included
            elapsed = time.perf_counter() - t0
            if elapsed > BUILD_SHARE * options.time_limit_s:
                return f"time limit: {elapsed:.3g} s of {options.time_limit_s:.3g} s spent before its build"
            return None

        if needs_reference and reference is None and any(c.status == "planned" for c in candidates):
            if why := out_of_time():  # no reference, no candidate: every build would start after the limit
                for c in candidates:
                    if c.status == "planned":
                        c.status, c.why = "skipped", why
        if needs_reference and reference is None and any(c.status == "planned" for c in candidates):
            ref_config = Config("cpu", None)
            reference = work / "reference-cpu-fp32"
            with phase("building the reference (cpu float32)"):
                compile_model(model, reference, ref_config.compile_options(options.max_context))
        for c in candidates:
            if c.status != "planned":
                continue
            if why := out_of_time():
                c.status, c.why = "skipped", why
                continue
            c.bundle = work / c.config.slug
            t = time.perf_counter()
            try:
                with phase(f"building {c.name}"):
                    compile_model(model, c.bundle, c.config.compile_options(options.max_context))
            except EdgedecError as exc:
                c.status, c.why, c.bundle = "failed", str(exc), None
                notify(f"{c.name} failed to build: {exc}")
                continue
            c.build_s = round(time.perf_counter() - t, 1)
            c.measurements["size_mb"] = bench.bundle_size_bytes(c.bundle, verify=False) / 1e6
            if needs_quality:
                with phase(f"evaluating {c.name}" + (" against the reference" if reference else "")):
                    e = evaluate.evaluate(c.bundle, texts, eval_opts, reference=reference)
                c.measurements.update(perplexity=e.perplexity, eval_tokens=e.tokens)
                if reference is not None:
                    c.measurements.update(perplexity_ratio=e.perplexity_ratio, greedy_agreement=e.greedy_agreement,
                                          greedy_disagreement=1 - e.greedy_agreement)
            built.append(c)
        if built:
            notify(f"benchmarking {len(built)} candidates in interleaved rounds")
            runs = bench.measure_many([(c.bundle, c.name, None) for c in built], prompts, bench_opts, phase)
            for c, b in zip(built, runs):
                c.measurements.update({k: b.median(k) for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s",
                                                                "peak_rss_mb")})
                evaluate_limits(c, budget)
        spec_rows: list[Candidate] = []
        speed_keys = {"min_decode_tok_s", "max_ttft", "min_prefill_tok_s", "max_peak_rss"}
        eligible = [c for c in built if not [b for b in c.broken if b.split()[0] not in speed_keys]]
        eligible.sort(key=lambda c: -c.measurements["decode_tok_s"])
        if options.drafters and eligible and time.perf_counter() - t0 < SPEC_SHARE * options.time_limit_s:
            for base in eligible[:SPEC_CANDIDATES]:
                entries = [(base.bundle, "plain", None)] + [(base.bundle, f"{d} x{k}", d) for d, k in options.drafters]
                rows = []
                for d, k in options.drafters:
                    rows.append(Candidate(base.config, d, k, lossless=base.lossless, bundle=base.bundle,
                                          predicted_size_mb=base.predicted_size_mb))
                notify(f"speculation on {base.name}: {len(options.drafters)} settings and plain decoding in the same rounds")
                try:
                    runs = bench.measure_many(entries, prompts, bench_opts, phase)
                except EdgedecError as exc:
                    notify(f"speculation on {base.name} not measured: {exc}")
                    continue
                plain = runs[0]
                for row, b in zip(rows, runs[1:]):
                    ratio = b.median("decode_tok_s") / plain.median("decode_tok_s")
                    row.measurements = {k: v for k, v in base.measurements.items()}
                    row.measurements.update(
                        decode_tok_s=base.measurements["decode_tok_s"] * ratio, decode_tok_s_run=b.median("decode_tok_s"),
                        plain_tok_s_run=plain.median("decode_tok_s"), speedup_vs_plain=ratio,
                        ttft_ms=b.median("ttft_ms"), prefill_tok_s=b.median("prefill_tok_s"),
                        peak_rss_mb=b.median("peak_rss_mb"),
                        accepted_per_verify=(b.speculation or {}).get("mean_accepted_per_step"))
                    evaluate_limits(row, budget)
                    spec_rows.append(row)
        elif options.drafters and eligible:
            notify("speculation not searched: the time limit was reached")
        # insert each bundle's speculation rows after its plain row
        ordered = []
        for c in candidates:
            ordered.append(c)
            ordered += [r for r in spec_rows if r.config == c.config]
        candidates = ordered
        met = [c for c in candidates if c.status == "met" and not _missing_measurements(c, budget)]
        winner = max(met, key=lambda c: c.measurements["decode_tok_s"]) if met else None
        closest = None
        if winner is None:
            measured = [c for c in candidates if c.status == "not met"]
            if measured:
                closest = min(measured, key=lambda c: c.excess)
                reason = f"the smallest excess over a limit: {'; '.join(closest.broken)}"
            else:
                sized = [c for c in candidates if c.predicted_size_mb is not None]
                closest = min(sized, key=lambda c: c.predicted_size_mb) if sized else None
                reason = (f"nothing was measured; the smallest: {closest.why}" if closest and closest.why
                          else "nothing was measured")
        else:
            reason = _why_won(winner, met)
            _publish(winner, output, work)
    finally:
        if options.keep:
            kept = output.with_name(f"{output.name}.candidates")
            shutil.rmtree(kept, ignore_errors=True)
            if work.exists():
                work.rename(kept)
        else:
            shutil.rmtree(work, ignore_errors=True)
    for c in candidates:
        c.bundle = None
    settings = {"prompts": str(prompt_file) if prompt_file else "built-in", "texts": [n for n, _ in texts],
                "eval_tokens": eval_opts.max_tokens, "runs": bench_opts.runs, "warmup": bench_opts.warmup,
                "new_tokens": bench_opts.new_tokens, "threads": bench_opts.threads,
                "time_limit_s": options.time_limit_s}
    return SearchResult(str(budget.path), str(output), candidates, winner, closest, reason,
                        str(options.reference) if options.reference else ("built: cpu float32" if needs_reference
                                                                          else None),
                        time.perf_counter() - t0, settings)


def _why_won(winner: Candidate, met: list[Candidate]) -> str:
    rest = sorted((c for c in met if c is not winner), key=lambda c: -c.measurements["decode_tok_s"])
    speed = winner.measurements["decode_tok_s"]
    why = f"the fastest of {len(met)} meeting every limit: {speed:,.1f} tok/s"
    if rest:
        why += f", {speed / rest[0].measurements['decode_tok_s']:.2f}x the next ({rest[0].name})"
    if winner.drafter:
        why += f"; speculation {winner.measurements['speedup_vs_plain']:.2f}x its plain decoding in the same rounds"
    return why


def _publish(winner: Candidate, output: Path, work: Path) -> None:
    """Move the winner's bundle to ``output`` (atomic rename); with a drafter, its manifest says so."""
    from .compiler import bundle_writer
    from .runtime.bundle import MANIFEST, Bundle

    staged = work / f".winner-{winner.config.slug}"
    shutil.copytree(winner.bundle, staged)
    manifest = json.loads((staged / MANIFEST).read_text())
    for key in ("files", "format", "format_version"):
        manifest.pop(key, None)
    manifest["search"] = {"candidate": winner.name, "decode_tok_s": winner.measurements.get("decode_tok_s")}
    if winner.drafter:
        manifest["speculation"] = {"drafter": winner.drafter, "draft_len": winner.draft_len}
    bundle_writer.write_manifest(staged, manifest)
    Bundle.open(staged)
    bundle_writer.publish(staged, output)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Measured candidates no other beats on both size (smaller) and decode speed (faster)."""
    pts = [c for c in candidates if "decode_tok_s" in c.measurements and "size_mb" in c.measurements]
    front = []
    for c in pts:
        s, v = c.measurements["size_mb"], c.measurements["decode_tok_s"]
        if not any(o is not c and o.measurements["size_mb"] <= s and o.measurements["decode_tok_s"] >= v
                   and (o.measurements["size_mb"] < s or o.measurements["decode_tok_s"] > v) for o in pts):
            front.append(c)
    return sorted(front, key=lambda c: c.measurements["size_mb"])


def plot(result: SearchResult, out: str | Path) -> Path:
    """Size vs decode speed of every measured candidate; the Pareto front joined, met ones filled, the winner
    marked. Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'edgedec[bench]'") from exc
    out = Path(out)
    pts = [c for c in result.candidates if "decode_tok_s" in c.measurements and "size_mb" in c.measurements]
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in pts:
        x, y = c.measurements["size_mb"], c.measurements["decode_tok_s"]
        ax.scatter([x], [y], marker="*" if c is result.winner else "o", s=160 if c is result.winner else 40,
                   facecolors=("tab:green" if c.status == "met" else "none"), edgecolors="tab:green"
                   if c.status == "met" else "tab:red")
        ax.annotate(c.name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(result.candidates)
    ax.plot([c.measurements["size_mb"] for c in front], [c.measurements["decode_tok_s"] for c in front],
            "--", color="grey", label="Pareto front (size, speed)")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("decode (tokens/s)")
    ax.set_title(f"edgedec compile --budget {Path(result.budget_path).name}: filled = meets every limit")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
