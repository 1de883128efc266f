"""Calibrations: statistics measured by running a bundle (or a graph) on text, that passes then use.

``ffn``: per-layer FFN saturation for the ``ffn-skip`` pass (after FFN-SkipLLM). For every layer the
cosine similarity of the residual stream entering and leaving its FFN block, ``cos(x, x + ffn(x))``,
measured at every token of the calibration sequences (prefill over an empty cache: the same numbers a
token-by-token decode would see). From it:

* ``mean_cos`` / ``p10_cos`` per layer: how saturated the stream is across the block (1 = the block
  hardly turns the hidden state; FFN-SkipLLM skips those);
* ``never_skip_first`` / ``never_skip_last``: the leading and trailing layers whose blocks change the
  stream most (lowest saturation), which must never be skipped;
* ``recommended``: for target ratios 0.1 ... 0.5, the layers a static choice would skip (highest mean
  saturation among the eligible ones) and the cos threshold that separates them.

Other calibrations (e.g. vocabulary statistics for speculative decoding) get their own ``calibrate_*``
function here and their own ``edgedec calibrate WHAT`` subcommand.
"""

from __future__ import annotations

import json
import logging

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import BundleError, ConfigError

log = logging.getLogger(__name__)

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
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)), "pydoc_data.topics"


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

    from .passes.ffn_skip import SKIP_INPUT, add_cos_output, find_ffn_blocks

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


def calibrate_ffn(bundle: str | Path, texts: list[str] | None = None, samples: int = 8, length: int = 256,
                  threads: int | None = None) -> FfnStats:
    """FFN saturation of the decoder of ``bundle`` on ``texts`` (files; default: Python's documentation)."""
    from tokenizers import Tokenizer

    from .runtime import Bundle

    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if not 2 <= length <= 8192:
        raise ConfigError(f"sequence length must be in 2..8192, got {length}")
    b = Bundle.open(bundle)
    graph = b.graph("decoder")
    try:
        model = onnx.load(str(b.file(graph["file"])))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise BundleError(f"cannot load {graph['file']} of {bundle}: {exc}") from exc
    tok = Tokenizer.from_file(str(b.file(b.manifest["tokenizer"]["file"])))
    pieces = [read_calibration_text(t) for t in (texts or [None])]
    ids = [i for text, _ in pieces for i in tok.encode(text).ids]
    length = min(length, int(b.manifest["kv_cache"]["max_capacity"]))
    return calibrate_ffn_graph(model, ids, samples, length, source=", ".join(s for _, s in pieces), threads=threads)



