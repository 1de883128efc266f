"""Small graphs for the quantization-pass tests, written with onnx.helper.

``decoder_graph`` is the edgedec decoder layout in miniature (see edgedec.compiler.export): an embedding
``Gather`` on a table that a ``Transpose -> MatMul`` head reuses, one layer with q/k/v projections into
``com.microsoft.GroupQueryAttention`` (rotary inside, KV cache as inputs), an o projection, a gated MLP
(gate and up share their input) and residual adds. Shapes: vocab 64, hidden 64, 4 query heads / 2 KV
heads of 16, FFN 96 (so block size 64 pads the down projection's 96 inputs, and 128 pads everything).

Weights are random, or lie exactly on GGUF grids (``grid="q4_1"``: body Q4_1 and table Q8_0, like
SmolLM2's GGUF) so the source-aware path can be checked for losslessness.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, MAX_POS = 64, 64, 4, 2, 16, 96, 64


def q4_1_grid(rng, K: int, N: int, full_range: bool = True) -> np.ndarray:
    """(K, N) float32 on a Q4_1 grid: per block of 32 along K, ``w = d*q + m`` (d, m float16, q 0..15).

    ``full_range``: every block uses q = 0 and q = 15, as llama.cpp's quantizer produces; otherwise q
    stays in 2..13 (a grid whose step must be found from the gaps between values).
    """
    kb = K // 32
    d = rng.uniform(0.002, 0.02, (kb, N)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.15, -0.01, (kb, N)).astype(np.float16).astype(np.float32)
    lo, hi = (0, 16) if full_range else (2, 14)
    q = rng.integers(lo, hi, (kb, 32, N)).astype(np.float32)
    if full_range:
        q[:, 0, :], q[:, 1, :] = 0, 15
    return (d[:, None, :] * q + m[:, None, :]).reshape(K, N).astype(np.float32)


def q8_0_grid(rng, K: int, N: int) -> np.ndarray:
    """(K, N) on a Q8_0 grid: per block of 32 along K, ``w = d*q`` (d float16, q -127..127, |q|max = 127)."""
    kb = K // 32
    d = rng.uniform(0.0005, 0.003, (kb, N)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (kb, 32, N)).astype(np.float32)
    q[:, 0, :] = 127
    return (d[:, None, :] * q).reshape(K, N).astype(np.float32)


def decoder_weights(seed: int = 0, grid: str | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "layers.0.self_attn.q_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "layers.0.self_attn.k_proj.weight": (HIDDEN, KV_HEADS * HEAD_DIM),
        "layers.0.self_attn.v_proj.weight": (HIDDEN, KV_HEADS * HEAD_DIM),
        "layers.0.self_attn.o_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "layers.0.mlp.gate_proj.weight": (HIDDEN, FFN),
        "layers.0.mlp.up_proj.weight": (HIDDEN, FFN),
        "layers.0.mlp.down_proj.weight": (FFN, HIDDEN),
    }
    w = {}
    for name, (k, n) in shapes.items():
        w[name] = q4_1_grid(rng, k, n) if grid == "q4_1" else (rng.standard_normal((k, n)) * 0.15).astype(np.float32)
    if grid == "q4_1":
        w["lm_head.weight"] = q8_0_grid(rng, HIDDEN, VOCAB).T.copy()  # stored (vocab, hidden), blocks along hidden
    else:
        w["lm_head.weight"] = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    return w


def decoder_graph(weights: dict[str, np.ndarray] | None = None, expose_embedding: bool = False) -> onnx.ModelProto:
    """The miniature decoder; ``expose_embedding`` adds the embedding Gather's output as a graph output."""
    w = decoder_weights() if weights is None else weights
    mk = helper.make_node
    freqs = np.outer(np.arange(MAX_POS), 1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [
        numpy_helper.from_array(np.cos(freqs).astype(np.float32), "cos_cache"),
        numpy_helper.from_array(np.sin(freqs).astype(np.float32), "sin_cache"),
    ]
    L = "layers.0."
    nodes = [
        mk("Gather", ["lm_head.weight", "input_ids"], ["embedding"]),
        mk("MatMul", ["embedding", L + "self_attn.q_proj.weight"], ["q"]),
        mk("MatMul", ["embedding", L + "self_attn.k_proj.weight"], ["k"]),
        mk("MatMul", ["embedding", L + "self_attn.v_proj.weight"], ["v"]),
        mk("GroupQueryAttention", ["q", "k", "v", "past_key.0", "past_value.0", "seqlens_k", "total_sequence_length",
                                   "cos_cache", "sin_cache"], ["attn", "present_key.0", "present_value.0"],
           domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM ** -0.5, do_rotary=1),
        mk("MatMul", ["attn", L + "self_attn.o_proj.weight"], ["o"]),
        mk("Add", ["embedding", "o"], ["h1"]),
        mk("MatMul", ["h1", L + "mlp.gate_proj.weight"], ["gate"]),
        mk("Sigmoid", ["gate"], ["gate_sig"]),
        mk("Mul", ["gate", "gate_sig"], ["silu"]),
        mk("MatMul", ["h1", L + "mlp.up_proj.weight"], ["up"]),
        mk("Mul", ["silu", "up"], ["act"]),
        mk("MatMul", ["act", L + "mlp.down_proj.weight"], ["down"]),
        mk("Add", ["h1", "down"], ["h2"]),
        mk("Gather", ["h2", "logits_index"], ["last"], axis=1),
        mk("Transpose", ["lm_head.weight"], ["head_t"], perm=[1, 0]),
        mk("MatMul", ["last", "head_t"], ["logits"]),
    ]
    kv = [1, KV_HEADS, "capacity", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["num_logits"]),
        helper.make_tensor_value_info("past_key.0", TensorProto.FLOAT, kv),
        helper.make_tensor_value_info("past_value.0", TensorProto.FLOAT, kv),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "num_logits", VOCAB]),
        helper.make_tensor_value_info("present_key.0", TensorProto.FLOAT, kv),
        helper.make_tensor_value_info("present_value.0", TensorProto.FLOAT, kv),
    ]
    if expose_embedding:
        outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, "sequence", HIDDEN]))
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=OPSETS,
                             ir_version=10)


def feeds(ids, capacity: int = 16) -> dict:
    n = len(ids)
    cache = np.zeros((1, KV_HEADS, capacity, HEAD_DIM), np.float32)
    return {
        "input_ids": np.asarray(ids, np.int64)[None],
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "logits_index": np.arange(n, dtype=np.int64),
        "past_key.0": cache,
        "past_value.0": cache.copy(),
    }


IDS = [3, 17, 42, 5, 63, 0, 28, 9]


def run(model: onnx.ModelProto, ids=IDS, outputs=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds(ids))


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def no_matmul_graph() -> onnx.ModelProto:
    """Inputs and outputs of the decoder, but nothing a weight pass could quantize."""
    return onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 4] x) => (float[2, 4] y) {
        y = Relu(x)
    }
    """)


def char_tokenizer_json() -> str:
    """A character-level tokenizer with VOCAB ids (unknown characters -> id 0), for calibration."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "etaoinshrdlucmfwypvbgkqjxz ETAOINSHRDLUCMFWYPVBGKQJXZ.,:()=_0123"[: VOCAB - 1]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tok.to_str()


BODY = 7  # weight MatMuls per layer: q, k, v, o, gate, up, down
NOTHING = "found nothing to quantize: no MatMul whose weight is a 2-D float initializer"
