"""The compile pipeline in one readable function.

ONNX targets: load -> export -> verify the export -> passes -> build -> bundle.
TVM targets (``builds_from_weights``): load -> write the weights -> the source's reference logits -> free the
source -> build the library -> bundle -> verify the staged bundle through the runtime (:mod:`.verify`).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import onnx

from .. import __version__
from ..errors import ConfigError, ModelError, UnsupportedError
from ..passes import kv_cache as kv_layout
from ..passes.base import PassContext, create_pass, run_passes
from ..registry import PASSES
from ..runtime.trust import NATIVE_FORMATS, sign_with_local_key
from ..targets import get_target
from ..targets.auto import confirm_lossless as auto_confirm
from . import bundle_writer, verify
from . import draft as draft_build

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"  # or "auto": the fastest target this host runs for the weights (targets/auto.py)
    auto_weights: bool = False  # no weight precision given: keep the source's exactly (int4 where exact)
    max_context: int | None = None  # longest sequence the bundle supports (default: min(model's, 8192))
    verify_tolerance: float = 1e-2  # max |logit difference| vs the source model before the compile fails
    force: bool = False  # replace an existing bundle at the output path
    passes: tuple = ()  # (name, {option: value}) pairs, run in order after the target's required passes
    spec: str | None = None  # drafter the bundle speculates with by default (ngram, recycling, ..., model:DRAFT)
    draft_len: int = 4  # tokens drafted per verification when speculating
    draft_vocab: str = "auto"  # --spec model:DRAFT on TVM: the draft head's kept tokens (auto: VocabTrim's K; full; or K)
    chunk: int | None = None  # static-shape targets (npu): tokens per graph call (default: the target's)
    kv: str = "fp32"  # KV-cache layout: fp32, fp16, int8, int4 (the kv-cache pass)
    kv_window: int | None = None  # sink + sliding window: recent tokens kept once the cache is full (None: off)
    kv_sinks: int = 4  # with kv_window: first tokens always kept (attention sinks)

    def __post_init__(self):
        from ..runtime.manifest import LIMITS

        if self.max_context is not None and self.max_context < 16:
            raise ConfigError(f"max_context must be >= 16, got {self.max_context}")
        if self.max_context is not None and self.max_context > LIMITS["context"]:
            raise ConfigError(f"max_context must be <= {LIMITS['context']:,} (the most a bundle may hold), "
                              f"got {self.max_context:,}")
        names = [name for name, _ in self.passes]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"pass {', '.join(twice)} is given twice (-q NAME is --pass NAME); give each pass once")
        if not self.verify_tolerance > 0:
            raise ConfigError(f"verify_tolerance must be > 0, got {self.verify_tolerance}")
        if self.spec is not None:
            from ..runtime.drafters import DRAFTER_NAMES, is_drafter_name

            if not is_drafter_name(self.spec):
                raise ConfigError(f"spec must be one of {', '.join(DRAFTER_NAMES)}, model:DRAFT or ngram+model:DRAFT, "
                                  f"got {self.spec!r}")
        if self.draft_vocab not in ("auto", "full") and not (self.draft_vocab.isdigit() and int(self.draft_vocab) >= 32
                                                             and int(self.draft_vocab) % 32 == 0):
            raise ConfigError(f"draft_vocab must be auto, full or a multiple of 32 (>= 32), got {self.draft_vocab!r}")
        if not 1 <= self.draft_len <= 64:
            raise ConfigError(f"draft_len must be in [1, 64], got {self.draft_len}")
        if self.chunk is not None and not 1 <= self.chunk <= 1024:
            raise ConfigError(f"chunk must be in [1, 1024], got {self.chunk}")
        from ..passes.kv_cache import KV_DTYPES

        if self.kv not in KV_DTYPES:
            raise ConfigError(f"kv must be one of {', '.join(KV_DTYPES)}, got {self.kv!r}")
        if self.kv_window is not None and self.kv_window < 16:
            raise ConfigError(f"kv_window must be >= 16 tokens, got {self.kv_window}")
        if not 0 <= self.kv_sinks <= 1024:
            raise ConfigError(f"kv_sinks must be in [0, 1024], got {self.kv_sinks}")
        if self.kv_window is not None and self.max_context is not None and \
                self.kv_sinks + self.kv_window > self.max_context:
            raise ConfigError(f"kv_sinks + kv_window = {self.kv_sinks + self.kv_window} exceeds the bundle's "
                              f"{self.max_context} positions (raise --max-context or shrink the window)")


@contextlib.contextmanager
def _quiet_phase(name: str):
    log.info("%s ...", name)
    t = time.perf_counter()
    yield
    log.info("%s done in %.1fs", name, time.perf_counter() - t)


def resolve_defaults(model: str | None, options: CompileOptions):
    """``target="auto"`` and ``auto_weights`` made concrete (:mod:`edgedec.targets.auto`): the options to
    compile with, and the decisions with their reasons."""
    from ..targets import auto

    if options.target != "auto":
        get_target(options.target)  # an unknown name fails before the source is read
    defaults = auto.resolve(model, options)
    return replace(options, target=defaults.target, passes=defaults.passes + tuple(options.passes)), defaults


def compile_model(model: str | None, output: str | Path, options: CompileOptions = CompileOptions(),
                  phase: Callable[[str], contextlib.AbstractContextManager] = _quiet_phase,
                  notify: Callable[[str], None] = log.info, prepare: Callable | None = None) -> dict:
    """Compile ``model`` (HF dir, .gguf, registry name, or None for the default) into a bundle at ``output``.

    ``phase(name)`` wraps each long step (the CLI passes a progress display); ``notify(line)`` gets, once
    the bundle is written, the defaults chosen for ``target="auto"`` / ``auto_weights`` and why.
    ``prepare(loaded, staging)`` may change the loaded model before export and add files to the bundle (a
    draft model's trimmed head: :mod:`edgedec.compiler.draft`); it returns manifest entries to add. Returns
    the manifest.
    """
    from ..models import source as sources
    output = Path(output)
    bundle_writer.check_output(output, options.force)  # before reading (or pulling) the source
    options, defaults = resolve_defaults(model, options)
    target = get_target(options.target)
    if options.chunk is not None and not getattr(target, "static_shapes", False):
        raise ConfigError(f"chunk applies to static-shape targets (npu); target {target.name} has dynamic shapes")
    if options.kv_window is not None and not target.kv_window:
        raise UnsupportedError(f"target {target.name} cannot run a sink + sliding window (--kv-window): its runtime "
                               "backend keeps a fixed cache" + (" on the device" if target.name == "gpu" else ""))
    user_specs = [(n, dict(o)) for n, o in options.passes]
    named = {n for n, _ in user_specs}  # a required pass the user names runs once, with the user's options
    if options.spec and options.spec.startswith("head") and "draft-head" not in named:
        raise ConfigError(f"--spec {options.spec} drafts with a trained head: add --pass draft-head:weights=... "
                          "(from `edgedec calibrate draft-head`)")
    specs = [(name, {}) for name in target.required_passes if name not in named] + user_specs
    if options.kv != "fp32":  # the cache layout is calibrated on the final weights: last
        if "kv-cache" in named:
            raise ConfigError("give the KV-cache layout once: --kv or --pass kv-cache:dtype=..., not both")
        specs.append(("kv-cache", {"dtype": options.kv}))
    if options.spec and "recycling" in options.spec and "top-candidates" not in named \
            and target.name in PASSES["top-candidates"]["targets"]:  # the graph picks recycling's candidates
        specs.append(("top-candidates", {}))
    specs = target.take_passes(specs)
    target.check_passes([name for name, _ in specs])
    for name, opts in specs:
        target.check_pass_options(name, opts)
    context = PassContext()
    passes = [create_pass(name, opts, context) for name, opts in specs]  # validates configs before any work
    for name, _ in specs:
        if target.name not in PASSES[name].get("targets", []):
            raise UnsupportedError(f"pass {name} does not support target {target.name} "
                                   f"(it supports: {', '.join(PASSES[name].get('targets', [])) or 'none'})")
    bundle_writer.check_output(output, options.force)
    if draft_build.is_model_spec(options.spec):
        draft_build.check_source(options.spec)
    timings = {}

    with bundle_writer.staging_dir(output) as tmp:
        t = time.perf_counter()
        with phase("loading model"):
            loaded = sources.load(model)
        timings["load_s"] = time.perf_counter() - t
        extra = prepare(loaded, tmp) if prepare is not None else {}
        arch = loaded.arch
        if hasattr(target, "use_source"):  # a target that reads the source's own quantization (tvm_target)
            target.use_source(loaded.source.to_dict())
        max_positions = min(arch.max_position_embeddings,
                            options.max_context or target.default_max_context or DEFAULT_MAX_CONTEXT)
        if options.max_context is not None and options.max_context > arch.max_position_embeddings:
            log.warning("max context %d is more than the model's %d positions; the bundle holds %d",
                        options.max_context, arch.max_position_embeddings, max_positions)
        if options.kv_window is not None and options.kv_sinks + options.kv_window > max_positions:
            raise ConfigError(f"kv_sinks + kv_window = {options.kv_sinks + options.kv_window} exceeds the bundle's "
                              f"{max_positions} positions (raise --max-context or shrink the window)")
        inv_freq = kv_layout.rotary_inv_freq(loaded.model)
        context.arch, context.source = arch.to_dict(), loaded.source.to_dict()
        if getattr(target, "builds_from_weights", False):  # TVM: a library from the weights, no ONNX graph
            graph_entry, reference, pass_log = _build_from_weights(target, loaded, tmp, max_positions, phase,
                                                                   timings)
            onnx_model = None
        else:
            graph_entry, onnx_model, pass_log, verification = _build_from_onnx(target, loaded, tmp, max_positions,
                                                                                options, passes, context, phase,
                                                                                timings)
        kv_entry = kv_layout.manifest_entry(onnx_model, arch.to_dict(), pass_log, tmp, options.kv_window,
                                            options.kv_sinks, inv_freq,
                                            target.kv_cache_entry(arch, max_positions).get("kv_dtype", "fp32"))
        del onnx_model
        (tmp / "tokenizer.json").write_text(loaded.tokenizer_json)

        defaults_entry = defaults.manifest_entry()
        if check := auto_confirm(defaults, {"decoder": graph_entry}):
            defaults_entry["weights"]["check"] = check
        manifest = {
            "edgedec_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": loaded.source.to_dict(),
            "architecture": arch.to_dict(),
            "target": {**target.manifest_entry(),
                       **({"auto_reason": defaults.target_reason} if defaults.target_reason else {})},
            "graphs": {"decoder": graph_entry, **target.extra_graphs(tmp)},
            "kv_cache": {
                "layout": "per_layer_bnsh",
                "dtype": "float32",
                "shape": ["batch=1", "kv_heads", "capacity", "head_dim"],
                "num_layers": arch.num_layers,
                "kv_heads": arch.num_kv_heads,
                "head_dim": arch.head_dim,
                "max_capacity": max_positions,
                "in_place": True,
                "inputs": ["past_key.{layer}", "past_value.{layer}"],
                "outputs": ["present_key.{layer}", "present_value.{layer}"],
                "note": "present_* must be bound to the same buffer as past_*; the graph writes new "
                        "entries at [total - new, total) and attends over [0, total)",
                **kv_entry,
                **target.kv_cache_entry(arch, max_positions),  # the target's build has the last word
            },
            "tokenizer": {"file": "tokenizer.json", "chat_template": loaded.chat_template, **loaded.special_tokens},
            "verification": None if getattr(target, "builds_from_weights", False) else verification,
            "passes": pass_log,
            **({"speculation": {"drafter": options.spec, "draft_len": options.draft_len}}
               if options.spec and not draft_build.is_model_spec(options.spec) else {}),  # a draft model: attach_draft
            **({"defaults": defaults_entry} if defaults_entry else {}),
            **extra,
            "timings": {k: round(v, 2) for k, v in timings.items()},
        }
        with phase("hashing and writing the bundle"):
            manifest = bundle_writer.write_manifest(tmp, manifest)
        if draft_build.is_model_spec(options.spec):  # a draft model, built for the staged target into tmp/draft
            manifest = draft_build.attach_draft(tmp, manifest, options, phase)
        with phase("checking the bundle"):
            from ..runtime.bundle import Bundle

            Bundle.open(tmp)  # refuse to publish what the runtime would refuse
        if manifest["verification"] is None:  # built from the weights: verify the staged bundle as it runs
            t = time.perf_counter()
            with phase("verifying the built library against the source model"):
                verification = target.skipped_verification() or verify.verify_bundle(
                    tmp, reference, target.verify_tolerance(options))
            manifest["verification"] = manifest["graphs"]["decoder"]["verification"] = verification
            manifest["timings"]["verify_s"] = round(time.perf_counter() - t, 2)
            manifest.pop("files")
            manifest = bundle_writer.write_manifest(tmp, manifest)
        if any(g.get("format") in NATIVE_FORMATS for g in manifest["graphs"].values()):
            # native code: signed with this user's local key, so that the bundle this user just built loads
            # without --trust here, and a copy handed elsewhere is trusted only where that key is
            with phase("signing the bundle with the local key"):
                manifest["signed_by"] = sign_with_local_key(tmp)
        bundle_writer.publish(tmp, output, options.force)
    if defaults.target_reason or defaults.weights_reason:
        notify(defaults.line())
    return manifest


def _build_from_weights(target, loaded, tmp: Path, max_positions: int, phase, timings: dict):
    """The TVM targets: write the weights, keep the source's logits on the verification ids, free the
    source model, build the library. Returns (graph entry, reference, pass log)."""
    arch = loaded.arch
    t = time.perf_counter()
    with phase("writing the weights" + (" (int4)" if getattr(target, "quant", None) else "")):
        description = target.write_weights(loaded.model, arch, tmp, max_positions)
    timings["weights_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with phase("computing the source model's reference logits"):
        reference = verify.source_reference(loaded.model, arch.vocab_size, description)
    timings["reference_s"] = time.perf_counter() - t
    del loaded.model  # the float32 weights: gone before the (memory-hungry) TVM build
    gc.collect()
    t = time.perf_counter()
    with phase(f"building for target {target.name}"):
        graph_entry = target.build_library(arch, tmp, max_positions)
    timings["build_s"] = time.perf_counter() - t
    return graph_entry, reference, []


def _build_from_onnx(target, loaded, tmp: Path, max_positions: int, options: CompileOptions, passes, context,
                     phase, timings: dict):
    """The ONNX targets: export, verify the export against the source, run the passes, build.
    Returns (graph entry, final ONNX model, pass log, verification)."""
    arch = loaded.arch
    work = tmp / "_export"
    t = time.perf_counter()
    with phase("exporting to ONNX"):
        graph_path = target.export(loaded.model, arch, work / "decoder.onnx", max_positions, options)
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with phase("verifying against the source model"):
        verification = target.verify(loaded.model, graph_path, arch, max_positions, options)
    timings["verify_s"] = time.perf_counter() - t
    if verification["max_abs_logit_diff"] > options.verify_tolerance:
        raise ModelError(
            f"the exported graph differs from the source model by {verification['max_abs_logit_diff']:.3g} "
            f"in logits (tolerance {options.verify_tolerance}); refusing to write a wrong bundle"
        )
    del loaded.model

    onnx_model = onnx.load(str(graph_path))
    context.tokenizer_json, context.work_dir = loaded.tokenizer_json, work
    context.kv_positions = options.kv_sinks + options.kv_window if options.kv_window is not None else None
    with phase("running passes" + (f" ({', '.join(p.name for p in passes)})" if passes else "")):
        onnx_model, pass_log = run_passes(onnx_model, passes)

    with phase(f"building for target {target.name}"):
        graph_entry = target.build(onnx_model, tmp, role="decoder")
    shutil.rmtree(work)
    return graph_entry, onnx_model, pass_log, verification
