"""Write a tiny, seeded, randomly initialised Llama model as a Hugging Face directory.

For CI and tests: it needs no download. The tokenizer is a byte-level BPE trained with the
``tokenizers`` library on the text of Python's own ``pydoc_data.topics`` (shipped with CPython), and
the weights are random (seeded), so the model's text is nonsense but every shape, the chat template
and the end-of-sequence token are real.

    python benchmarks/make_tiny_model.py OUT_DIR [--seed 0] [--vocab 300] [--max-positions 512]
    edgedec compile OUT_DIR -o tiny-bundle

Shapes: hidden 64, 4 query heads / 2 KV heads of head_dim 16 (GroupQueryAttention wants a multiple of
16), 2 layers, FFN 128, untied embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_text() -> list[str]:
    """Paragraphs of English prose and code from the CPython documentation topics."""
    from pydoc_data.topics import topics

    return [para for key in sorted(topics) for para in topics[key].split("\n\n") if para.strip()]


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    return tokenizer


def make_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 300, max_positions: int = 512,
                    hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        initializer_range=0.1,  # larger than the default so logits are not near-uniform
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=300, help="BPE vocabulary size (including special tokens)")
    parser.add_argument("--max-positions", type=int, default=512, help="max_position_embeddings")
    args = parser.parse_args()
    path = make_tiny_model(args.out_dir, seed=args.seed, vocab_size=args.vocab, max_positions=args.max_positions)
    print(path)


if __name__ == "__main__":
    main()
