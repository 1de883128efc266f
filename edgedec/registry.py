"""What edgedec can do, as data: passes, targets, the optional dependencies they need.

Plain tables, so ``edgedec targets list`` and ``edgedec passes list`` import nothing heavy.
"""

from __future__ import annotations

TARGETS: dict[str, dict] = {
    "cpu": {
        "module": "edgedec.targets.cpu",
        "backend": "onnxruntime",
        "description": "ONNX Runtime, CPU execution provider; in-place KV cache via GroupQueryAttention",
        "passes": ["fuse-projections", "fuse-norms"],  # required: always run first
        "requires": ["onnxruntime"],
    },
    "npu": {
        "module": "edgedec.targets.npu",
        "backend": "onnxruntime",
        "description": "static shapes, standard ONNX ops, QDQ int8 weights / 16-bit activations, for NPU "
                       "execution providers (QNN, NNAPI); checked with `edgedec check --target npu`",
        "passes": ["qdq"],  # required
        "requires": ["onnxruntime", "tokenizers"],
    },
    "gpu": {
        "module": "edgedec.targets.gpu",
        "backend": "onnxruntime",
        "description": "ONNX Runtime CUDA execution provider: float16 weights and KV cache on the device "
                       "(builds anywhere; runs where onnxruntime-gpu sees a CUDA GPU)",
        "passes": ["fuse-projections"],  # required
        "requires": ["onnxruntime"],
    },
    "cpu-tvm": {
        "module": "edgedec.targets.cpu_tvm",
        "backend": "tvm",
        "description": "Apache TVM (Relax) library for this machine's CPU, built from the source weights "
                       "(float32, or -q int4: its own 4-bit kernels, lossless on GGUF sources; "
                       "-q int4:activations=int8 with AVX512-VNNI: faster, inputs rounded to int8); in-place KV "
                       "cache; runs on the TVM runtime",
        "passes": ["int4"],  # its own weight quantization; the ONNX passes target ONNX Runtime
        "requires": ["apache-tvm"],
    },
    "arm64": {
        "module": "edgedec.targets.arm64",
        "backend": "tvm",
        "description": "Apache TVM (Relax) cross-compiled for aarch64 Linux/Android (NEON; float32 or "
                       "-q int4): decoder.tar of objects, plus decoder.so with aarch64-linux-gnu-gcc",
        "passes": ["int4"],
        "requires": ["apache-tvm"],
    },
}

# name -> {"impl": "module:Class", "description": one line, "targets": [...], "requires": [packages]}
PASSES: dict[str, dict] = {
    "fuse-projections": {
        "impl": "edgedec.passes.fuse_projections:FuseProjectionsPass",
        "description": "q/k/v into one MatMul (packed GroupQueryAttention input), gate/up into one MatMul + Split",
        "targets": ["cpu", "gpu"],
        "requires": [],
    },
    "fuse-norms": {
        "impl": "edgedec.passes.fuse_norms:FuseNormsPass",
        "description": "RMSNorm into SimplifiedLayerNormalization, with the residual Add in front of it "
                       "(SkipSimplifiedLayerNormalization)",
        "targets": ["cpu"],
        "requires": ["onnxruntime"],
    },
    "draft-head": {
        "impl": "edgedec.passes.draft_head:DraftHeadPass",
        "description": "fuse a trained draft head with a trimmed vocabulary (VocabTrim) into the verifier: each "
                       "run also emits the next round's first draft token (edgedec calibrate draft-head)",
        "targets": ["cpu"],
        "requires": ["onnxruntime", "optuna"],
    },
    "top-candidates": {
        "impl": "edgedec.passes.top_candidates:TopCandidatesPass",
        "description": "every run also emits each logits row's top tokens (TopK), which Token Recycling learns "
                       "from; added by compile --spec with a recycling drafter",
        "targets": ["cpu"],
        "requires": ["onnxruntime"],
    },
    "int4": {
        "impl": "edgedec.passes.int4:Int4Pass",
        "description": "block-wise 4-bit weights; exact re-expression of GGUF Q4_0/Q4_1/Q8_0 sources. cpu: "
                       "MatMulNBits, with the options below; cpu-tvm/arm64: the target's own kernels, whose one "
                       "option is activations=float|int8 (int8: inputs rounded to int8, AVX512-VNNI, cpu-tvm only)",
        "targets": ["cpu", "cpu-tvm", "arm64"],
        "requires": ["onnxruntime"],
    },
    "int8": {
        "impl": "edgedec.passes.int8:Int8Pass",
        "description": "8-bit weights with int8 activations per block (MatMulNBits), or quantize_dynamic",
        "targets": ["cpu"],
        "requires": ["onnxruntime"],
    },
    "qdq": {
        "impl": "edgedec.passes.qdq:QdqPass",
        "description": "static QuantizeLinear/DequantizeLinear form for NPUs (int8 weights, 16-bit activations), "
                       "calibrated on text",
        "targets": ["cpu", "npu"],
        "requires": ["onnxruntime", "tokenizers"],
    },
    "ffn-skip": {
        "impl": "edgedec.passes.ffn_skip:FfnSkipPass",
        "description": "input-adaptive FFN skipping (FFN-SkipLLM): an If per saturated layer, chosen per token by "
                       "the runtime; lossy fast decoding or a lossless drafter (calibrate: edgedec calibrate ffn)",
        "targets": ["cpu"],
        "requires": ["onnxruntime", "tokenizers"],
    },
    "kv-cache": {
        "impl": "edgedec.passes.kv_cache:KvCachePass",
        "description": "KV-cache layout fp32/fp16/int8/int4 (GroupQueryAttention's quantized cache, static scales "
                       "calibrated on text); set by compile --kv",
        "targets": ["cpu"],
        "requires": ["onnxruntime", "tokenizers"],
    },
}
