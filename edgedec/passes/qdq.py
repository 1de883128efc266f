"""Pass ``qdq``: static int8 quantization in QDQ form (QuantizeLinear / DequantizeLinear pairs).

The form NPU toolchains consume: every quantized tensor is written ``DequantizeLinear(QuantizeLinear(x))``
with scales fixed at compile time, weights stored as int8 initializers behind a ``DequantizeLinear``.
ONNX Runtime's ``quantize_static`` does the work; this pass supplies what it needs from the decoder:

* calibration inputs: token ids of text (``calibration_text``, or by default prose from Python's own
  ``pydoc_data.topics``, taken from the start of the sorted topics; nothing is shipped), run as prefill
  steps over an empty KV cache sized to the sequence, with logits for every position;
* what stays in float: ``GroupQueryAttention`` (never among the op types) with its KV-cache inputs and
  outputs, and the block-sum corrections other passes insert;
* the tied LM head: ``MatMul(h, Transpose(E))`` has no initializer weight, so quantize_static would treat
  the table as an activation with one per-tensor scale. With ``lm_head=int8`` the head gets its own
  (hidden, vocab) copy of the table, quantized per channel like every weight; the embedding Gather keeps
  the float table. With ``lm_head=fp32`` the head is left out.

The result runs on ONNX Runtime's CPU provider, slowly (SmolLM2: about 9x the float32 decode time per
token, as weights are dequantized at every call): it is an exchange format for NPU compilers, not a CPU
fast path; use ``int8`` or ``int4`` there.

Activations default to 16 bits (A16W8, what NPU toolchains offer for LLMs): one static scale per
activation tensor cannot follow an LLM's activation outliers in 8 bits. Measured on SmolLM2-135M
(perplexity on held-out prose relative to float32; 8 x 128 calibration tokens, per-channel int8
weights): uint16 activations 1.005; uint8 3.8 (minmax), 3.3 (percentile), 1.66 even with MatMul outputs
left unquantized.
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option
from .quant_graph import (CORRECTION_ROLE, GraphIndex, check_model, has_quantized_weights, prune,
                          quiet_ort_quantization, role, unique_name, weight_matmuls)

log = logging.getLogger(__name__)

CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8", "uint16", "int16")
WEIGHT_TYPES = ("int8", "uint8")
HEAD_CHOICES = ("int8", "fp32")
NEVER_QUANTIZED = ("GroupQueryAttention",)
DECODER_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")
STATIC_DECODER_INPUTS = ("input_ids", "position_ids", "attention_mask")  # the npu target's static graph


@dataclass(frozen=True)
class QdqConfig(PassConfig):
    calibration_text: str = option("", "UTF-8 text file to calibrate on (default: prose from Python's "
                                       "pydoc_data.topics)")
    samples: int = option(8, "calibration sequences")
    sequence_length: int = option(128, "tokens per calibration sequence")
    calibrate_method: str = option("minmax", "how activation ranges are chosen: minmax, entropy or percentile")
    activation_type: str = option("uint16", "activation type: uint16 (A16W8, the default), int16, uint8 or int8")
    weight_type: str = option("int8", "weight type: int8 or uint8")
    per_channel: bool = option(True, "one weight scale per output channel instead of one per tensor")
    op_types: str = option("MatMul", "comma-separated op types to quantize (GroupQueryAttention never is)")
    lm_head: str = option("int8", "the tied LM head: int8 (its own transposed copy of the table, quantized) "
                                  "or fp32 (left out)")

    def validate(self) -> None:
        if self.calibration_text and not Path(self.calibration_text).expanduser().is_file():
            raise ConfigError(f"qdq.calibration_text: no such file: {self.calibration_text}")
        if self.samples < 1:
            raise ConfigError(f"qdq.samples must be >= 1, got {self.samples}")
        if not 8 <= self.sequence_length <= 4096:
            raise ConfigError(f"qdq.sequence_length must be in 8..4096, got {self.sequence_length}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ConfigError(f"qdq.calibrate_method must be one of {', '.join(CALIBRATE_METHODS)}, "
                              f"got {self.calibrate_method!r}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError(f"qdq.activation_type must be one of {', '.join(ACTIVATION_TYPES)}, "
                              f"got {self.activation_type!r}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"qdq.weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {self.weight_type!r}")
        ops = self.op_type_list
        if not ops:
            raise ConfigError("qdq.op_types must name at least one op type")
        if bad := [o for o in ops if o in NEVER_QUANTIZED]:
            raise ConfigError(f"qdq.op_types must not include {bad[0]}: attention and its KV cache stay in float")
        if self.lm_head not in HEAD_CHOICES:
            raise ConfigError(f"qdq.lm_head must be one of {', '.join(HEAD_CHOICES)}, got {self.lm_head!r}")

    @property
    def op_type_list(self) -> list[str]:
        return [o.strip() for o in self.op_types.split(",") if o.strip()]


def calibration_token_ids(pass_name: str, path: str, tokenizer_json: str, sequence_length: int
                          ) -> tuple[list[int], str]:
    """Token ids of the calibration text (``path``, or the default) and where it came from; at least one
    sequence of ``sequence_length`` tokens, else a PassError naming the pass."""
    from tokenizers import Tokenizer

    if path:
        text, source = Path(path).expanduser().read_text(encoding="utf-8"), path
    else:
        text, source = default_calibration_text(), "pydoc_data.topics"
    ids = Tokenizer.from_str(tokenizer_json).encode(text).ids
    if len(ids) < sequence_length:
        raise PassError(f"{pass_name} calibration text {source} has {len(ids)} tokens, fewer than one sequence "
                        f"of {sequence_length}")
    return ids, source


def default_calibration_text() -> str:
    """Prose (with some code) from the Python documentation shipped with the interpreter."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def prefill_feed(ids: list[int], past: dict[str, tuple[int, int, type]], all_logits: bool,
                 flags: dict[str, list[int]] | None = None) -> dict:
    """Feeds for one prefill of ``ids`` over an empty cache: ``past`` maps each past_* input to its
    (kv_heads, row, numpy dtype), zero-filled; ``flags`` maps boolean inputs (ffn-skip) to their shape,
    all false. Logits for every position, or only the last."""
    n = len(ids)
    feed = {
        "input_ids": np.asarray(ids, np.int64)[None],
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "logits_index": np.arange(n, dtype=np.int64) if all_logits else np.array([n - 1], np.int64),
    }
    for name, (heads, row, dtype) in past.items():
        feed[name] = np.zeros((1, heads, n, row), dtype)
    for name, shape in (flags or {}).items():
        feed[name] = np.zeros(shape, bool)
    return feed


class DecoderCalibrationReader:
    """Feeds the edgedec decoder graph prefill steps over an empty cache (an ORT CalibrationDataReader)."""

    def __init__(self, model: onnx.ModelProto, token_ids: list[int], samples: int, length: int):
        past = {}
        for v in model.graph.input:
            if v.name.startswith(("past_key.", "past_value.")):
                dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
                past[v.name] = (dims[1], dims[3], np.float32)
        n = min(samples, len(token_ids) // length)
        self.feeds = [prefill_feed(token_ids[s * length:(s + 1) * length], past, True) for s in range(n)]
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


class StaticCalibrationReader(DecoderCalibrationReader):
    """Feeds the static-shape decoder (``edgedec.compiler.export_static``) chunk by chunk over a real cache.

    Each calibration sequence runs from an empty cache in chunks of the graph's C tokens through the float
    model (the runtime's static session), so every chunk after the first sees the keys and values of the
    tokens before it, as it will when deployed.
    """

    def __init__(self, model: onnx.ModelProto, token_ids: list[int], samples: int, length: int, scratch):
        from ..runtime.static import StaticDecoderSession

        self.feeds = []
        arch = _static_arch(model)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / "float.onnx"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data moves the copy's weights out
            onnx.save_model(copy, str(path), save_as_external_data=True, location="float.onnx.data")
            sess = StaticDecoderSession.from_file(path, arch, None, threads=1)
            length = min(length, sess.kv.capacity)
            for s in range(min(samples, len(token_ids) // length)):
                ids = np.asarray(token_ids[s * length:(s + 1) * length], np.int64)
                sess.kv.length = 0
                for c0 in range(0, length, sess.chunk):
                    sess.prepare_chunk(ids[c0:c0 + sess.chunk])
                    self.feeds.append(sess.feeds())
                    sess.forward(ids[c0:c0 + sess.chunk])
            self.tokens = len(self.feeds) and length * (s + 1)
            del sess
        self._it = iter(self.feeds)


def _static_arch(model: onnx.ModelProto) -> dict:
    """The few architecture numbers the static session needs, read from the graph's inputs and outputs."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.input) + list(model.graph.output)}
    _, kv_heads, _, head_dim = shapes["past_key.0"]
    layers = sum(1 for n in shapes if n.startswith("past_key."))
    return {"vocab_size": shapes["logits"][-1], "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim}


def scratch_dir(context) -> Path | None:
    return Path(context.work_dir) if context.work_dir else None


class QdqPass(Pass):
    name = "qdq"
    config_class = QdqConfig

    def requires(self, model: onnx.ModelProto) -> None:
        names = {v.name for v in model.graph.input}
        expected = STATIC_DECODER_INPUTS if "attention_mask" in names else DECODER_INPUTS
        missing = [n for n in expected if n not in names]
        if missing or not any(n.startswith("past_key.") for n in names):
            raise PassError("qdq calibrates by running the edgedec decoder graph and did not find its inputs "
                            f"({', '.join(missing) or 'past_key.{i}'} missing; expected {', '.join(expected)}, "
                            "past_key.{i}, past_value.{i})")
        if not weight_matmuls(GraphIndex.of(model)) and not has_quantized_weights(model) and \
                not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            raise PassError("qdq found nothing to quantize: no MatMul whose weight is a 2-D float initializer "
                            "(or a Transpose of one), and no already-quantized MatMul")
        if not self.context.tokenizer_json:
            raise PassError("qdq needs the model's tokenizer (PassContext.tokenizer_json) to make calibration inputs")

    def _token_ids(self) -> tuple[list[int], str]:
        c = self.config
        return calibration_token_ids(self.name, c.calibration_text, self.context.tokenizer_json, c.sequence_length)

    def apply(self, model: onnx.ModelProto) -> PassResult:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        c = self.config
        work = onnx.ModelProto()
        work.CopyFrom(model)
        idx = GraphIndex.of(work)
        matmuls = weight_matmuls(idx)
        if not matmuls:
            return PassResult(model, False, {"quantized": 0, "note": "no float weight left to quantize"})
        taken: set = set()
        heads = []
        for m in matmuls:
            if m.transposed and c.lm_head == "int8":  # give the head its own (in, out) weight
                name = unique_name(idx, f"{m.weight}.transposed", taken)
                head = np.ascontiguousarray(idx.array(m.weight).T)
                work.graph.initializer.append(numpy_helper.from_array(head, name))
                m.node.input[1] = name
                heads.append(name)
        prune(work)
        # onnx's shape inference (which quantize_static relies on) does not know contrib ops: type their
        # float outputs so the MatMuls reading them (the o projection after attention) get quantized too
        typed = {v.name for v in list(work.graph.value_info) + list(work.graph.output)}
        for node in work.graph.node:
            if node.op_type in NEVER_QUANTIZED and node.output[0] not in typed:
                work.graph.value_info.append(
                    onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
        names = set()
        for k, node in enumerate(work.graph.node):  # quantize_static selects nodes by name
            if not node.name or node.name in names:
                node.name = f"{node.op_type}_{k}"
            names.add(node.name)
        idx = GraphIndex.of(work)
        targets = {m.node.name: m.weight for m in weight_matmuls(idx) if not m.transposed}
        exclude = [n.name for n in work.graph.node if role(n) == CORRECTION_ROLE or
                   (n.op_type == "MatMul" and n.name not in targets)]
        ids, text_source = self._token_ids()
        if "attention_mask" in {v.name for v in work.graph.input}:
            reader = StaticCalibrationReader(work, ids, c.samples, c.sequence_length, scratch_dir(self.context))
        else:
            reader = DecoderCalibrationReader(work, ids, c.samples, c.sequence_length)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16,
                 "int16": QuantType.QInt16}
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[c.calibrate_method]
        scratch = Path(self.context.work_dir) if self.context.work_dir else None
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / "qdq.onnx"
            given = onnx.ModelProto()
            given.CopyFrom(work)  # quantize_static moves the initializers of what it is given to external data
            with quiet_ort_quantization():
                quantize_static(given, path, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=c.op_type_list,
                                per_channel=c.per_channel, activation_type=qtype[c.activation_type],
                                weight_type=qtype[c.weight_type], nodes_to_exclude=exclude,
                                use_external_data_format=True, calibrate_method=method,
                                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                               "MatMulConstBOnly": True})
            out = onnx.load(str(path))
        records = self._weight_errors(idx, out, targets)
        if not records:
            raise PassError("quantize_static quantized none of the weight MatMuls")
        counts = {op: sum(n.op_type == op for n in out.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
        return PassResult(out, True, {
            "quantized": len(records),
            "settings": c.to_dict(),
            "calibration": {"text": text_source, "sequences": len(reader),
                            "tokens": getattr(reader, "tokens", len(reader) * c.sequence_length)},
            "nodes": counts,
            "max_abs_error": max(r["max_abs_error"] for r in records),
            "head_copies": heads,
            "tensors": records,
        })

    @staticmethod
    def _weight_errors(idx: GraphIndex, out: onnx.ModelProto, targets: dict[str, str]) -> list[dict]:
        """Max |dequantized - original| for every weight that now sits behind a DequantizeLinear."""
        inits = {i.name: i for i in out.graph.initializer}
        producer = {o: n for n in out.graph.node for o in n.output}
        records = []
        for node in out.graph.node:
            if node.op_type != "MatMul" or node.name not in targets:
                continue
            dq = producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            w = idx.array(targets[node.name])
            q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
            z = 0.0
            if len(dq.input) > 2 and dq.input[2]:
                z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32)
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if np.ndim(s) == 1 and axis in (0, -2):
                s, z = s[:, None], (z[:, None] if np.ndim(z) else z)
            records.append({"weight": targets[node.name], "shape_kn": list(w.shape), "bits": 8,
                            "max_abs_error": float(np.abs((q - z) * s - w).max())})
        return records

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        if not result.modified:
            return
        g = result.model.graph
        producer = {o: n for n in g.node for o in n.output}
        left = [m.weight for m in weight_matmuls(GraphIndex.of(result.model))
                if not (m.transposed and self.config.lm_head == "fp32")]
        if left:
            raise PassError(f"qdq left float MatMul weights that should have been quantized: {', '.join(left[:5])}")
        for node in g.node:
            if node.op_type in NEVER_QUANTIZED:
                cache = [i for i in list(node.input)[3:5] if i and i in producer]
                if cache or any(o.op_type == "QuantizeLinear" for o in g.node if set(o.input) & set(node.output[1:])):
                    raise PassError(f"qdq quantized the KV cache of {node.name or node.op_type}; it must stay float")
        check_model(result.model)
