"""Pass ``kv-cache``: the KV-cache layout of the decoder graph (``edgedec compile --kv``).

Layouts (every one is ``(1, kv_heads, capacity, row)`` per layer and per K/V, BNSH, bound in place):

* ``fp32``  float32 rows of ``head_dim`` (the exported graph; the pass changes nothing);
* ``fp16``  float16 rows of ``head_dim``;
* ``int8``  int8 rows of ``head_dim``: ``q = clamp(round(x / scale), -128, 127)``, ``x ~ q * scale``;
* ``int4``  uint8 rows of ``head_dim / 2``, two values per byte, element ``2i`` in the low nibble:
  ``q = clamp(round(x / scale), -8, 7) + 8``, ``x ~ (q - 8) * scale``.

The quantized layouts use ONNX Runtime's own quantized cache in ``com.microsoft.GroupQueryAttention``
(``k_quant_type``/``v_quant_type``, ``kv_cache_bit_width``, ``k_scale``/``v_scale`` inputs): the kernel
quantizes new keys and values as it writes them and dequantizes inside attention. Its scales are static,
so this pass calibrates them: it runs the graph it is given (float cache) on calibration text and
records, per layer, the range of what the kernel stores. Keys are stored *after* rotary embedding, so
a key channel's range depends on the positions seen; with ``k_range=pair`` the range of channels ``i``
and ``i + head_dim/2`` (the pair rotary rotates together) is the largest norm of the pair, which bounds
the channel at every position (rotation keeps the norm), at the cost of up to sqrt(2) in resolution.
``k_range=observed`` takes each channel's absmax at the calibrated positions instead: finer steps, but
keys at positions the calibration did not reach clip, and that is most of a long context: SmolLM2,
int4 cache calibrated on 1,024-token sequences, perplexity ratio 1.044 on 1,024-token windows but 1.81
streaming 8,184 tokens. ``k_range=positions`` takes the absmax of the calibration keys rotated to
positions drawn across the bundle's whole context (``_reposition``): as fine as observed ranges for
each pair's content, valid wherever a key is written. ``auto`` (default) uses pair ranges for int8 and
position ranges for int4, where resolution dominates (all-int4, 2,048 held-out tokens: perplexity ratio
1.17 observed vs 1.36 pair). A bundle compiled for a shorter ``--max-context`` gets finer int4 keys.

Per-token scales (KIVI's choice for values) and a float window of recent tokens are not in the kernel;
per-channel static scales are what it offers, and they are symmetric. Keys are not: their channels carry
offsets. ``k_center`` (on by default for int4) stores keys minus their calibrated mean, the asymmetric
per-channel key quantization of KIVI expressed with the kernel's symmetric one. It is exact, not an
approximation: every key of a layer loses the same vector c, which shifts each query's attention logits
by the same q.c, and softmax ignores that. The kernel rotates the key it is given, so the graph subtracts
R(-p) c before the attention (folded into the projection's MatMul; see ``_center_keys``). Centred keys
are not clipped: the clip that minimises their squared error trims the large keys attention peaks on.

Rotated keys (``k_rotate``, on by default for int4). A key channel's static scale must cover its largest
value at every token and position, and rare large keys set it (clipping them, unrotated, cost 1.16), so
typical keys get few of the 16 levels. After a Hadamard rotation every stored channel mixes all of the
head's channels, and no channel's range rests on a few values. Fake-quantizing SmolLM2's
cache in torch with the kernel's formula (8,192 held-out tokens, perplexity ratio to the float cache)
located the int4 loss (``benchmarks/kv_quant_sim.py``): keys alone 1.067, values alone 1.008, both
1.069. On the keys, a normalised Hadamard rotation H after rotary gave 1.052 unclipped and 1.039 with
the least-error clip (on rotated keys clipping pays); query-aware smoothing before H (s_j^2 =
sqrt(E q_j^2 / E k_j^2), a trial: 1.047) did not add to it; on the values H was worse (1.080) and
per-token scales no better (1.073). So
the pass multiplies queries and keys by H (exact: (q H).(k H) = q.k). The kernel would rotate what it
is given, so rotary moves into the graph (do_rotary=0): one MatMul per layer does both,
``[x * cos2, x * sin2] @ [H; P H]`` (see ``_rotate_keys``), and centring becomes a plain subtraction
of offset @ H.

An all-int4 cache still costs SmolLM2 13% perplexity (8,191 held-out tokens, uncentred), spread over the
layers (0.0-1.5% each), so ``int4`` mixes precision per layer: the ``int8_layers`` layers whose int4 cache
costs the most stay int8 (the kernel's bit width is an attribute of each attention node). The pass
measures each layer's cost on the calibration text: the mean KL divergence of the next-token distribution
when only that layer's cache is int4. The default, a third of the layers, keeps the cache at 1/6 of fp32's
bytes (SmolLM2: 10 of 30 layers, 16.7%). Perplexity ratio against the float cache, held-out text in
1,024-token windows / streamed 8,184 tokens: 1.043 / 1.041 with the defaults; 1.060 / 1.070 with keys
centred but not rotated (1.041 on windows with ``--max-context 1024``); with observed key ranges, not
rotated, 1.044 / 1.81 centred and 1.053 / 1.70 (4,096 tokens) uncentred. Scaling the int4 scales by a
factor chosen on the calibration KL did not carry over to held-out text (key scales x1.15: 1.069), so the
pass does not.

Scale tensors are float32 initializers ``kv_scale.key.{layer}`` / ``kv_scale.value.{layer}`` shaped
``(1, kv_heads, 1, head_dim)`` (per channel) or ``(1,)`` (per tensor).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConfigError
from .base import Pass, PassConfig, PassError, PassResult, option

log = logging.getLogger(__name__)

KV_DTYPES = ("fp32", "fp16", "int8", "int4")
SCALE_LAYOUTS = ("per_channel", "per_tensor")
K_RANGES = ("auto", "pair", "observed", "positions")
CLIPS = ("auto", "mse", "none")
CENTERS = ("auto", "on", "off")
CLIP_RATIOS = np.linspace(1.0, 0.3, 15)  # candidate fractions of the calibrated range (clip=mse)
# logical dtype -> (storage dtype name, ONNX elem type, elements per head_dim row divisor, bytes per element)
STORAGE = {
    "fp32": ("float32", onnx.TensorProto.FLOAT, 1, 4),
    "fp16": ("float16", onnx.TensorProto.FLOAT16, 1, 2),
    "int8": ("int8", onnx.TensorProto.INT8, 1, 1),
    "int4": ("uint8", onnx.TensorProto.UINT8, 2, 1),
}
QMAX = {"int8": 127, "int4": 7}
SCALE_INPUTS = (12, 13)  # GroupQueryAttention inputs k_scale, v_scale


def row_elements(dtype: str, head_dim: int) -> int:
    """Elements per (token, kv head) row of the cache buffer in layout ``dtype``."""
    return head_dim // STORAGE[dtype][2]


def bytes_per_token(dtype: str, num_layers: int, kv_heads: int, head_dim: int) -> int:
    """Cache bytes one token occupies over all layers, keys and values."""
    return num_layers * 2 * kv_heads * row_elements(dtype, head_dim) * STORAGE[dtype][3]


def quantize(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """What the kernel stores for ``x`` (..., head_dim): int8, or packed uint8 for int4."""
    q = np.rint(x / scale)
    if dtype == "int8":
        return np.clip(q, -128, 127).astype(np.int8)
    q = (np.clip(q, -8, 7) + 8).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of :func:`quantize` (float32)."""
    if dtype == "int8":
        return q.astype(np.float32) * scale
    lo, hi = (q & 15).astype(np.float32) - 8, (q >> 4).astype(np.float32) - 8
    x = np.empty(q.shape[:-1] + (q.shape[-1] * 2,), np.float32)
    x[..., 0::2], x[..., 1::2] = lo, hi
    return x * scale


@dataclass(frozen=True)
class KvCacheConfig(PassConfig):
    dtype: str = option("fp32", "cache layout: fp32, fp16, int8 or int4 (packed two per byte)")
    k_scale: str = option("per_channel", "key scales (int8/int4): per_channel (one per kv head and channel) "
                                         "or per_tensor (one per layer)")
    v_scale: str = option("per_channel", "value scales (int8/int4): per_channel or per_tensor")
    k_range: str = option("auto", "key ranges: pair (norm of each rotary channel pair, valid at any position), "
                                  "observed (per-channel absmax at the calibrated positions), positions (absmax of "
                                  "the calibration keys rotated to positions across the whole context), or auto "
                                  "(pair for int8, positions for int4)")
    headroom: float = option(1.0, "multiply calibrated ranges by this before choosing scales (values beyond "
                                  "the range are clipped)")
    clip: str = option("auto", "shrink each range to the clip that minimises the squared error on the calibration "
                               "cache: mse, none, or auto (int4: mse, except centred keys that are not rotated: "
                               "none; int8: none)")
    k_center: str = option("auto", "store keys minus their calibrated mean (exact: softmax ignores a shift shared by "
                                   "every key): on, off, or auto (on for int4 caches, off for int8)")
    k_rotate: str = option("auto", "rotate queries and keys by a Hadamard matrix after rotary (exact: q.k is "
                                   "unchanged), so that each stored key channel mixes all of the key's: on, off, or "
                                   "auto (on for int4 caches)")
    calibration_text: str = option("", "UTF-8 text file to calibrate on (default: prose from Python's "
                                       "pydoc_data.topics)")
    samples: int = option(2, "calibration sequences")
    int8_layers: int = option(-1, "int4 only: layers whose cache stays int8, those whose int4 cache costs the most "
                                  "(measured on the calibration text); -1: a third of the layers (1/6 of fp32's "
                                  "bytes), 0: every layer int4")
    sensitivity_tokens: int = option(1024, "int4 with int8 layers: tokens of calibration text each layer's "
                                           "cost is measured on")
    sequence_length: int = option(1024, "tokens per calibration sequence")

    def validate(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"kv-cache.dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        for name in ("k_scale", "v_scale"):
            if getattr(self, name) not in SCALE_LAYOUTS:
                raise ConfigError(f"kv-cache.{name} must be one of {', '.join(SCALE_LAYOUTS)}, "
                                  f"got {getattr(self, name)!r}")
        if self.k_range not in K_RANGES:
            raise ConfigError(f"kv-cache.k_range must be one of {', '.join(K_RANGES)}, got {self.k_range!r}")
        if self.clip not in CLIPS:
            raise ConfigError(f"kv-cache.clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")
        if self.k_center not in CENTERS:
            raise ConfigError(f"kv-cache.k_center must be one of {', '.join(CENTERS)}, got {self.k_center!r}")
        if self.k_center == "on" and self.dtype not in QMAX:
            raise ConfigError(f"kv-cache.k_center centres quantized keys; dtype is {self.dtype}")
        if self.k_rotate not in CENTERS:
            raise ConfigError(f"kv-cache.k_rotate must be one of {', '.join(CENTERS)}, got {self.k_rotate!r}")
        if self.k_rotate == "on" and self.dtype not in QMAX:
            raise ConfigError(f"kv-cache.k_rotate rotates quantized keys; dtype is {self.dtype}")
        if self.k_rotate == "on" and self.k_range == "pair":
            raise ConfigError("kv-cache.k_range=pair bounds rotary channel pairs, which rotated keys no longer "
                              "have; use k_range=positions or observed with k_rotate=on")
        if not 0.25 <= self.headroom <= 4.0:
            raise ConfigError(f"kv-cache.headroom must be in [0.25, 4], got {self.headroom}")
        if self.calibration_text and not Path(self.calibration_text).expanduser().is_file():
            raise ConfigError(f"kv-cache.calibration_text: no such file: {self.calibration_text}")
        if self.samples < 1:
            raise ConfigError(f"kv-cache.samples must be >= 1, got {self.samples}")
        if self.int8_layers < -1:
            raise ConfigError("kv-cache.int8_layers must be -1 (a third of the layers) or >= 0, "
                              f"got {self.int8_layers}")
        if self.int8_layers > 0 and self.dtype != "int4":
            raise ConfigError(f"kv-cache.int8_layers mixes int8 layers into an int4 cache; dtype is {self.dtype}")
        if not 16 <= self.sensitivity_tokens <= 8192:
            raise ConfigError(f"kv-cache.sensitivity_tokens must be in 16..8192, got {self.sensitivity_tokens}")
        if not 16 <= self.sequence_length <= 8192:
            raise ConfigError(f"kv-cache.sequence_length must be in 16..8192, got {self.sequence_length}")


def _attention_nodes(model: onnx.ModelProto) -> dict[int, onnx.NodeProto]:
    """layer -> its GroupQueryAttention node, read from the past_key.{layer} input it takes."""
    nodes = {}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and len(node.input) > 4:
            name = node.input[3]
            if name.startswith("past_key.") and name[len("past_key."):].isdigit():
                nodes[int(name[len("past_key."):])] = node
    return nodes


CENTER_WEIGHT = "kv_center.rotary"
ROTATION_WEIGHT = "kv_rotate.weight"
ROTATION_OFFSET = "kv_rotate.offset"


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _rotary_halves(node: onnx.NodeProto) -> bool:
    """Whether the attention node rotates keys itself, channel i with i + head_dim/2 (non-interleaved)."""
    return _attr(node, "do_rotary") == 1 and _attr(node, "rotary_interleaved") == 0 and len(node.input) > 8


def _key_columns(node: onnx.NodeProto, head_dim: int) -> tuple[int, int, int]:
    """(input index, first key column, width of that input) of an attention node's keys: the packed query
    input when its key input is empty, else the key input."""
    heads, kv_heads = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
    if len(node.input) > 1 and node.input[1]:
        return 1, 0, kv_heads * head_dim
    return 0, heads * head_dim, (heads + 2 * kv_heads) * head_dim


def _insert_nodes(model: onnx.ModelProto, first: list, before: dict[str, list]) -> None:
    """Put the nodes ``first`` at the head of the graph and each list ``before[output]`` just before the node
    whose first output is ``output`` (keeps the graph topologically sorted)."""
    order = list(first)
    for node in model.graph.node:
        order.extend(before.get(node.output[0], []) if node.output else [])
        order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)


def _rotary_angles(model: onnx.ModelProto, nodes: dict[int, onnx.NodeProto], p: str, what: str) -> list:
    """Nodes giving ``{p}cos`` and ``{p}sin`` (1, S, head_dim/2): the attention's rotary cos/sin rows at the
    positions of the step's S tokens, total_sequence_length - S + [0, S)."""
    first = nodes[min(nodes)]
    total, cos, sin = first.input[6], first.input[7], first.input[8]
    if "input_ids" not in {v.name for v in model.graph.input}:
        raise PassError(f"kv-cache: {what} needs the graph input input_ids (the step's token count)")
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), p + "one"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), p + "zero"))
    return [
        helper.make_node("Shape", ["input_ids"], [p + "steps"], start=1, end=2),
        helper.make_node("Squeeze", [p + "steps"], [p + "steps_scalar"]),
        helper.make_node("Cast", [total], [p + "total"], to=onnx.TensorProto.INT64),
        helper.make_node("Sub", [p + "total", p + "steps_scalar"], [p + "start"]),
        helper.make_node("Range", [p + "start", p + "total", p + "one"], [p + "range"]),
        helper.make_node("Unsqueeze", [p + "range", p + "zero"], [p + "positions"]),  # (1, S)
        helper.make_node("Gather", [cos, p + "positions"], [p + "cos"]),
        helper.make_node("Gather", [sin, p + "positions"], [p + "sin"]),
    ]


def _packed(node: onnx.NodeProto) -> bool:
    """Whether the attention node takes [q | k | v] packed in its query input (fuse-projections' form)."""
    return not (len(node.input) > 1 and node.input[1])


def _rotate_keys(model: onnx.ModelProto, nodes: dict[int, onnx.NodeProto]) -> None:
    """Move rotary out of each attention node and rotate its queries and keys by H after it.

    H is the normalised Hadamard matrix of order head_dim (symmetric, orthonormal): (q H).(k H) = q.k,
    so attention is unchanged, while the cache stores k H, each channel of which mixes all of the key's.
    Rotary and H are one MatMul per layer: ``R(p) x H = [x * cos2, x * sin2] @ [H; P H]`` with cos2/sin2
    the step's cos/sin rows repeated over both halves and P the rotate-half matrix (x P = [-x2, x1]), as
    the attention's non-interleaved rotary does it. The node's packed [q | k | v] input is split, q and k
    are rotated together (B, S, heads + kv_heads, head_dim) and lose ``{ROTATION_OFFSET}.{layer}`` (the
    query rows zero, the key rows zero until calibration fills them: offset @ H), and the three are packed
    again. The attention then runs with do_rotary=0."""
    kv_heads, head_dim = KvCachePass._kv_shape(model)
    from ..runtime.kv_cache import hadamard

    h = hadamard(head_dim)
    half = head_dim // 2
    rotate_half = np.zeros((head_dim, head_dim), np.float32)
    i = np.arange(half)
    rotate_half[half + i, i], rotate_half[i, half + i] = -1.0, 1.0
    p = "kv_rotate."
    shared = _rotary_angles(model, nodes, p, "rotating keys")
    shared += [
        helper.make_node("Concat", [p + "cos", p + "cos", p + "sin", p + "sin"], [p + "angles"], axis=-1),
        helper.make_node("Unsqueeze", [p + "angles", p + "two"], [p + "features"]),  # (1, S, 1, 2 head_dim)
    ]
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([2], np.int64), p + "two"),
        numpy_helper.from_array(np.array([0, 0, -1, head_dim], np.int64), p + "heads"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), p + "flat"),
        numpy_helper.from_array(np.concatenate([h, rotate_half @ h]), ROTATION_WEIGHT),
    ])
    steps = {}
    for l, node in sorted(nodes.items()):
        if not (_rotary_halves(node) and _packed(node)):
            raise PassError(f"kv-cache: rotating keys needs attention that rotates keys in non-interleaved halves "
                            f"and takes q, k and v packed in one input (layer {l} does not)")
        rows = _attr(node, "num_heads") + kv_heads
        t = f"{p}{l}."
        model.graph.initializer.extend([
            numpy_helper.from_array(np.zeros((rows, head_dim), np.float32), f"{ROTATION_OFFSET}.{l}"),
            numpy_helper.from_array(np.array([rows * head_dim, kv_heads * head_dim], np.int64), t + "split"),
        ])
        steps[node.output[0]] = [
            helper.make_node("Split", [node.input[0], t + "split"], [t + "qk", t + "v"], axis=-1),
            helper.make_node("Reshape", [t + "qk", p + "heads"], [t + "heads"]),  # (B, S, rows, head_dim)
            helper.make_node("Concat", [t + "heads", t + "heads"], [t + "twice"], axis=-1),
            helper.make_node("Mul", [t + "twice", p + "features"], [t + "angled"]),
            helper.make_node("MatMul", [t + "angled", ROTATION_WEIGHT], [t + "rotated"]),
            helper.make_node("Sub", [t + "rotated", f"{ROTATION_OFFSET}.{l}"], [t + "shifted"]),
            helper.make_node("Reshape", [t + "shifted", p + "flat"], [t + "qk_rotated"]),
            helper.make_node("Concat", [t + "qk_rotated", t + "v"], [t + "packed"], axis=-1),
        ]
        node.input[0] = t + "packed"
        node.input[7], node.input[8] = "", ""
        for a in node.attribute:
            if a.name == "do_rotary":
                a.i = 0
    _insert_nodes(model, shared, steps)


def _rotated_graph(model: onnx.ModelProto) -> bool:
    return any(i.name == ROTATION_WEIGHT for i in model.graph.initializer)


def _shift_rotated_keys(model: onnx.ModelProto, offsets: dict[int, np.ndarray]) -> None:
    """Set the key rows of each layer's ``{ROTATION_OFFSET}.{layer}`` to ``offsets[layer]`` (kv_heads,
    head_dim), an offset of the rotated keys (rotary(key) @ H)."""
    inits = {i.name: k for k, i in enumerate(model.graph.initializer)}
    for l, offset in sorted(offsets.items()):
        name = f"{ROTATION_OFFSET}.{l}"
        old = model.graph.initializer[inits[name]]
        shift = np.zeros(tuple(old.dims), np.float32)
        shift[-offset.shape[0]:] = offset  # the key heads come last in the rotated [q | k] rows
        model.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(shift, name))


def _center_keys(model: onnx.ModelProto, nodes: dict[int, onnx.NodeProto], offsets: dict[int, np.ndarray],
                 fold: bool = True) -> None:
    """Make each layer in ``offsets`` store ``rotary(key) - offset`` (offset: (kv_heads, head_dim)).

    The attention rotates the key it is given at position p, so the graph subtracts R(-p) offset first:
    ``[cos(p), sin(p)] @ W`` with W a (head_dim, width) initializer ``kv_center.rotary.{layer}`` (for kv head
    h at key column o, channel i < head_dim/2: W[i, o+i] = -a_i, W[h2+i, o+i] = -b_i, W[i, o+h2+i] = -b_i,
    W[h2+i, o+h2+i] = a_i, where (a, b) are the offset's halves and h2 = head_dim/2). Positions are those
    the attention uses: total_sequence_length - S + [0, S).

    Where the key comes from a MatMul by a 2-D initializer B (the fused projection, or int4's block-sum
    offset term added to it), that MatMul takes the shift in: ``Concat(A, rotary) @ Concat(B, W)``, the
    weight concatenation being a constant ORT folds at load. No (S, width) tensor is added: with a
    stand-alone shift per layer, a 2,000-token prefill of SmolLM2 peaked 250 MB higher (688 against 451 MB
    folded), as if ORT kept the 30 shifts alive together. Other graphs (or ``fold=False``) get
    ``key + rotary @ W``."""
    p = "kv_center."
    shared = _rotary_angles(model, nodes, p, "centring keys")
    shared.append(helper.make_node("Concat", [p + "cos", p + "sin"], [p + "rotary"], axis=-1))
    producer = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    weights = {i.name: i for i in model.graph.initializer}

    def matmul_by_weight(tensor: str) -> onnx.NodeProto | None:
        """The MatMul by a 2-D initializer used once that makes ``tensor``, directly or as a term of an Add."""
        node = producer.get(tensor)
        for n in [node] + ([producer.get(i) for i in node.input] if node is not None and node.op_type == "Add" else []):
            if n is not None and n.op_type == "MatMul" and n.input[1] in weights and uses[n.input[1]] == 1 \
                    and len(weights[n.input[1]].dims) == 2 and uses[n.output[0]] == 1:
                return n
        return None

    steps = {}  # output of the node the new nodes go before -> those nodes
    for l, offset in sorted(offsets.items()):
        node = nodes[l]
        kv_heads, head_dim = offset.shape
        half = head_dim // 2
        index, start, width = _key_columns(node, head_dim)
        w = np.zeros((head_dim, width), np.float32)
        i = np.arange(half)
        for h in range(kv_heads):
            a, b = offset[h, :half], offset[h, half:]
            o = start + h * head_dim
            w[i, o + i], w[half + i, o + i], w[i, o + half + i], w[half + i, o + half + i] = -a, -b, -b, a
        name = f"{CENTER_WEIGHT}.{l}"
        model.graph.initializer.append(numpy_helper.from_array(w, name))
        matmul = matmul_by_weight(node.input[index]) if fold else None
        if matmul is not None:  # fold the shift into it
            a, b = matmul.input[0], matmul.input[1]
            steps[matmul.output[0]] = [helper.make_node("Concat", [a, p + "rotary"], [f"{a}.{p}{l}"], axis=-1),
                                       helper.make_node("Concat", [b, name], [f"{b}.{p}{l}"], axis=0)]
            matmul.input[0], matmul.input[1] = f"{a}.{p}{l}", f"{b}.{p}{l}"
        else:
            shifted = f"{node.input[index]}.centred"
            steps[node.output[0]] = [helper.make_node("MatMul", [p + "rotary", name], [f"{p}shift.{l}"]),
                                     helper.make_node("Add", [node.input[index], f"{p}shift.{l}"], [shifted])]
            node.input[index] = shifted
    _insert_nodes(model, shared, steps)


def read_key_offsets(model: onnx.ModelProto, num_layers: int, kv_heads: int, head_dim: int,
                     base_dir: str | Path = "") -> np.ndarray | None:
    """The key offsets (layer, kv_heads, head_dim) float32 read back from the centring weights (external
    data relative to ``base_dir``), or None."""
    inits = {i.name: i for i in model.graph.initializer}
    if f"{ROTATION_OFFSET}.0" in inits:  # rotated keys: the graph subtracts offset @ H; H is its own inverse
        from ..runtime.kv_cache import hadamard

        h = hadamard(head_dim)
        shifts = [numpy_helper.to_array(inits[f"{ROTATION_OFFSET}.{l}"], str(base_dir))[-kv_heads:] @ h
                  for l in range(num_layers)]
        return np.stack(shifts).astype(np.float32) if np.any(shifts) else None
    if f"{CENTER_WEIGHT}.0" not in inits:
        return None
    nodes = _attention_nodes(model)
    half = head_dim // 2
    i = np.arange(half)
    out = np.zeros((num_layers, kv_heads, head_dim), np.float32)
    for l in range(num_layers):
        w = numpy_helper.to_array(inits[f"{CENTER_WEIGHT}.{l}"], str(base_dir))
        _, start, _ = _key_columns(nodes[l], head_dim)
        for h in range(kv_heads):
            o = start + h * head_dim
            out[l, h, :half], out[l, h, half:] = -w[i, o + i], -w[half + i, o + i]
    return out


class KvCachePass(Pass):
    name = "kv-cache"
    config_class = KvCacheConfig

    def requires(self, model: onnx.ModelProto) -> None:
        nodes = _attention_nodes(model)
        if not nodes:
            raise PassError("kv-cache found no com.microsoft.GroupQueryAttention node reading a graph input "
                            "past_key.{layer}")
        graph_inputs = {v.name for v in model.graph.input}
        outputs = {v.name for v in model.graph.output}
        for l, node in nodes.items():
            want = (f"past_value.{l}", f"present_key.{l}", f"present_value.{l}")
            have = (node.input[4], node.output[1] if len(node.output) > 1 else "",
                    node.output[2] if len(node.output) > 2 else "")
            if have != want or node.input[4] not in graph_inputs or not set(have[1:]) <= outputs:
                raise PassError(f"kv-cache: the attention node of layer {l} does not read/write "
                                f"{', '.join(want)} as graph inputs/outputs (found {', '.join(have)})")
            kinds = {a.name for a in node.attribute}
            if "k_quant_type" in kinds or "kv_cache_bit_width" in kinds:
                raise PassError(f"kv-cache: layer {l}'s cache is already quantized")
        if self.config.dtype in QMAX and not self.context.tokenizer_json:
            raise PassError("kv-cache needs the model's tokenizer (PassContext.tokenizer_json) to calibrate scales")

    # ------------------------------------------------------------------------------------------
    def int8_count(self, num_layers: int) -> int:
        """Layers kept int8 in an int4 cache (``int8_layers``; -1: a third of them)."""
        c = self.config
        if c.dtype != "int4":
            return 0
        n = num_layers // 3 if c.int8_layers == -1 else c.int8_layers
        if n > num_layers:
            raise PassError(f"kv-cache.int8_layers is {n}, but the graph has {num_layers} layers")
        return n

    def apply(self, model: onnx.ModelProto) -> PassResult:
        c = self.config
        nodes = _attention_nodes(model)
        layers = sorted(nodes)
        kv_heads, head_dim = self._kv_shape(model)
        report = {"dtype": c.dtype, "storage_dtype": STORAGE[c.dtype][0],
                  "row_elements": row_elements(c.dtype, head_dim),
                  "bytes_per_token": bytes_per_token(c.dtype, len(nodes), kv_heads, head_dim)}
        if c.dtype == "fp32":
            return PassResult(model, False, report)
        if c.dtype == "int4" and head_dim % 2:
            raise PassError(f"kv-cache int4 packs two values per byte and needs an even head_dim, got {head_dim}")
        n8 = self.int8_count(len(layers))
        self._center = self.centered() and c.dtype in QMAX
        if self._center and not all(_rotary_halves(node) for node in nodes.values()):
            if c.k_center == "on":
                raise PassError("kv-cache.k_center needs attention that rotates keys itself in non-interleaved "
                                "halves (GroupQueryAttention do_rotary=1, rotary_interleaved=0)")
            self._center = False
        self._rotate = self.rotated() and c.dtype in QMAX
        if self._rotate and not all(_rotary_halves(node) and _packed(node) for node in nodes.values()):
            if c.k_rotate == "on":
                raise PassError("kv-cache.k_rotate needs attention that rotates keys itself in non-interleaved "
                                "halves (GroupQueryAttention do_rotary=1, rotary_interleaved=0) and takes q, k "
                                "and v packed (fuse-projections)")
            self._rotate = False
        if self._rotate and c.k_range == "pair":
            self._rotate = False  # auto rotation gives way to explicitly asked pair ranges
        out = onnx.ModelProto()
        out.CopyFrom(model)
        if self._rotate:
            _rotate_keys(out, _attention_nodes(out))
        dtypes = {l: c.dtype for l in layers}
        if c.dtype in QMAX:
            ids, source = self._token_ids()
            scratch = Path(self.context.work_dir) if self.context.work_dir else None
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                path = Path(tmp) / "calibrate.onnx"
                work = onnx.ModelProto()  # saving with external data rewrites the proto it is given
                work.CopyFrom(out)
                onnx.save_model(work, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location="calibrate.onnx.data", size_threshold=1024)
                ranges, calib = self._calibrate(path, model, nodes, ids)
                calib = {"text": source, **calib}
                scales = {l: self._layer_scales(c.dtype, ranges[l]) for l in layers}
                if n8:
                    n = min(c.sensitivity_tokens, len(ids), self._positions(model, nodes))
                    cost = self._sensitivity(self._kl_meter(path, ids[:n], head_dim), scales)
                    for l in sorted(layers, key=lambda l: -cost[l])[:n8]:
                        dtypes[l] = "int8"
                        scales[l] = self._layer_scales("int8", ranges[l])
                    report["sensitivity"] = {
                        "metric": "mean KL divergence (nats) of the next-token distribution from the float cache's "
                                  "when only this layer's cache is int4, on the calibration text",
                        "tokens": n,
                        "kl": [round(cost[l], 6) for l in layers],
                    }
            report["calibration"] = calib
            report["quantization"] = self._quantize_attention(out, scales, dtypes)
        if len(set(dtypes.values())) > 1:
            report["layer_dtypes"] = [dtypes[l] for l in layers]
            report["bytes_per_token"] = sum(bytes_per_token(dtypes[l], 1, kv_heads, head_dim) for l in layers)
        self._retype(out, dtypes, head_dim)
        return PassResult(out, True, report)

    @staticmethod
    def _kv_shape(model: onnx.ModelProto) -> tuple[int, int]:
        for v in model.graph.input:
            if v.name == "past_key.0":
                dims = v.type.tensor_type.shape.dim
                if len(dims) == 4 and dims[1].dim_value and dims[3].dim_value:
                    return dims[1].dim_value, dims[3].dim_value
        raise PassError("kv-cache: graph input past_key.0 has no static (1, kv_heads, capacity, head_dim) shape")

    @staticmethod
    def _retype(model: onnx.ModelProto, dtypes: dict[int, str], head_dim: int) -> None:
        """Set each layer's past/present tensors to its layout's storage type and row width."""
        for v in list(model.graph.input) + list(model.graph.output):
            kind, _, layer = v.name.partition(".")
            if kind in ("past_key", "past_value", "present_key", "present_value") and int(layer) in dtypes:
                dtype = dtypes[int(layer)]
                v.type.tensor_type.elem_type = STORAGE[dtype][1]
                v.type.tensor_type.shape.dim[3].dim_value = row_elements(dtype, head_dim)

    # ------------------------------------------------------------------------------------------
    def _token_ids(self) -> tuple[list[int], str]:
        from .qdq import calibration_token_ids

        c = self.config
        return calibration_token_ids(self.name, c.calibration_text, self.context.tokenizer_json, c.sequence_length)

    @staticmethod
    def _session(path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    @staticmethod
    def _prefill_feed(sess, ids: list[int], all_logits: bool) -> dict:
        """A prefill of ``ids`` over an empty cache, shaped and typed from the session's inputs (quantized
        caches are uint8/int8; ffn-skip flags stay false)."""
        from .qdq import prefill_feed

        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8}
        inputs = sess.get_inputs()
        past = {i.name: (i.shape[1], i.shape[3], types[i.type]) for i in inputs
                if i.name.startswith(("past_key.", "past_value."))}
        flags = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in inputs if i.type == "tensor(bool)"}
        return prefill_feed(ids, past, all_logits, flags)

    def _calibrate(self, path: Path, model: onnx.ModelProto, nodes: dict, ids: list[int]) -> tuple[dict, dict]:
        """Run the float-cache graph saved at ``path`` on calibration text; return per layer the key ranges
        (observed absmax, rotary-pair norm), the value range, each (kv_heads, head_dim), the slice of the
        cache (keys, values) to fit clips and report errors on, and the key offset (the keys' mean, which
        ``k_center`` subtracts from the keys before the ranges are taken; None without centring); plus a
        report."""
        c = self.config
        n = min(c.sequence_length, self._positions(model, nodes))
        count = min(c.samples, len(ids) // n)
        layers = sorted(nodes)
        keys = {l: [] for l in layers}
        values = {l: [] for l in layers}
        sess = self._session(path)
        names = [o.name for o in sess.get_outputs()]
        for s in range(count):
            result = dict(zip(names, sess.run(None, self._prefill_feed(sess, ids[s * n:(s + 1) * n], False))))
            for l in layers:
                keys[l].append(result[f"present_key.{l}"][0, :, :n])  # (kv_heads, n, head_dim), post-rotary
                values[l].append(result[f"present_value.{l}"][0, :, :n])
        report = {"sequences": count, "tokens": count * n}
        if self.key_range(c.dtype) == "positions" or self.rotated():
            keys, report["key_positions"] = self._reposition(path, model, nodes, keys, n)
        ranges = {}
        for l in layers:
            k, v = np.concatenate(keys[l], axis=1), np.concatenate(values[l], axis=1)
            offset = None
            if self.centered():  # the first token of a sequence (the attention sink) is an outlier: left out
                offset = np.concatenate([x[:, 1:] for x in keys[l]], axis=1).mean(axis=1).astype(np.float32)
                k = k - offset[:, None]
            ranges[l] = layer_ranges(k, v, offset)
        return ranges, report

    def _reposition(self, path: Path, model: onnx.ModelProto, nodes: dict, keys: dict, n: int) -> tuple[dict, int]:
        """The calibration keys (written at positions 0..n-1) rotated to positions drawn uniformly from the
        whole context instead (a windowed cache's slots: ``PassContext.kv_positions``), so that ranges and
        offsets hold wherever a key is written: a channel pair whose rotation over the calibration text is
        partial reaches new angles further on (SmolLM2, int4 cache with ranges observed on 1,024-token
        sequences: perplexity ratio 1.35 on tokens 1,100-4,096). Returns the keys and the number of
        positions drawn from."""
        node = nodes[min(nodes)]
        inits = {i.name: i for i in model.graph.initializer}
        cos, sin = (numpy_helper.to_array(inits[node.input[j]], str(path.parent)).astype(np.float32) for j in (7, 8))
        from ..runtime.kv_cache import hadamard, rotate_halves

        positions = min(cos.shape[0], self.context.kv_positions or cos.shape[0])  # a window: its slots
        rng = np.random.default_rng(0)
        h = hadamard(next(iter(keys.values()))[0].shape[-1]) if self.rotated() else None
        out = {}
        for l, parts in keys.items():
            moved = []
            for k in parts:  # (kv_heads, n, head_dim), written at positions 0..n-1 (rotated keys: times H)
                to = rng.integers(0, positions, size=k.shape[1])
                x = rotate_halves(rotate_halves(k if h is None else k @ h, cos[:n], -sin[:n]), cos[to], sin[to])
                moved.append(x if h is None else x @ h)
            out[l] = moved
        return out, positions

    def _kl_meter(self, path: Path, ids: list[int], head_dim: int):
        """A function of (scales, dtypes) for some layers -> mean KL divergence (nats) of the next-token
        distribution of the graph at ``path`` with those layers' caches quantized, from its float-cache one,
        over the tokens ``ids`` (one prefill)."""
        light = onnx.load(str(path), load_external_data=False)  # the weights stay in calibrate.onnx.data

        def log_probs(m: onnx.ModelProto) -> np.ndarray:
            variant = path.with_name("variant.onnx")
            onnx.save_model(m, str(variant))
            sess = self._session(variant)
            logits = sess.run(["logits"], self._prefill_feed(sess, ids, True))[0][0].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))

        ref = log_probs(light)
        p = np.exp(ref)

        def kl(scales: dict, dtypes: dict) -> float:
            m = onnx.ModelProto()
            m.CopyFrom(light)
            self._quantize_attention(m, scales, dtypes)
            self._retype(m, dtypes, head_dim)
            return float((p * (ref - log_probs(m))).sum(axis=-1).mean())

        return kl

    def _sensitivity(self, kl, scales: dict) -> dict[int, float]:
        """Per layer, the KL divergence when only that layer's cache is int4."""
        cost = {}
        for i, (l, layer_scales) in enumerate(sorted(scales.items())):
            cost[l] = kl({l: layer_scales}, {l: "int4"})
            log.info("kv-cache: layer %d int4 costs KL %.5f (%d/%d)", l, cost[l], i + 1, len(scales))
        return cost

    @staticmethod
    def _positions(model: onnx.ModelProto, nodes: dict) -> int:
        """Rows of the rotary cos cache: the longest sequence the graph runs."""
        cos = next(iter(nodes.values())).input[7]
        for init in model.graph.initializer:
            if init.name == cos:
                return int(init.dims[0])
        raise PassError(f"kv-cache: the attention's cos_cache {cos!r} is not an initializer")

    def key_range(self, dtype: str) -> str:
        """The key range rule for a layer in ``dtype`` (auto: pair for int8; for int4, positions: per-channel
        ranges, whose resolution counts there (SmolLM2 all-int4: 1.17 observed against 1.36 pair), taken
        over every position a key can be written at)."""
        if self.config.k_range != "auto":
            return self.config.k_range
        return "positions" if dtype == "int4" or self.rotated() else "pair"

    def centered(self) -> bool:
        """Whether keys are stored minus their calibrated mean (``k_center``; auto: int4 caches whose
        attention rotates keys in non-interleaved halves, the layout the centring graph is written for)."""
        c = self.config
        return getattr(self, "_center", c.k_center == "on" or (c.k_center == "auto" and c.dtype == "int4"))

    def rotated(self) -> bool:
        """Whether queries and keys are rotated by a Hadamard matrix after rotary (``k_rotate``; auto: int4
        caches whose attention rotates keys in non-interleaved halves)."""
        c = self.config
        return getattr(self, "_rotate", c.k_rotate == "on" or (c.k_rotate == "auto" and c.dtype == "int4"))

    def clip_rule(self, dtype: str, kind: str = "value") -> str:
        """The clip of ``kind``'s ranges in a ``dtype`` layer (auto: mse for int4 except centred keys that are
        not rotated, none for int8). Rotated keys take the clip (torch simulation, 8,192 tokens: 1.039
        clipped, 1.052 not). Unrotated centred keys keep their full range: SmolLM2, int4 cache, 4,096 held-out
        tokens, perplexity ratio 1.033 unclipped against 1.25 with mse clips (uncentred keys: 1.054
        unclipped, 1.050 mse); the clip trims the large keys attention peaks on."""
        if self.config.clip != "auto":
            return self.config.clip
        if dtype != "int4" or (kind == "key" and self.centered() and not self.rotated()):
            return "none"
        return "mse"

    @staticmethod
    def _clip(rng: np.ndarray, x: np.ndarray, layout: str, paired: bool, dtype: str) -> tuple[np.ndarray, float]:
        """The range, per channel (or per tensor), shrunk to the candidate fraction with the least squared
        error of quantize -> dequantize over the calibration cache ``x`` (kv_heads, tokens, head_dim).
        Paired channels (rotary pairs) keep one shared fraction. Returns (range, mean fraction)."""
        qmax = QMAX[dtype]
        errs = []
        for r in CLIP_RATIOS:
            scale = np.maximum(rng * r / qmax, 1e-8)[:, None, :]
            e = ((np.clip(np.rint(x / scale), -qmax - 1, qmax) * scale - x) ** 2).sum(axis=1)  # (kv_heads, head_dim)
            if layout == "per_tensor":
                e = np.full_like(e, e.sum())
            elif paired:
                half = e.shape[-1] // 2
                e = np.concatenate([e[:, :half] + e[:, half:]] * 2, axis=-1)
            errs.append(e)
        best = CLIP_RATIOS[np.argmin(np.stack(errs), axis=0)]  # (kv_heads, head_dim)
        return rng * best, float(best.mean())

    def _scales(self, rng: np.ndarray, layout: str, dtype: str) -> np.ndarray:
        """(kv_heads, head_dim) ranges -> the scale tensor for GroupQueryAttention."""
        qmax = QMAX[dtype]
        if layout == "per_tensor":
            return np.array([max(float(rng.max()) * self.config.headroom / qmax, 1e-8)], np.float32)
        s = np.maximum(rng * self.config.headroom / qmax, 1e-8).astype(np.float32)
        return s[None, :, None, :]  # (1, kv_heads, 1, head_dim)

    def _layer_scales(self, dtype: str, ranges: tuple) -> dict:
        """One layer's key and value scale tensors in ``dtype``: kind -> (scale, relative RMS error on the
        calibration cache, mean clip fraction or None); and ``key_offset``: the key offset or None."""
        c = self.config
        k_abs, k_pair, v_abs, (k, v), offset = ranges
        pair = self.key_range(dtype) == "pair"
        out = {"key_offset": offset}
        for kind, rng, layout, x in (("key", k_pair if pair else k_abs, c.k_scale, k), ("value", v_abs, c.v_scale, v)):
            fraction = None
            if self.clip_rule(dtype, kind) == "mse":
                rng, fraction = self._clip(rng, x, layout, kind == "key" and pair, dtype)
            scale = self._scales(rng, layout, dtype)
            s = scale[0] if scale.ndim == 4 else scale  # (kv_heads, 1, head_dim) against (kv_heads, n, head_dim)
            err = dequantize(quantize(x, s, dtype), s, dtype) - x
            out[kind] = (scale, float(np.sqrt((err ** 2).mean() / max((x ** 2).mean(), 1e-20))), fraction)
        return out

    def _quantize_attention(self, model: onnx.ModelProto, scales: dict, dtypes: dict) -> dict:
        """Give each layer in ``scales`` its quantized cache (scale initializers, GroupQueryAttention inputs
        and attributes); return the manifest's description of the layout."""
        c = self.config
        nodes = _attention_nodes(model)
        offsets = {l: layer["key_offset"] for l, layer in scales.items() if layer.get("key_offset") is not None}
        for l, layer in sorted(scales.items()):
            names = []
            for kind in ("key", "value"):
                name = f"kv_scale.{kind}.{l}"
                model.graph.initializer.append(numpy_helper.from_array(layer[kind][0], name))
                names.append(name)
            node = nodes[l]
            inputs = list(node.input) + [""] * (SCALE_INPUTS[1] + 1 - len(node.input))
            inputs[SCALE_INPUTS[0]], inputs[SCALE_INPUTS[1]] = names
            del node.input[:]
            node.input.extend(inputs)
            node.attribute.extend([
                helper.make_attribute("k_quant_type", "PER_TENSOR" if c.k_scale == "per_tensor" else "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_TENSOR" if c.v_scale == "per_tensor" else "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8 if dtypes[l] == "int8" else 4),
            ])
        if offsets and _rotated_graph(model):
            _shift_rotated_keys(model, offsets)
        elif offsets:
            _center_keys(model, nodes, offsets)
        kv_heads, head_dim = self._kv_shape(model)
        shape = {"per_channel": [1, kv_heads, 1, head_dim], "per_tensor": [1]}
        bits = 8 if c.dtype == "int8" else 4
        main = [l for l in scales if dtypes[l] == c.dtype]
        mixed = sorted(l for l in scales if dtypes[l] != c.dtype)

        def errors(kind: str, ls: list[int]) -> dict:
            e = [scales[l][kind][1] for l in ls]
            return {"max": max(e), "mean": float(np.mean(e))}

        report = {
            "bits": bits,
            "key": {"scheme": c.k_scale, "range": self.key_range(c.dtype), "scale_shape": shape[c.k_scale],
                    "scale_tensor": "kv_scale.key.{layer}", "relative_rms_error": errors("key", main)},
            "value": {"scheme": c.v_scale, "scale_shape": shape[c.v_scale], "scale_tensor": "kv_scale.value.{layer}",
                      "relative_rms_error": errors("value", main)},
            "zero_point": 0 if bits == 8 else 8,
            "formula": ("q = clamp(round(x / scale), -128, 127); x = q * scale" if bits == 8 else
                        "q = clamp(round(x / scale), -8, 7) + 8, two per byte, element 2i in the low nibble; "
                        "x = (q - 8) * scale"),
            "headroom": c.headroom,
            "clip": self.clip_rule(c.dtype),
        }
        report["key"]["clip"] = self.clip_rule(c.dtype, "key")
        rotated = _rotated_graph(model)
        if rotated:
            report["key"]["rotation"] = {
                "kind": "hadamard",
                "graph": "rotary moves out of GroupQueryAttention (do_rotary=0): [x * cos2, x * sin2] @ "
                         f"{ROTATION_WEIGHT} rotates each query and key head and multiplies it by H in one MatMul",
            }
        if offsets:
            report["key"]["offset"] = {
                "rule": "the mean key of the calibration text per layer, kv head and channel (each sequence's "
                        "first token left out), subtracted from every key before it is quantized; attention is "
                        "unchanged, since softmax ignores a shift shared by every key",
                "stored": "q encodes (rotary(key) - offset) @ H" if rotated else "q encodes rotary(key) - offset",
                "graph": f"offset @ H is subtracted from the rotated key: {ROTATION_OFFSET}.{{layer}}" if rotated else
                         "the rotated offset is subtracted from the key before GroupQueryAttention rotates it: "
                         f"[cos, sin](position) @ {CENTER_WEIGHT}.{{layer}}",
            }
        fractions = {k: float(np.mean([scales[l][k][2] for l in main])) for k in ("key", "value")
                     if self.clip_rule(c.dtype, k) == "mse"}
        if fractions:
            report["mean_clip_fraction"] = fractions
        if mixed:  # int8 layers of an int4 cache
            report["int8_layers"] = {
                "layers": mixed, "bits": 8, "zero_point": 0, "key_range": self.key_range("int8"),
                "clip": self.clip_rule("int8"), "key_offset": bool(offsets),
                "formula": "q = clamp(round(x / scale), -128, 127); x = q * scale",
                "relative_rms_error": {k: errors(k, mixed) for k in ("key", "value")},
            }
        return report

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        if not result.modified:
            return
        dtype = self.config.dtype
        layer_dtypes = result.report.get("layer_dtypes")
        for v in list(result.model.graph.input) + list(result.model.graph.output):
            if v.name.startswith(("past_", "present_")):
                want = STORAGE[layer_dtypes[int(v.name.partition(".")[2])] if layer_dtypes else dtype][1]
                if v.type.tensor_type.elem_type != want:
                    raise PassError(f"kv-cache left {v.name} as "
                                    f"{onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}")
        if dtype in QMAX:
            inits = {i.name for i in result.model.graph.initializer}
            for l, node in _attention_nodes(result.model).items():
                missing = [n for n in (f"kv_scale.key.{l}", f"kv_scale.value.{l}")
                           if n not in inits or n not in node.input]
                if missing:
                    raise PassError(f"kv-cache: layer {l}'s attention lacks scale inputs {', '.join(missing)}")


def layer_ranges(k: np.ndarray, v: np.ndarray, offset: np.ndarray | None) -> tuple:
    """One layer's calibration ranges from its cache as stored, keys ``k`` and values ``v`` (kv_heads, tokens,
    head_dim): (key absmax, key rotary-pair norm, value absmax) each (kv_heads, head_dim), the cache (to fit
    clips on), and the key offset already taken off ``k`` (or None); what ``_layer_scales`` reads."""
    half = k.shape[-1] // 2
    pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=1)
    return np.abs(k).max(axis=1), np.concatenate([pair, pair], axis=-1), np.abs(v).max(axis=1), (k, v), offset


def read_scales(model: onnx.ModelProto, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray | None:
    """The calibrated scales broadcast to (layer, 2, kv_heads, head_dim) float32, or None for float caches."""
    inits = {i.name: i for i in model.graph.initializer}
    if "kv_scale.key.0" not in inits:
        return None
    out = np.zeros((num_layers, 2, kv_heads, head_dim), np.float32)
    for l in range(num_layers):
        for j, kind in enumerate(("key", "value")):
            s = numpy_helper.to_array(inits[f"kv_scale.{kind}.{l}"]).astype(np.float32)
            out[l, j] = np.broadcast_to(s.reshape(-1) if s.size == 1 else s[0, :, 0, :], (kv_heads, head_dim))
    return out


# --------------------------------------------------------------------------------------------
# The manifest's description of the layout (a C runtime can allocate the cache from it alone)
# --------------------------------------------------------------------------------------------
SCALES_FILE = "kv_scales.f32"
KEY_OFFSETS_FILE = "kv_key_offsets.f32"


def rotary_inv_freq(hf_model) -> list[float] | None:
    """The model's rotary frequencies (head_dim / 2 of them), which re-rotating shifted keys needs."""
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    return None if inv is None else [float(x) for x in inv.detach().double().cpu().numpy()]


def window_chunk(window: int) -> int:
    """Tokens evicted at once when a windowed cache is full: W/8 amortises the shift over W/8 steps."""
    return max(1, window // 8)


def manifest_entry(model: onnx.ModelProto, arch: dict, pass_log: list[dict], bundle_dir: Path,
                   window: int | None, sinks: int, inv_freq: list[float] | None, built: str = "fp32") -> dict:
    """The layout keys of the manifest's ``kv_cache`` section; writes the scales file into ``bundle_dir``.

    ``built``: the layout the target's build gives the cache when no kv-cache pass ran (gpu: fp16)."""
    layers, heads, dim = arch["num_layers"], arch["num_kv_heads"], arch["head_dim"]
    report = next((p["report"] for p in pass_log if p["pass"] == "kv-cache" and p["modified"]), None)
    kv = report["dtype"] if report else built
    row = row_elements(kv, dim)
    entry = {
        "kv_dtype": kv,
        "dtype": STORAGE[kv][0],
        "shape": ["batch=1", "kv_heads", "capacity", "head_dim" if row == dim else f"head_dim/{dim // row}"],
        "row_elements": row,
        "bytes_per_token": bytes_per_token(kv, layers, heads, dim),
        "quantization": None,
        "window": None,
        "layers": None,
    }
    if report and report.get("layer_dtypes"):  # mixed precision: each layer's own storage and row
        entry["layers"] = [{"kv_dtype": d, "dtype": STORAGE[d][0], "row_elements": row_elements(d, dim)}
                           for d in report["layer_dtypes"]]
        entry["bytes_per_token"] = report["bytes_per_token"]
    quant = (report or {}).get("quantization")
    if quant:
        scales = read_scales(model, layers, heads, dim)
        (Path(bundle_dir) / SCALES_FILE).write_bytes(scales.astype("<f4").tobytes())
        entry["quantization"] = {
            **quant,
            "scales_file": SCALES_FILE,
            "scales_layout": "(layer, 2 [key, value], kv_heads, head_dim) float32 little-endian; the graph's "
                             "scale initializers broadcast to that shape",
            "calibration": report.get("calibration"),
        }
        entry["static_bytes"] = int(scales.nbytes)
        offsets = read_key_offsets(model, layers, heads, dim, bundle_dir)
        rotated = _rotated_graph(model)
        if rotated:
            entry["quantization"]["key_rotation"] = {
                "kind": "hadamard",
                "order": dim,
                "matrix": "H = Sylvester's Hadamard matrix of order head_dim divided by sqrt(head_dim) (H[i, j] = "
                          "(-1)^popcount(i & j) / sqrt(head_dim)); symmetric and orthonormal, its own inverse",
                "stored": "a stored key dequantizes to (rotary(key) - offset) @ H; queries are rotated by H too, "
                          "so attention logits are unchanged",
            }
        if offsets is not None:  # centred keys: the runtime re-rotating a windowed cache adds them back
            (Path(bundle_dir) / KEY_OFFSETS_FILE).write_bytes(offsets.astype("<f4").tobytes())
            entry["quantization"]["key_offsets_file"] = KEY_OFFSETS_FILE
            entry["quantization"]["key_offsets_layout"] = (
                "(layer, kv_heads, head_dim) float32 little-endian; a stored key dequantizes to rotary(key) - "
                "offset, so re-rotating it by R: quantize(R(x + offset) - offset)" if not rotated else
                "(layer, kv_heads, head_dim) float32 little-endian; a stored key dequantizes to (rotary(key) - "
                "offset) @ H, so re-rotating it by R: quantize((R(x @ H + offset) - offset) @ H)")
            entry["static_bytes"] += int(offsets.nbytes)
    if window is not None:
        if inv_freq is None:
            raise PassError("a windowed KV cache re-rotates shifted keys and needs the model's rotary frequencies; "
                            "this model exposes none")
        entry["window"] = {
            "sinks": sinks,
            "window": window,
            "capacity": sinks + window,
            "evict_chunk": window_chunk(window),
            "positions": "cache slot: when full, the oldest non-sink tokens are evicted evict_chunk at a time, "
                         "the rest shift left and their keys are re-rotated by -evicted positions",
            "rotary_inv_freq": inv_freq,
            "rotary_layout": "non-interleaved halves: channel i pairs with i + head_dim/2",
        }
    return entry
