"""Shared fixtures: tiny, seeded, randomly initialised Llama and Qwen2 models and their bundles.

Each model is a real Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``)
built once per session, so the whole pipeline (source loading, export, verification, bundle writing,
runtime) runs on it exactly as on a downloaded model, in seconds.

Shapes: hidden 64, 4 query heads / 2 KV heads, head_dim 16 (ONNX Runtime's GroupQueryAttention with
rotary needs head_dim % 16 == 0), 2 layers, FFN 128, context 256, vocabulary 384. The Llama ties its
head to the embedding (like SmolLM2); the Qwen2 does not and has random, nonzero q/k/v biases. The
tokenizer is a byte-level BPE trained on Python's own ``pydoc_data.topics`` (no corpus ships with the
tests), with ``<s>``/``</s>`` and a ChatML-like chat template. ``tiny_llama_gguf`` is the tiny Llama
written as a llama.cpp-style F32 GGUF.

Helpers as fixtures: ``load_hf`` (transformers model + tokenizer, cached), ``hf_generate`` (greedy
``generate`` with eos disabled), ``cli`` (``edgedec ...`` in-process) and ``one_line_error`` (the
CLI's error contract).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# the local signing key that compile signs native-code bundles with: one per test session, not the user's
os.environ.setdefault("EDGEDEC_LOCAL_KEY", str(Path(tempfile.mkdtemp(prefix="edgedec-key-")) / "local-signing-key"))

VOCAB_SIZE = 384
MAX_POSITIONS = 256
SPECIAL_TOKENS = ["<|pad|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SHAPES = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=MAX_POSITIONS,
    vocab_size=VOCAB_SIZE,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    # larger than the usual 0.02: greedy decoding of a random model then produces varied tokens (at
    # 0.02 it repeats one token) and the top two logits stay ~1e-3 apart, far above fp32 noise
    initializer_range=0.2,
)


# transformers 5 rebuilds a qwen2 model's tokenizer with Qwen2Tokenizer's own normalizer and
# pre-tokenizer, whatever tokenizer.json says; the tiny Qwen2 uses them too so that transformers and
# tokenizer.json (what edgedec ships) agree, as they do for real Qwen2 checkpoints.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_tokenizer(out_dir: Path, model_type: str):
    """A byte-level BPE tokenizer with bos/eos and chat tokens, saved as a fast tokenizer."""
    from pydoc_data.topics import topics
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if model_type == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [topics[k] for k in sorted(topics)]
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    bos = tok.token_to_id("<s>")
    # the post-processor adds <s>: the same ids with tokenizers (the runtime) and transformers
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _build_tiny(out_dir: Path, model_type: str, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(out_dir, model_type)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if model_type == "llama":
        # tied embeddings, like SmolLM2
        config = LlamaConfig(**TINY_SHAPES, **special, tie_word_embeddings=True, attention_bias=False)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**TINY_SHAPES, **special, tie_word_embeddings=False)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():  # the default init zeroes biases; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    assert proj.bias is not None
                    proj.bias.normal_(0.0, 0.5)
    with torch.no_grad():  # non-trivial norm weights too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", seed=1234)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", seed=4321)


def _compile(model_dir: Path, out: Path) -> Path:
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    compile_model(str(model_dir), out, CompileOptions())
    return out


@pytest.fixture(scope="session")
def tiny_llama_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    return _compile(tiny_llama_dir, tmp_path_factory.mktemp("bundles") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_bundle(tiny_qwen2_dir, tmp_path_factory) -> Path:
    return _compile(tiny_qwen2_dir, tmp_path_factory.mktemp("bundles") / "tiny-qwen2")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request) -> dict:
    """One tiny model (parametrized over both architectures): its source dir and its bundle."""
    return {
        "name": request.param,
        "dir": request.getfixturevalue(f"tiny_{request.param}_dir"),
        "bundle": request.getfixturevalue(f"tiny_{request.param}_bundle"),
    }


@pytest.fixture
def bundle_copy(tiny_llama_bundle, tmp_path) -> Path:
    """A private copy of the tiny Llama bundle, free to corrupt."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, dst)
    return dst


def _write_gguf(model_dir: Path, out: Path) -> Path:
    """Write the tiny Llama as an F32 GGUF the way llama.cpp's converter does (q/k rows permuted for
    its interleaved rotary; byte-level "gpt2" tokenizer with merges; no output.weight = tied head)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    sd = load_file(model_dir / "model.safetensors")
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg["hidden_size"] // nh)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [None] * len(tok["model"]["vocab"])
    for t, i in tok["model"]["vocab"].items():
        tokens[i] = t
    special = {a["content"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    f32 = lambda name: sd[name].astype(np.float32)
    w.add_tensor("token_embd.weight", f32("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", f32("model.norm.weight"))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(p + "input_layernorm.weight"))
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(f32(p + "self_attn.q_proj.weight"), nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(f32(p + "self_attn.k_proj.weight"), nkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", f32(p + "self_attn.v_proj.weight"))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(p + "self_attn.o_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(p + "post_attention_layernorm.weight"))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(p + "mlp.gate_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f32(p + "mlp.up_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f32(p + "mlp.down_proj.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama's weights as a GGUF file (F32, llama.cpp tensor names and layout)."""
    return _write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


# ---------------------------------------------------------------------------------------------
# transformers reference and CLI helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hf_models() -> dict:
    """Cache of transformers models (float32, eval) by directory, so each loads once per session."""
    return {}


@pytest.fixture(scope="session")
def load_hf(hf_models):
    def load(model_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        key = str(model_dir)
        if key not in hf_models:
            model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
            hf_models[key] = (model, AutoTokenizer.from_pretrained(key))
        return hf_models[key]

    return load


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """transformers ``generate``, greedy, with end-of-sequence disabled: exactly ``new_tokens`` tokens.

    ``eos_token_id=None`` must be a keyword argument: inside a ``GenerationConfig`` it is overridden by
    the model's default. (``min_new_tokens`` would instead mask eos out of the logits and change the
    argmax; edgedec's ``ignore_eos`` keeps the argmax and goes on.)
    """
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id or 0)
    out = out[0, len(ids):].tolist()
    assert len(out) == new_tokens, "transformers stopped early; eos was not disabled"
    return out


@pytest.fixture(scope="session")
def hf_generate():
    return hf_greedy


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli():
    """Run ``edgedec ARGS...`` in-process (typer's CliRunner); stdout and stderr apart."""
    from typer.testing import CliRunner

    from edgedec.cli import app

    def run(*args) -> CliResult:
        r = CliRunner().invoke(app, [str(a) for a in args])
        return CliResult(r.exit_code, r.stdout, r.stderr)

    return run


def assert_one_line_error(result: CliResult, pattern: str, code: int = 2) -> None:
    """The CLI's contract for errors: exit code, one 'error: ...' line on stderr, no traceback."""
    import re

    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert re.search(pattern, lines[0]), (pattern, lines[0])


@pytest.fixture(scope="session")
def one_line_error():
    return assert_one_line_error
