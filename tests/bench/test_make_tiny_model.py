"""benchmarks/make_tiny_model.py: the seeded tiny model CI gates (and these tests use)."""

from __future__ import annotations

import json
import subprocess
import sys

from _tiny import MAKER


def test_script_is_seeded_and_writes_a_loadable_model(tiny, tmp_path):
    hf, _ = tiny  # built by the same function with seed 0 and 512 positions
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(MAKER), str(out), "--seed", "0", "--max-positions", "512"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2 and config["head_dim"] % 16 == 0
    assert 250 <= config["vocab_size"] <= 300

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_other_seed_other_weights(tiny, tiny_other):
    assert (tiny[0] / "model.safetensors").read_bytes() != (tiny_other[0] / "model.safetensors").read_bytes()
    assert (tiny[0] / "tokenizer.json").read_bytes() == (tiny_other[0] / "tokenizer.json").read_bytes()
