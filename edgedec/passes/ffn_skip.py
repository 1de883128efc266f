"""Pass ``ffn-skip``: input-adaptive skipping of feed-forward blocks at run time (after FFN-SkipLLM).

FFN-SkipLLM (Jaiswal et al. 2024) observes that in the middle layers of a decoder the residual stream
is *saturated* across many FFN blocks: the hidden state leaving a block points almost the same way as
the one entering it, ``cos(x, x + ffn(x)) ~ 1``, so the block can be skipped for that token. Attention
still runs in every layer, so the KV cache stays complete and later tokens attend to exact keys.

The graph after this pass (one graph; batch 1):

* the *skippable* layers: the ``candidates x skip_per_token`` most saturated (calibrated mean cos) of the
  eligible layers (never the first/last few). Each gets a bool input ``ffn_skip.{l}`` of shape (1,), and
  its FFN block (RMSNorm -> gate/up -> SiLU * up -> down -> residual Add, in whatever form earlier passes
  left it: fused gate/up, MatMulNBits with block-sum corrections, ...) moves into the ``else`` branch of
  an ONNX ``If(ffn_skip.{l})``; the ``then`` branch is ``Identity(x)``. ONNX Runtime runs only the taken
  branch, so a skipped block reads none of its weights and launches none of its kernels (the saved time
  shows in a profile: ``benchmarks/ffn_skip.py --profile``). Other layers keep the plain graph.
* a new output ``ffn_cos``: float ``(skippable,)``, for each skippable layer the cosine similarity of the
  hidden state entering and leaving its FFN block, averaged over the step's new tokens (1.0 where
  skipped). It is computed once for all of them (one Concat per side, then a handful of batched
  reductions), not per layer.

Why per-layer scalar inputs and only some layers (measured, SmolLM2-135M int4, ORT 1.31, 2 threads, ORT
profile): a ``Gather`` pulling the condition out of one (num_layers,) vector costs ~8 us per layer and
token, and an ``If`` per layer plus the cos reductions another few percent of a ~9 ms step; with If on
all 25 eligible layers and nothing skipped the step was ~3% slower than the plain graph.

The FFN block is found structurally, not by name: a residual ``Add(x, f)`` where everything computing
``f`` depends only on ``x`` and initializers (no graph input, no attention) and contains a MatMul; its
nodes feed nothing else. One such block per ``GroupQueryAttention`` layer is required.

What to skip and when is decided by the runtime (:mod:`edgedec.runtime.ffn_skip`) from the calibration
stats recorded in the manifest (``ffn_skip`` section): the eligible layers, each layer's calibrated mean
saturation, the number of blocks to skip per token for the target ratio, warm-up and refresh periods.
Calibration comes from ``edgedec calibrate ffn`` (``stats=PATH``) or, without it, runs inside the pass on
``calibration_text`` (default: prose from Python's own documentation).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option
from .quant_graph import GraphIndex, check_model

log = logging.getLogger(__name__)

SKIP_INPUT = "ffn_skip"  # ffn_skip.{l}: bool (1,), true skips layer l's FFN block this step
COS_OUTPUT = "ffn_cos"  # float (skippable,): cos(x entering FFN, x leaving FFN), mean over new tokens
MECHANISMS = ("if",)
USES = ("fast", "draft")
MATMUL_OPS = ("MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul")
MAX_BLOCK_NODES = 200


SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"


@dataclass
class FfnBlock:
    """Layer ``layer``'s FFN block: ``nodes`` compute f from the residual stream ``x`` (or from the norm
    fused in front of them), and ``add`` adds f back: ``Add(x, f)``, or, after fuse-norms,
    ``SkipSimplifiedLayerNormalization(x, f, gamma)``, which also normalizes the sum for the next layer
    (its output 0) and returns the sum as output 3."""

    layer: int
    x: str  # residual stream entering the block (1, S, hidden)
    add: onnx.NodeProto  # Add or SkipSimplifiedLayerNormalization
    nodes: list  # the block's nodes except ``add``, in graph order

    @property
    def fused(self) -> bool:
        return self.add.op_type == SKIP_NORM

    @property
    def out(self) -> str:
        """Residual stream leaving the block ("" when a fused last norm does not expose it: see name_out)."""
        if self.fused:
            return self.add.output[3] if len(self.add.output) > 3 else ""
        return self.add.output[0]

    def name_out(self) -> str:
        """Make sure the residual stream leaving the block has a name (fused form: output 3); return it."""
        if self.fused:
            while len(self.add.output) < 4:
                self.add.output.append("")
            if not self.add.output[3]:
                self.add.output[3] = f"ffn_skip/{self.layer}/residual"
        return self.out


def _cone(idx: GraphIndex, f: str, stop: set, graph_inputs: set) -> list | None:
    """The nodes computing ``f`` from ``stop`` tensors and initializers only, or None when f needs anything else."""
    seen, stack, reached = {}, [f], False
    while stack:
        t = stack.pop()
        node = idx.producer.get(t)
        if node is None:
            return None
        if id(node) in seen:
            continue
        if node.op_type == "GroupQueryAttention" or node.op_type in ("If", "Loop", "Scan"):
            return None
        seen[id(node)] = node
        if len(seen) > MAX_BLOCK_NODES:
            return None
        for i in node.input:
            if not i or i in idx.inits:
                continue
            if i in stop:
                reached = True
                continue
            if i in graph_inputs:
                return None
            stack.append(i)
    return list(seen.values()) if reached else None


def find_ffn_blocks(model: onnx.ModelProto) -> list[FfnBlock]:
    """Every layer's FFN block, in layer order; PassError saying what was looked for when not one per layer."""
    g = model.graph
    idx = GraphIndex.of(model)
    graph_inputs = {i.name for i in g.input}
    order = {id(n): k for k, n in enumerate(g.node)}
    layers = sum(n.op_type == "GroupQueryAttention" for n in g.node)
    blocks = []
    for add in g.node:
        if add.op_type == "Add" and len(add.input) == 2:
            pairs = ((add.input[0], add.input[1]), (add.input[1], add.input[0]))
        elif add.op_type == SKIP_NORM and len(add.input) >= 3:
            pairs = ((add.input[0], add.input[1]), (add.input[1], add.input[0]))
        else:
            continue
        for x, f in pairs:
            if x in idx.inits or f in idx.inits:
                continue
            stop = {x}
            prod = idx.producer.get(x)
            if prod is not None and prod.op_type == SKIP_NORM:  # the normalized x comes out of the same node
                stop.add(prod.output[0])
            nodes = _cone(idx, f, stop, graph_inputs)
            if not nodes or not any(n.op_type in MATMUL_OPS for n in nodes):
                continue
            inside = {id(n) for n in nodes} | {id(add)}
            if any(o in idx.outputs or any(id(c) not in inside for c in idx.consumers.get(o, []))
                   for n in nodes for o in n.output):
                continue
            if add.op_type == SKIP_NORM and (add.input[0], add.input[1]) != (x, f):
                continue
            blocks.append(FfnBlock(len(blocks), x, add, sorted(nodes, key=lambda n: order[id(n)])))
            break
    if not layers:
        raise PassError("ffn-skip found no GroupQueryAttention node: it needs the edgedec decoder graph")
    if len(blocks) != layers:
        raise PassError(f"ffn-skip looked for one FFN block per layer (a residual Add(x, f) or "
                        f"SkipSimplifiedLayerNormalization(x, f, gamma) with f computed from x and weights only, "
                        f"containing a MatMul) and found {len(blocks)} for {layers} layers")
    return blocks


def add_cos_output(model: onnx.ModelProto, pairs: list[tuple[str, str]], name: str = COS_OUTPUT,
                   per_token: bool = False) -> None:
    """Append nodes computing ``name``: for each (x, h) pair of (1, S, hidden) tensors, ``cos(x[s], h[s])``
    averaged over S (float (len(pairs),)), or per token with ``per_token`` (float (len(pairs), S)).
    One Concat per side, then batched reductions."""
    g = model.graph
    p = f"{name}/"
    eps = numpy_helper.from_array(np.array(1e-12, np.float32), p + "eps")
    g.initializer.extend([eps])
    nodes = [
        helper.make_node("Concat", [x for x, _ in pairs], [p + "x"], axis=0, name=p + "concat_x"),  # (L, S, H)
        helper.make_node("Concat", [h for _, h in pairs], [p + "h"], axis=0, name=p + "concat_h"),  # (L, S, H)
        helper.make_node("Mul", [p + "x", p + "h"], [p + "xh"], name=p + "mul"),
        helper.make_node("ReduceSum", [p + "xh", p + "axis"], [p + "dot"], keepdims=0, name=p + "dot"),  # (L, S)
        helper.make_node("ReduceSumSquare", [p + "x", p + "axis"], [p + "xx"], keepdims=0, name=p + "xx"),
        helper.make_node("ReduceSumSquare", [p + "h", p + "axis"], [p + "hh"], keepdims=0, name=p + "hh"),
        helper.make_node("Mul", [p + "xx", p + "hh"], [p + "den2"], name=p + "den2"),
        helper.make_node("Max", [p + "den2", p + "eps"], [p + "den2c"], name=p + "clamp"),
        helper.make_node("Sqrt", [p + "den2c"], [p + "den"], name=p + "sqrt"),
        helper.make_node("Div", [p + "dot", p + "den"], [p + "cos"], name=p + "div"),  # (L, S)
    ]
    if per_token:
        nodes.append(helper.make_node("Identity", [p + "cos"], [name], name=p + "out"))
    else:
        nodes.append(helper.make_node("ReduceMean", [p + "cos", p + "seq_axis"], [name], keepdims=0, name=p + "mean"))
    g.initializer.extend([numpy_helper.from_array(np.array([2], np.int64), p + "axis"),
                          numpy_helper.from_array(np.array([1], np.int64), p + "seq_axis")])
    g.node.extend(nodes)
    shape = [len(pairs), "sequence"] if per_token else [len(pairs)]
    g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))


def make_skippable(model: onnx.ModelProto, blocks: list[FfnBlock], skippable: list[int]) -> None:
    """Rewrite ``model`` in place: each block of a ``skippable`` layer l into ``If(ffn_skip.{l})``, plus the
    ``ffn_cos`` output over those layers (in the order of ``skippable``).

    Unfused: else = block + ``Add``, then = ``Identity(x)``. Fused (after fuse-norms): else = block +
    ``SkipSimplifiedLayerNormalization(x, f, gamma)``; then = ``SimplifiedLayerNormalization(x, gamma)``
    (the next layer's norm of the unchanged stream) and ``Identity(x)``; the If returns outputs 0 and 3."""
    g = model.graph
    chosen = [b for b in blocks if b.layer in skippable]
    for b in blocks:
        b.name_out()
    moved = {id(n) for b in chosen for n in b.nodes}
    by_add = {id(b.add): b for b in chosen}
    inner = {o for b in chosen for n in b.nodes for o in n.output}
    new_nodes = []
    for node in g.node:
        if id(node) in moved:
            continue
        b = by_add.get(id(node))
        if b is None:
            new_nodes.append(node)
            continue
        l, pre = b.layer, f"ffn_skip/{b.layer}/"
        add = onnx.NodeProto()
        add.CopyFrom(b.add)
        if b.fused:
            outs = [b.add.output[0], b.add.output[3]]
            run_outs = [pre + "normed", pre + "out"]
            add.output[0], add.output[3] = run_outs
            eps = [a for a in b.add.attribute if a.name == "epsilon"]
            norm = helper.make_node(NORM, [b.x, b.add.input[2]], [pre + "skip_normed"], name=pre + "norm",
                                    axis=-1, **({"epsilon": eps[0].f} if eps else {}))
            skip_nodes = [norm, helper.make_node("Identity", [b.x], [pre + "skipped"], name=pre + "identity")]
            skip_outs = [pre + "skip_normed", pre + "skipped"]
        else:
            outs, run_outs, skip_outs = [b.add.output[0]], [pre + "out"], [pre + "skipped"]
            add.output[0] = run_outs[0]
            skip_nodes = [helper.make_node("Identity", [b.x], [pre + "skipped"], name=pre + "identity")]
        vi = lambda names: [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
        run = helper.make_graph([*b.nodes, add], f"layer{l}_ffn", [], vi(run_outs))
        skip = helper.make_graph(skip_nodes, f"layer{l}_skip", [], vi(skip_outs))
        new_nodes.append(helper.make_node("If", [skip_input(l)], outs, name=pre + "if",
                                          then_branch=skip, else_branch=run))
    g.ClearField("node")
    g.node.extend(new_nodes)
    keep = [v for v in g.value_info if v.name not in inner]
    g.ClearField("value_info")
    g.value_info.extend(keep)
    for l in skippable:
        g.input.append(helper.make_tensor_value_info(skip_input(l), TensorProto.BOOL, [1]))
    by_layer = {b.layer: b for b in blocks}
    add_cos_output(model, [(by_layer[l].x, by_layer[l].out) for l in skippable])


def skip_input(layer: int) -> str:
    return f"{SKIP_INPUT}.{layer}"


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FfnSkipConfig(PassConfig):
    ratio: float = option(0.25, "target fraction of all FFN blocks skipped per decoded token (0 < ratio < 1)")
    stats: str = option("", "calibration stats from `edgedec calibrate ffn` (default: calibrate in the pass)")
    use: str = option("fast", "fast: the runtime decodes with skipping by default (lossy); draft: skipping "
                              "only drafts for speculative decoding (lossless), plain decoding stays full")
    warmup: int = option(4, "decoded tokens that always run the full model after the prompt")
    refresh: int = option(16, "every N-th decoded token runs the full model to refresh the saturation (0: never)")
    draft_ratio: float = option(0.0, "fraction of FFN blocks skipped while drafting (0: the same as ratio)")
    candidates: float = option(1.5, "layers that get a run-time switch, as a multiple of the blocks skipped per "
                                    "token (the most saturated eligible ones; more: more adaptive, more overhead)")
    never_skip_first: int = option(-1, "first layers never skipped (-1: from calibration)")
    never_skip_last: int = option(-1, "last layers never skipped (-1: from calibration)")
    mechanism: str = option("if", "how a skipped block saves compute: if (an ONNX If per switchable layer)")
    calibration_text: str = option("", "UTF-8 text to calibrate on when no stats are given (default: prose "
                                       "from Python's pydoc_data.topics)")
    samples: int = option(8, "calibration sequences when calibrating in the pass")
    sequence_length: int = option(256, "tokens per calibration sequence when calibrating in the pass")

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise ConfigError(f"ffn-skip.ratio must be in (0, 1), got {self.ratio}")
        if not 0 <= self.draft_ratio < 1:
            raise ConfigError(f"ffn-skip.draft_ratio must be in [0, 1) (0: the same as ratio), got {self.draft_ratio}")
        if self.candidates < 1:
            raise ConfigError(f"ffn-skip.candidates must be >= 1 (a multiple of the blocks skipped per token), "
                              f"got {self.candidates}")
        if self.stats and not Path(self.stats).expanduser().is_file():
            raise ConfigError(f"ffn-skip.stats: no such file: {self.stats}")
        if self.calibration_text and not Path(self.calibration_text).expanduser().is_file():
            raise ConfigError(f"ffn-skip.calibration_text: no such file: {self.calibration_text}")
        if self.use not in USES:
            raise ConfigError(f"ffn-skip.use must be one of {', '.join(USES)}, got {self.use!r}")
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"ffn-skip.mechanism must be one of {', '.join(MECHANISMS)}, got {self.mechanism!r}")
        if self.warmup < 0:
            raise ConfigError(f"ffn-skip.warmup must be >= 0, got {self.warmup}")
        if self.refresh < 0 or self.refresh == 1:
            raise ConfigError(f"ffn-skip.refresh must be 0 (never) or >= 2, got {self.refresh}")
        for f in ("never_skip_first", "never_skip_last"):
            if getattr(self, f) < -1:
                raise ConfigError(f"ffn-skip.{f} must be >= 0, or -1 for the calibrated value, got {getattr(self, f)}")
        if self.samples < 1:
            raise ConfigError(f"ffn-skip.samples must be >= 1, got {self.samples}")
        if not 8 <= self.sequence_length <= 4096:
            raise ConfigError(f"ffn-skip.sequence_length must be in 8..4096, got {self.sequence_length}")


class FfnSkipPass(Pass):
    name = "ffn-skip"
    config_class = FfnSkipConfig

    def requires(self, model: onnx.ModelProto) -> None:
        if any(v.name.startswith(SKIP_INPUT + ".") for v in model.graph.input):
            raise PassError(f"the graph already has {SKIP_INPUT}.{{layer}} inputs: ffn-skip ran already")
        find_ffn_blocks(model)  # raises, naming what it looked for
        if not self.config.stats and not self.context.tokenizer_json:
            raise PassError("ffn-skip calibrates in the pass when no stats=PATH is given, and needs the model's "
                            "tokenizer (PassContext.tokenizer_json) for that")

    def _stats(self, model: onnx.ModelProto) -> dict:
        if self.config.stats:
            return FfnStats.load(self.config.stats).to_dict()
        from tokenizers import Tokenizer

        text, source = read_calibration_text(self.config.calibration_text or None)
        ids = Tokenizer.from_str(self.context.tokenizer_json).encode(text).ids
        stats = calibrate_ffn_graph(model, ids, self.config.samples, self.config.sequence_length, source=source)
        return stats.to_dict()

    def apply(self, model: onnx.ModelProto) -> PassResult:
        c = self.config
        stats = self._stats(model)
        n = len(find_ffn_blocks(model))
        if len(stats["mean_cos"]) != n:
            raise ConfigError(f"ffn-skip.stats has {len(stats['mean_cos'])} layers, the graph has {n}")
        plan = plan_skipping(stats, c.ratio, c.never_skip_first, c.never_skip_last)
        draft = plan_skipping(stats, c.draft_ratio or c.ratio, c.never_skip_first, c.never_skip_last)
        mean = stats["mean_cos"]
        want = math.ceil(c.candidates * max(plan["skip_per_token"], draft["skip_per_token"]))
        skippable = sorted(sorted(plan["eligible"], key=lambda l: -mean[l])[:want])
        out = onnx.ModelProto()
        out.CopyFrom(model)
        make_skippable(out, find_ffn_blocks(out), skippable)
        section = {
            "mechanism": c.mechanism,
            "use": c.use,
            "inputs": SKIP_INPUT + ".{layer}",
            "input_layout": "bool (1,) per skippable layer: true skips that layer's FFN block for every new token "
                            "of the step",
            "output": COS_OUTPUT,
            "output_layout": "float32 (skippable,): cos(hidden entering, hidden leaving) the FFN block of each "
                             "skippable layer (in the order of 'skippable'), mean over the step's new tokens; "
                             "1.0 where skipped",
            "num_layers": n,
            "eligible": plan["eligible"],
            "skippable": skippable,
            "mean_cos": [round(float(v), 6) for v in mean],
            "ratio": c.ratio,
            "skip_per_token": plan["skip_per_token"],
            "draft_skip_per_token": draft["skip_per_token"],
            "threshold": plan["threshold"],
            "warmup": c.warmup,
            "refresh": c.refresh,
            "calibration": {k: stats[k] for k in ("source", "tokens") if k in stats},
        }
        return PassResult(out, True, {"ffn_skip": section})

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        check_model(result.model)
        section = result.report["ffn_skip"]
        ifs = [n for n in result.model.graph.node if n.op_type == "If" and n.name.startswith("ffn_skip/")]
        if len(ifs) != len(section["skippable"]):
            raise PassError(f"ffn-skip made {len(ifs)} If nodes for {len(section['skippable'])} skippable layers")
        if section["skip_per_token"] > len(section["skippable"]):
            raise PassError("ffn-skip has fewer skippable layers than blocks to skip per token")


# Calibration: FFN saturation measured on text (`edgedec calibrate ffn`, or inside the pass without stats=PATH).

RECOMMENDED_RATIOS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
FFN_STATS_KIND = "edgedec-ffn-saturation"
FFN_STATS_VERSION = 1
NEVER_SKIP_MAX_FRACTION = 0.25  # at most this many of the layers at each end are held back


def read_calibration_text(path: str | Path | None) -> tuple[str, str]:
    """(text, source name): the file at ``path``, or prose from Python's own documentation."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"calibration text {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read calibration text {p} as UTF-8: {exc}") from exc
        if not text.strip():
            raise ConfigError(f"calibration text {p} is empty")
        return text, str(p)
    from .qdq import default_calibration_text

    return default_calibration_text(), "pydoc_data.topics"


@dataclass
class FfnStats:
    mean_cos: list  # (num_layers,) mean over calibration tokens of cos(x, x + ffn(x))
    p10_cos: list  # (num_layers,) 10th percentile over tokens
    never_skip_first: int
    never_skip_last: int
    tokens: int
    sequences: int
    source: str
    recommended: dict = field(default_factory=dict)  # "0.25" -> {"skip_per_token", "layers", "threshold"}
    kind: str = FFN_STATS_KIND
    version: int = FFN_STATS_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "FfnStats":
        try:
            d = json.loads(Path(path).expanduser().read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read FFN calibration stats {path}: {exc}") from exc
        if not isinstance(d, dict) or d.get("kind") != FFN_STATS_KIND:
            raise ConfigError(f"{path} is not FFN calibration stats (kind is not {FFN_STATS_KIND!r}); "
                              "make them with `edgedec calibrate ffn`")
        if d.get("version") != FFN_STATS_VERSION:
            raise ConfigError(f"{path}: FFN stats version {d.get('version')!r} is not supported "
                              f"(this edgedec reads {FFN_STATS_VERSION})")
        try:
            stats = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as exc:
            raise ConfigError(f"{path}: FFN stats are missing a field: {exc}") from exc
        if not stats.mean_cos or not all(isinstance(v, (int, float)) for v in stats.mean_cos):
            raise ConfigError(f"{path}: mean_cos must be a non-empty list of numbers")
        return stats


def never_skip(mean_cos: np.ndarray) -> tuple[int, int]:
    """Leading and trailing layers to hold back: at least one at each end, then every further layer at
    that end whose saturation is below the median of all layers (at most a quarter of the layers each)."""
    n = len(mean_cos)
    cap = max(1, int(n * NEVER_SKIP_MAX_FRACTION))
    med = float(np.median(mean_cos))
    first = 1
    while first < cap and mean_cos[first] < med:
        first += 1
    last = 1
    while last < cap and mean_cos[n - 1 - last] < med:
        last += 1
    if first + last >= n:
        first, last = min(first, n // 2), 0
    return first, last


def plan_skipping(stats: dict, ratio: float, first: int = -1, last: int = -1) -> dict:
    """Eligible layers and blocks skipped per token for a target ``ratio`` of all FFN blocks.

    first/last: never-skip layers at each end (-1: the calibrated ones). The threshold is the saturation
    a layer's running mean must reach to be skipped: the 10th percentile of the per-token cos of the
    layers a static choice would skip at this ratio (so a token that runs unusually unsaturated through
    them keeps them).
    """
    mean = np.asarray(stats["mean_cos"], np.float64)
    p10 = np.asarray(stats.get("p10_cos", stats["mean_cos"]), np.float64)
    n = len(mean)
    first = int(stats["never_skip_first"]) if first < 0 else first
    last = int(stats["never_skip_last"]) if last < 0 else last
    if first + last >= n:
        raise ConfigError(f"never-skip layers ({first} first + {last} last) leave none of the {n} layers eligible")
    eligible = list(range(first, n - last))
    k = int(round(ratio * n))
    if k < 1:
        raise ConfigError(f"ratio {ratio} of {n} layers skips no block per token; use a ratio >= {0.5 / n:.3f}")
    if k > len(eligible):
        raise ConfigError(f"ratio {ratio} needs {k} of {n} FFN blocks skipped per token but only {len(eligible)} "
                          f"layers are eligible (layers {first}..{n - last - 1})")
    top = sorted(eligible, key=lambda l: -mean[l])[:k]
    return {"eligible": eligible, "skip_per_token": k, "layers": sorted(top),
            "threshold": round(float(min(p10[l] for l in top)), 6)}


def _feeds(model: onnx.ModelProto, ids: list[int], extra: dict | None = None) -> dict:
    n = len(ids)
    feed = {"input_ids": np.asarray(ids, np.int64)[None], "seqlens_k": np.array([n - 1], np.int32),
            "total_sequence_length": np.array(n, np.int32), "logits_index": np.array([n - 1], np.int64)}
    for v in model.graph.input:
        if v.name.startswith(("past_key.", "past_value.")):
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            feed[v.name] = np.zeros((1, dims[1], n, dims[3]), np.float32)
    feed.update(extra or {})
    return feed


def calibrate_ffn_graph(model: onnx.ModelProto, token_ids: list[int], samples: int = 8, length: int = 256,
                        source: str = "", threads: int | None = None) -> FfnStats:
    """FFN saturation of the decoder graph ``model`` (weights loaded) over ``samples`` sequences of
    ``length`` tokens cut from ``token_ids``."""
    import onnxruntime as ort

    if any(v.name == SKIP_INPUT for v in model.graph.input):
        raise ConfigError("this graph was built with ffn-skip already; calibrate the bundle without it")
    if len(token_ids) < 2:
        raise ConfigError(f"calibration text has {len(token_ids)} tokens; need at least 2")
    length = min(length, len(token_ids))
    n_seq = max(1, min(samples, len(token_ids) // length))
    work = onnx.ModelProto()
    work.CopyFrom(model)
    blocks = find_ffn_blocks(work)
    add_cos_output(work, [(b.x, b.name_out()) for b in blocks], name="ffn_cos_tokens", per_token=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(work.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    cos = []
    for s in range(n_seq):
        ids = token_ids[s * length:(s + 1) * length]
        cos.append(sess.run(["ffn_cos_tokens"], _feeds(work, ids))[0])  # (layers, length)
    allcos = np.concatenate(cos, axis=1)
    mean = allcos.mean(axis=1)
    first, last = never_skip(mean)
    stats = FfnStats(mean_cos=[round(float(v), 6) for v in mean],
                     p10_cos=[round(float(v), 6) for v in np.percentile(allcos, 10, axis=1)],
                     never_skip_first=first, never_skip_last=last, tokens=int(allcos.shape[1]),
                     sequences=n_seq, source=source)
    for r in RECOMMENDED_RATIOS:
        try:
            stats.recommended[str(r)] = plan_skipping(stats.to_dict(), r)
        except ConfigError:
            pass
    log.info("FFN saturation over %d tokens: mean cos %s; never skip first %d, last %d", stats.tokens,
             " ".join(f"{v:.3f}" for v in mean), first, last)
    return stats
