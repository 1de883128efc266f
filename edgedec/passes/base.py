"""The pass contract: ONNX in, ONNX out, an honest ``modified`` flag, checked pre- and post-conditions.

A pass has a frozen, typed config whose fields carry one-line help (usable as CLI help) and whose
``validate`` rejects invalid combinations with a message naming the field. ``run_passes`` runs a
sequence, times each pass, records sizes before and after, and when a pass fails re-raises with the
names of the passes that already ran.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx

from ..errors import ConfigError, EdgedecError


class PassError(EdgedecError):
    """A pass could not run: its input lacks the structure it needs, or its output breaks its guarantee."""


def option(default: Any, help: str) -> Any:
    """A config field with a default and a one-line description."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PassConfig:
    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))  # resolves string annotations (from __future__ import annotations)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = hints.get(f.name)
            if expected in (int, float, bool, str) and not isinstance(value, expected) and not (
                expected is float and isinstance(value, int) and not isinstance(value, bool)
            ):
                raise ConfigError(f"{type(self).__name__}.{f.name} must be {expected.__name__}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field for invalid values or combinations."""

    @classmethod
    def describe(cls) -> list[dict]:
        return [{"name": f.name, "type": str(f.type), "default": f.default, "help": f.metadata.get("help", "")}
                for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    report: dict = field(default_factory=dict)  # recorded in the manifest's pass log


@dataclass
class PassContext:
    """What the pipeline knows beyond the graph, for passes that need it (calibration, source-aware choices).

    arch: ``ArchFacts.to_dict()``; source: ``SourceInfo.to_dict()`` (``weight_format`` lists the GGUF tensor
    types, e.g. "F32,Q4_1,Q8_0"); tokenizer_json: the serialized tokenizer; work_dir: scratch space that
    is deleted after the compile; kv_positions: the positions a key can be written at when the runtime keeps
    fewer than the graph's (a sink + sliding window re-rotates keys into sinks + window slots), else None.
    """

    arch: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    tokenizer_json: str | None = None
    work_dir: Any = None
    kv_positions: int | None = None


class Pass(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | None = None, context: PassContext | None = None):
        self.context = context or PassContext()
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"{self.name} takes a {self.config_class.__name__}, got {type(self.config).__name__}")

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise PassError saying what was looked for when ``model`` lacks what the pass needs."""

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        """Raise PassError when the output breaks the pass's guarantee."""

    @abstractmethod
    def apply(self, model: onnx.ModelProto) -> PassResult: ...

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        result = self.apply(model)
        self.ensures(model, result)
        return result


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model with its weights (initializers held in memory or as external data)."""
    from onnx.external_data_helper import uses_external_data

    total = model.ByteSize()
    for init in model.graph.initializer:
        if uses_external_data(init):
            info = {e.key: e.value for e in init.external_data}
            total += int(info.get("length", 0))
    return total


def run_passes(model: onnx.ModelProto, passes: list[Pass]) -> tuple[onnx.ModelProto, list[dict]]:
    """Run ``passes`` in order; return the final model and the pass log for the manifest."""
    log, ran = [], []
    for p in passes:
        size_before = model_bytes(model)
        t = time.perf_counter()
        try:
            result = p(model)
        except EdgedecError as exc:
            after = f" (after {', '.join(ran)})" if ran else ""
            raise type(exc)(f"pass {p.name}{after}: {exc}") from exc
        log.append({
            "pass": p.name,
            "config": p.config.to_dict(),
            "modified": result.modified,
            "seconds": round(time.perf_counter() - t, 3),
            "bytes_before": size_before,
            "bytes_after": model_bytes(result.model),
            "report": result.report,
        })
        ran.append(p.name)
        model = result.model
    return model, log


def create_pass(name: str, options: dict | None = None, context: PassContext | None = None) -> Pass:
    """Instantiate the registered pass ``name`` with config ``options`` (unknown keys are refused)."""
    import importlib

    from ..registry import PASSES

    if name not in PASSES:
        raise ConfigError(f"unknown pass {name!r}; valid passes: {', '.join(PASSES) or '(none)'}")
    module, cls_name = PASSES[name]["impl"].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"pass {name} has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(fields) or '(none)'}")
    return cls(cls.config_class(**options), context)


def parse_pass_spec(spec: str) -> tuple[str, dict]:
    """Parse ``name`` or ``name:key=value,key=value`` (values: int, float, true/false, or string)."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"bad pass option {item!r} in {spec!r}; expected key=value")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    value = conv(raw)
                    break
                except ValueError:
                    pass
        key = key.strip()
        if key in options:
            raise ConfigError(f"pass option {key!r} is given twice in {spec!r}")
        options[key] = value
    return name.strip(), options
