"""What NPU execution providers accept, as data: one rule set per runtime, every rule with its source.

``edgedec check BUNDLE --target npu --rules qnn|nnapi|all`` (:mod:`edgedec.check`) applies these to the
bundle's graphs. Operator lists are the op builders each execution provider registers in ONNX Runtime
(an op without a builder is not offloaded; it falls back to the CPU or fails session creation when CPU
fallback is disabled, as NPU deployments do). Sources are cited as repository paths (microsoft/onnxruntime,
main branch) or documentation URLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ORT = "microsoft/onnxruntime:"
SHAPE_FIXING_DOC = "https://onnxruntime.ai/docs/tutorials/mobile/helpers/make-dynamic-shape-fixed.html"
QNN_DOC = "https://onnxruntime.ai/docs/execution-providers/QNN-ExecutionProvider.html"


@dataclass(frozen=True)
class RuleSet:
    name: str
    provider: str
    ops: frozenset  # op types of the default ONNX domain with a builder in this EP
    ops_source: str
    max_rank: int
    rank_source: str
    tensor_dtypes: frozenset  # element types allowed for runtime tensors (graph inputs/outputs, node outputs)
    dtype_source: str
    static_shapes_source: str
    quantized_weights: bool  # MatMul/Gemm weights must come through DequantizeLinear
    quantized_weights_source: str = ""
    notes: tuple = field(default=())


QNN = RuleSet(
    name="qnn",
    provider="QNNExecutionProvider (Qualcomm Hexagon HTP)",
    ops=frozenset("""
        Add Asin Atan Mul Abs And Ceil Cos Sign Div Equal Exp Floor Greater GreaterOrEqual LeakyRelu Less
        LessOrEqual Log Max Min Neg Not Or Pow PRelu Relu Gelu Elu Round Where ScatterND Sigmoid Sin Sqrt Sub
        Sum Tanh Concat QuantizeLinear DequantizeLinear HardSwish HardSigmoid DepthToSpace SpaceToDepth
        GridSample LpNormalization ScatterElements Softmax LogSoftmax Cast ReduceMax ReduceMean ReduceMin
        ReduceProd ReduceSum ReduceL2 Conv ConvTranspose GlobalAveragePool AveragePool MaxPool GlobalMaxPool
        Reshape Flatten Squeeze Unsqueeze Gemm Gather GatherElements ArgMax ArgMin Clip Slice Split Resize
        Upsample TopK Tile InstanceNormalization BatchNormalization LayerNormalization RMSNormalization LRN
        Transpose Reciprocal Pad Expand Einsum MatMul Mean LSTM CumSum RandomUniformLike GatherND Mod
        ThresholdedRelu STFT Inverse
    """.split()),
    ops_source=ORT + "onnxruntime/core/providers/qnn/builder/op_builder_factory.cc (OpBuilderRegistrations)",
    max_rank=5,
    rank_source=QNN_DOC + " (HTP op definitions: tensors up to rank 5)",
    tensor_dtypes=frozenset({"uint8", "int8", "uint16", "int16", "int32", "uint32", "float32", "float16", "bool"}),
    dtype_source=QNN_DOC + " (no 64-bit tensors on the HTP; int64 constants are narrowed to int32 by the EP)",
    static_shapes_source=QNN_DOC + " (QNN graphs are finalized for fixed shapes; " + SHAPE_FIXING_DOC + ")",
    quantized_weights=True,
    quantized_weights_source=QNN_DOC + " (HTP backend: quantize float models to 8/16-bit integers, QDQ format)",
)

NNAPI = RuleSet(
    name="nnapi",
    provider="NnapiExecutionProvider (Android NNAPI)",
    ops=frozenset("""
        BatchNormalization Cast Clip Concat DepthToSpace DequantizeLinear Elu Flatten Gather Identity LeakyRelu
        LRN Pad QuantizeLinear Relu Reshape Resize Slice Softmax Squeeze Transpose Unsqueeze Add Div Mul Pow
        PRelu QLinearAdd QLinearMul Sub AveragePool GlobalAveragePool GlobalMaxPool MaxPool QLinearAveragePool
        Conv QLinearConv Gemm MatMul QLinearMatMul Abs Exp Floor Log Neg QLinearSigmoid Sigmoid Sin Sqrt Tanh
        Max Min ReduceMean
    """.split()),
    ops_source=ORT + "onnxruntime/core/providers/nnapi/nnapi_builtin/builders/op_builder_factory.cc",
    max_rank=4,
    rank_source=ORT + "onnxruntime/core/providers/nnapi/nnapi_builtin/builders/helper.cc (NNAPI operands up to 4-D)",
    tensor_dtypes=frozenset({"uint8", "int8", "int32", "float32", "float16", "bool"}),
    dtype_source="https://developer.android.com/ndk/reference/group/neural-networks#operandcode (no 16-bit "
                 "integer activations, no 64-bit tensors)",
    static_shapes_source=SHAPE_FIXING_DOC + " (NNAPI and CoreML need fixed input shapes)",
    quantized_weights=False,
    notes=("NNAPI runs float32 models too (GPU/DSP drivers may relax to float16)",),
)

RULE_SETS: dict[str, RuleSet] = {r.name: r for r in (QNN, NNAPI)}


def rule_sets(name: str) -> list[RuleSet]:
    """The rule sets for ``name`` (one of RULE_SETS, or ``all``)."""
    from ..errors import ConfigError

    if name == "all":
        return list(RULE_SETS.values())
    if name not in RULE_SETS:
        raise ConfigError(f"unknown rule set {name!r}; valid: {', '.join(RULE_SETS)}, all")
    return [RULE_SETS[name]]
