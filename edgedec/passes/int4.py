"""Pass ``int4``: block-wise 4-bit weights through ONNX Runtime's ``MatMulNBits``, activations in float.

Every float ``MatMul`` whose weight is an initializer becomes ``MatMulNBits`` (bits 4, blocks of
``block_size`` along the input dimension). The tied embedding / LM head table follows ``lm_head``:
kept in float32, or quantized once and read by both a ``MatMulNBits`` head and a
``GatherBlockQuantized`` embedding (see :mod:`edgedec.passes.nbits`).

Source-aware mode. A GGUF source has already been quantized: the exported float weights are its
dequantization, so every block of 32 lies exactly on the source's grid (Q4_1: ``w = d*q + m``). Rounding
those values again to a different grid adds a second error as large as the first (RTN block 32 over
SmolLM2's Q4_1 weights raised perplexity about 20%). With ``source_grid`` on, the pass recovers the grid
from the values and re-expresses it without loss:

* Q4_0 ``w = d*(q-8)``: MatMulNBits 4-bit, scale d, default zero point 8. Exact.
* Q8_0 ``w = d*q``: MatMulNBits / GatherBlockQuantized 8-bit, scale d, default zero point 128. Exact.
* Q4_1 ``w = d*q + m``: the zero point would be ``-m/d``, generally not an integer. MatMulNBits accepts
  float zero points, but ONNX Runtime's CPU kernel then skips prepacking and dequantizes the whole weight
  at every call (measured about 20x slower per MatMul). So the pass keeps q with scale d and the default
  zero point 8, and adds the per-block remainder ``m + 8d`` through a block-sum correction: one small
  MatMul of the block sums of the activation (shared by q/k/v and by gate/up) with a (K/32, N) matrix.
  Exact in float32 up to summation order.

Weights not on a source grid (or all, with ``source_grid=never``) are quantized by ``algorithm``:
``rtn`` and ``k_quant`` give uint8 zero points; ``hqq`` optimises float zero points, which travel through
the same block-sum correction as Q4_1 (exact HQQ, a few extra small nodes per weight).

Measured on SmolLM2-135M (GGUF Q4_1 body, Q8_0 tied embedding; perplexity on held-out prose relative
to the float32 graph, CPU time per decoded token at 1 thread relative to float32, bundle size):

    exact grids, lm_head int8 (default)     1.007   0.42   21%
    exact grids, accuracy_level 0           1.000   (level 0 leaves the Q8_0 head without a fast kernel)
    exact body, lm_head int4 (rtn)          1.095   0.38   19%   (k_quant 1.12, hqq 1.10, block 16 1.09)
    exact body, lm_head fp32                1.007   0.52   36%
    RTN re-quantization (source_grid=never) 1.25    0.34   19%   (k_quant 1.25, block 16 1.18)

The block-sum corrections cost about a quarter of the decode time of plain int4; they buy exactness.
Hence the defaults: source grids on, ``lm_head=int8``.

``round_offsets`` trades part of that exactness back for speed, weight by weight (glob patterns over
initializer names, e.g. ``*o_proj*``): a matching Q4_1 weight folds its offset into the nearest integer
zero point (what RTN re-quantization gives) and drops its correction nodes; the mean shift this causes
on calibration text (``calibration_text``, default the Python documentation's prose) is added back as
MatMulNBits' bias. Simulated on SmolLM2-135M in torch (perplexity relative to the dequantized source,
all layers of one projection rounded): o 1.010 (1.008 with the bias), k 1.011, gate 1.013, q 1.022,
up 1.040, down 1.041 (1.033 with the bias), v 1.048; every weight 1.20 (1.15 with the bias). GPTQ
(Hessian error feedback within each weight) did not beat plain rounding here (1.21). The first and
last few layers are the most sensitive (down in layers 0-4: 1.013, 5-14: 1.005, 15-24: 1.009, 25-29:
1.014), hence two presets that round o everywhere and the MLP only in the middle two thirds of the layers:

    preset      rounds                                   ppl vs fp32   decode vs exact int4   (bundles)
    (none)      nothing: exact grids                     1.004         1.00
    balanced    o; down in the middle layers             1.023         1.17                   50 of 120
    fast        balanced + gate/up in the middle layers  1.042         1.27                   70 of 120

(``edgedec eval`` on 8,192 held-out tokens, ``edgedec bench`` interleaved at 2 threads.) q/k/v stay exact:
they read one fused weight, and rounding it costs most (1.09 with the middle layers only).
"""

import fnmatch
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import ConfigError
from . import blockwise as bw
from .base import Pass, PassConfig, PassError, PassResult, option
from .nbits import WeightPlan, WeightUse, quantize_weights, weight_uses
from .quant_graph import GraphIndex, check_model, check_tables, require_weights

BLOCK_SIZES = bw.BLOCK_SIZES
CALIBRATION_SEQUENCE = 512  # tokens per calibration prefill for round_offsets' bias
HEAD_CHOICES = ("fp32", "int8", "int4")
SOURCE_GRID_CHOICES = ("auto", "always", "never")
GGUF_GRIDS = ("Q4_0", "Q4_1", "Q8_0")
# what compile's source-preserving default reads (edgedec/targets/auto.py): the GGUF matrix types this pass
# re-expresses without loss, and the targets whose int4 then computes the source's model exactly (float
# activations; on cpu, MatMulNBits' accuracy_level 4 rounds activations to int8, perplexity ~1.004)
EXACT_SOURCE_TYPES = frozenset(GGUF_GRIDS)
LOSSLESS_TARGETS = ("cpu-tvm", "arm64")
# round_offsets presets: which weights lose their block-sum correction ("middle": layers L//6 .. L-L//6-1,
# the edges being the most sensitive); measured on SmolLM2-135M in the module docstring
ROUND_PRESETS = {
    "balanced": (("o_proj", "all"), ("down_proj", "middle")),
    "fast": (("o_proj", "all"), ("down_proj", "middle"), ("gate_proj", "middle"), ("up_proj", "middle")),
}


@dataclass(frozen=True)
class Int4Config(PassConfig):
    block_size: int = option(32, "weights per quantization block along the input dimension: 16, 32, 64 or 128")
    symmetric: bool = option(False, "symmetric blocks (scale only, zero point fixed at 8) instead of scale + "
                                    "zero point")
    accuracy_level: int = option(4, "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, "
                                    "4 int8 activations (fastest on CPU)")
    algorithm: str = option("rtn", "how float weights are rounded: rtn (round to nearest), k_quant "
                                   "(llama.cpp's scale search) or hqq (half-quadratic, float zero points)")
    lm_head: str = option("int8", "the LM head and the embedding table tied to it: fp32 (left as is), int8 or "
                                  "int4 (one quantized table read by MatMulNBits and GatherBlockQuantized)")
    source_grid: str = option("auto", "re-express a GGUF source's weights exactly: Q4_0/Q4_1/Q8_0 grids, and "
                                      "k-quants/Q5_0 from the file's own blocks (Q4_K 4-bit; Q5_0, Q6_K, Q8_0 "
                                      "8-bit): auto (when the source is such a GGUF), always, never (re-round)")
    round_offsets: str = option("", "balanced, fast, or glob patterns of weight names separated by spaces (e.g. "
                                    "'*o_proj* *layers.1?.mlp.down_proj*'): weights whose float "
                                    "zero points (Q4_1 grid, HQQ) are rounded to integers, with a calibrated "
                                    "bias instead of the exact block-sum correction: fewer nodes per token, "
                                    "a little quality")
    calibration_text: str = option("", "UTF-8 text for round_offsets' bias (default: prose from Python's "
                                       "pydoc_data.topics)")
    calibration_tokens: int = option(8192, "tokens of calibration text run through the float model for "
                                           "round_offsets' bias")

    def validate(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"int4.block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                              f"got {self.block_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError(f"int4.accuracy_level must be in 0..4, got {self.accuracy_level}")
        if self.algorithm not in bw.ALGORITHMS:
            raise ConfigError(f"int4.algorithm must be one of {', '.join(bw.ALGORITHMS)}, got {self.algorithm!r}")
        if self.symmetric and self.algorithm != "rtn":
            raise ConfigError(f"int4.symmetric is only available with algorithm rtn ({self.algorithm} fits a "
                              "zero point)")
        if self.lm_head not in HEAD_CHOICES:
            raise ConfigError(f"int4.lm_head must be one of {', '.join(HEAD_CHOICES)}, got {self.lm_head!r}")
        if self.lm_head == "int8" and self.accuracy_level != 4:
            raise ConfigError("int4.lm_head=int8 needs accuracy_level=4: ONNX Runtime's CPU kernel has no 8-bit "
                              "path with float activations and would dequantize the whole head at every token "
                              "(choose lm_head=fp32 or int4 for other accuracy levels)")
        if self.calibration_text and not Path(self.calibration_text).expanduser().is_file():
            raise ConfigError(f"int4.calibration_text: no such file: {self.calibration_text}")
        if self.calibration_tokens < 1:
            raise ConfigError(f"int4.calibration_tokens must be >= 1, got {self.calibration_tokens}")
        if self.source_grid not in SOURCE_GRID_CHOICES:
            raise ConfigError(f"int4.source_grid must be one of {', '.join(SOURCE_GRID_CHOICES)}, "
                              f"got {self.source_grid!r}")


def source_grids(mode: str, weight_format: str) -> tuple[str, ...]:
    """The GGUF grids to look for: those the source lists (auto), all (always) or none (never)."""
    if mode == "never":
        return ()
    if mode == "always":
        return GGUF_GRIDS
    listed = {t.strip().upper() for t in (weight_format or "").split(",")}
    return tuple(g for g in GGUF_GRIDS if g in listed)


class Int4Pass(Pass):
    name = "int4"
    config_class = Int4Config
    _layers = 0  # decoder layers in the graph, for round_offsets' presets (set by apply)

    def requires(self, model: onnx.ModelProto) -> None:
        require_weights(self.name, model)

    @property
    def _patterns(self) -> list[str]:
        return self.config.round_offsets.replace(",", " ").split()

    def _matches(self, pattern: str, use: WeightUse) -> bool:
        if use.is_table:
            return False
        if pattern in ROUND_PRESETS:
            layer = re.search(r"layers\.(\d+)\.", use.name)
            middle = layer is not None and self._layers // 6 <= int(layer[1]) < self._layers - self._layers // 6
            return any(role in use.name and (where == "all" or middle) for role, where in ROUND_PRESETS[pattern])
        return fnmatch.fnmatchcase(use.name, pattern)

    def _rounded(self, use: WeightUse) -> bool:
        return any(self._matches(p, use) for p in self._patterns)

    def _plan(self, grids: tuple[str, ...]):
        c = self.config

        def plan(use: WeightUse) -> WeightPlan | None:
            if use.is_table:
                if c.lm_head == "fp32":
                    return None
                if c.lm_head == "int8":  # 8-bit: RTN is within a fraction of a percent; the grid is exact
                    return WeightPlan(8, c.block_size, c.symmetric, "rtn", tuple(g for g in grids if g == "Q8_0"))
                return WeightPlan(4, c.block_size, c.symmetric, c.algorithm, tuple(g for g in grids if g != "Q8_0"),
                                  widen=False)  # lm_head=int4 asks for a 4-bit table: a wider source is rounded
            return WeightPlan(4, c.block_size, c.symmetric, c.algorithm, tuple(g for g in grids if g != "Q8_0"),
                              round_offsets=self._rounded(use))

        return plan

    _blocks_read = False

    def _source_blocks(self):
        """The source GGUF's own blocks (:mod:`edgedec.models.gguf_blocks`), for weights on none of the legacy
        grids (k-quants, Q5_0, ...): read when ``source_grid`` is auto and the source lists such a type, or
        always; None otherwise."""
        from ..models import gguf_blocks

        src = self.context.source
        path = src.get("path")
        self._blocks_read = False
        if self.config.source_grid == "never" or src.get("kind") != "gguf" or not path or not Path(path).is_file():
            return None
        listed = {t.strip().upper() for t in str(src.get("weight_format", "")).split(",")}
        if self.config.source_grid == "auto" and not listed & (set(gguf_blocks.FORMATS) - set(GGUF_GRIDS)):
            return None
        try:
            blocks = gguf_blocks.exact_blocks(path)
        except (OSError, ValueError) as exc:
            raise PassError(f"int4: cannot read the blocks of the source GGUF {path}: {exc}") from exc
        self._blocks_read = True
        return blocks

    def _means(self, model: onnx.ModelProto, uses: list[WeightUse]) -> tuple[dict[str, np.ndarray], dict]:
        """Mean over calibration tokens of every activation read by a weight ``round_offsets`` names."""
        rounded = [u for u in uses if self._rounded(u)]
        if not rounded:
            return {}, {}
        if not self.context.tokenizer_json:
            raise PassError("int4.round_offsets needs the model's tokenizer to calibrate its bias")
        from .qdq import calibration_token_ids

        c = self.config
        length = min(CALIBRATION_SEQUENCE, int(self.context.arch.get("max_position_embeddings") or CALIBRATION_SEQUENCE))
        ids, source = calibration_token_ids(self.name, c.calibration_text, self.context.tokenizer_json, length)
        ids = ids[:max(c.calibration_tokens // length, 1) * length]
        names = sorted({m.node.input[0] for u in rounded for m in u.matmuls})
        means = activation_means(model, names, ids, length, self.context.work_dir)
        return means, {"text": source, "tokens": len(ids) // length * length, "weights": len(rounded)}

    def apply(self, model: onnx.ModelProto) -> PassResult:
        c = self.config
        weight_format = str(self.context.source.get("weight_format", ""))
        grids = source_grids(c.source_grid, weight_format)
        uses = weight_uses(GraphIndex.of(model))
        heads = {u.name for u in uses if u.is_table}
        found = [re.search(r"layers\.(\d+)\.", u.name) for u in uses]
        self._layers = max((int(m[1]) + 1 for m in found if m), default=0)
        for p in self._patterns:
            if uses and not any(self._matches(p, u) for u in uses):
                body = [u.name for u in uses if not u.is_table]
                raise PassError(f"int4.round_offsets: {p!r} matches no weight (presets: {', '.join(ROUND_PRESETS)}; "
                                f"weight names look like {body[0] if body else uses[0].name})")
        means, calibration = self._means(model, uses)
        blocks = self._source_blocks()
        out, records = quantize_weights(model, self._plan(grids), c.accuracy_level, means, blocks)
        del blocks
        if not records:
            return PassResult(model, False, {"quantized": 0, "note": "no float weight left to quantize"})
        by_method: dict[str, int] = {}
        for r in records:
            by_method[r["method"]] = by_method.get(r["method"], 0) + 1
        report = {
            "quantized": len(records),
            "by_method": by_method,
            "settings": {**c.to_dict(), "source_grids": list(grids), "source_weight_format": weight_format,
                         "source_blocks": bool(self._blocks_read)},
            "max_abs_error": max(r["max_abs_error"] for r in records),
            "bytes_before": sum(r["bytes_before"] for r in records),
            "bytes_after": sum(r["bytes_after"] for r in records),
            "tensors": records,
        }
        if calibration:
            report["calibration"] = calibration
        notes = []
        if grids and any(not r["method"].startswith(("exact", "Q4_1")) and r["bits"] == 4 for r in records):
            notes.append(f"some weights were not on a source grid and were re-quantized with {c.algorithm}")
        if any(r["method"].startswith("exact") and r["block_size"] != c.block_size for r in records):
            notes.append(f"weights on a GGUF grid keep its blocks of {bw.GGUF_BLOCK} (Q6_K: 16), not block_size "
                         f"{c.block_size}")
        if any(r["method"].startswith("exact") and r["bits"] > (8 if r["gathers"] or r["weight"] in heads else 4)
               for r in records):
            notes.append("weights whose source has more than 4 bits per code (Q5_0, Q6_K, Q8_0) are stored exactly "
                         "in 8 bits; source_grid=never re-rounds them to 4")
        missed = [r for r in records if "source" in r]
        if missed:
            notes.append(f"{len(missed)} weights had no exact form in the source GGUF (see each record's source)")
        if notes:
            report["notes"] = notes
        return PassResult(out, True, report)

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        if not result.modified:
            return
        idx = GraphIndex.of(result.model)
        left = [u.name for u in weight_uses(idx) if not (u.is_table and self.config.lm_head == "fp32")]
        if left:
            raise PassError(f"int4 left float MatMul weights that should have been quantized: {', '.join(left[:5])}")
        if self.config.lm_head != "fp32":
            check_tables(self.name, before, result)
        check_model(result.model)


def activation_means(model: onnx.ModelProto, names: list[str], token_ids: list[int], length: int,
                     scratch=None) -> dict:
    """Mean (over every calibration token) of each activation in ``names``, running the edgedec decoder
    graph ``model`` on ONNX Runtime as prefill steps of ``length`` tokens over an empty cache."""
    import onnxruntime as ort

    from .qdq import DecoderCalibrationReader

    work = onnx.ModelProto()
    work.CopyFrom(model)
    present = {o.name for o in work.graph.output}
    for n in names:
        if n not in present:
            work.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    reader = DecoderCalibrationReader(work, token_ids, len(token_ids) // length, length)
    inputs = {i.name for i in work.graph.input}
    sums = {n: 0.0 for n in names}
    count = 0
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = Path(tmp) / "means.onnx"
        onnx.save_model(work, str(path), save_as_external_data=True, location="means.onnx.data")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for feed in reader.feeds:
            got = sess.run(names, {k: v for k, v in feed.items() if k in inputs})
            for n, v in zip(names, got):
                sums[n] = sums[n] + v.reshape(-1, v.shape[-1]).astype(np.float64).sum(0)
            count += feed["input_ids"].size
        del sess
    return {n: sums[n] / count for n in names}
