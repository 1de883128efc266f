"""End to end on tiny random Llama (tied head) and Qwen2 (attention biases): the bundle's runtime
against transformers, plus the runtime's sampling, stopping and input validation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgedec.errors import BundleError, GenerationError
from edgedec.runtime import Engine

PROMPTS = [
    "def fibonacci(n):\n    return",
    "The quick brown fox",
    "Hello, world! 12345 + 678 = ",
    "class A:\n    pass\n\n",
    "x",
    "In Python, the import statement",
    "Étrange café, naïve façade — 東京 🙂",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return Engine.load(tiny["bundle"], threads=1)


@pytest.fixture(scope="module")
def hf(tiny, load_hf):
    return load_hf(tiny["dir"])


def test_tokenizer_matches_transformers(engine, hf):
    _, tokenizer = hf
    for prompt in PROMPTS:
        assert engine.codec.encode(prompt) == tokenizer(prompt)["input_ids"], prompt


def test_greedy_matches_transformers_generate(engine, hf, hf_generate):
    model, tokenizer = hf
    distinct = set()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ours = [t.id for t in engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        theirs = hf_generate(model, ids, NEW_TOKENS)
        assert ours == theirs, f"prompt {prompt!r}: first difference at token {_first_diff(ours, theirs)}"
        stats = engine.last_stats
        assert (stats.prompt_tokens, stats.new_tokens, stats.stop_reason) == (len(ids), NEW_TOKENS, "length")
        assert stats.token_ids == ours
        distinct |= set(ours)
    assert len(distinct) > 20, "the tiny model should not collapse to a few tokens, or parity means little"


def test_generate_from_token_ids_equals_text(engine, hf):
    _, tokenizer = hf
    prompt = PROMPTS[0]
    by_text = [t.id for t in engine.generate(prompt, max_new_tokens=8, ignore_eos=True)]
    by_ids = [t.id for t in engine.generate(tokenizer(prompt)["input_ids"], max_new_tokens=8, ignore_eos=True)]
    assert by_text == by_ids


def test_streamed_text_is_the_decoded_tokens(engine, hf):
    _, tokenizer = hf
    for prompt in PROMPTS:
        tokens = list(engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
        text = "".join(t.text for t in tokens)
        assert text == tokenizer.decode([t.id for t in tokens], skip_special_tokens=True), prompt


def test_forward_logits_match_transformers(engine, hf):
    """Multi-token prefill, single-token decode and a multi-token step on top of the cache, all rows."""
    import torch

    model, tokenizer = hf
    ids = tokenizer(PROMPTS[5] + PROMPTS[0])["input_ids"]
    assert len(ids) >= 12
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()  # (len(ids), vocab)
    dec = engine.decoder
    dec.kv.length = 0
    got, start = [], 0
    for n in (len(ids) - 6, 1, 2, 3):
        rows = list(range(n))
        got.append(dec.forward(ids[start : start + n], logits_rows=rows))
        start += n
    got = np.concatenate(got)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # rows pick positions; the default is the last one
    dec.kv.length = 0
    picked = dec.forward(ids, logits_rows=[0, len(ids) - 1])
    np.testing.assert_allclose(picked, ref[[0, -1]], atol=1e-4, rtol=0)
    dec.kv.length = 0
    np.testing.assert_allclose(dec.forward(ids), ref[[-1]], atol=1e-4, rtol=0)


def test_rollback_by_shrinking_the_cache_length(engine, hf):
    """Rejected tokens roll back by lowering kv.length: the next step overwrites their entries."""
    import torch

    model, tokenizer = hf
    ids = tokenizer(PROMPTS[1])["input_ids"]
    dec = engine.decoder
    dec.kv.length = 0
    dec.forward(ids)
    dec.forward([5, 6, 7])  # speculative tokens, rejected
    dec.kv.length = len(ids)
    got = dec.forward([9, 10], logits_rows=[0, 1])
    with torch.no_grad():
        ref = model(torch.tensor([ids + [9, 10]])).logits[0, -2:].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_chat_applies_the_template(engine, hf, hf_generate):
    model, tokenizer = hf
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a list?"}]
    text = engine.codec.apply_chat_template(messages, add_generation_prompt=True)
    assert text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's bos, not another one from encode()
    ours = [t.id for t in engine.chat(messages, max_new_tokens=16, ignore_eos=True)]
    assert engine.last_stats.prompt_tokens == len(ids)
    assert ours == hf_generate(model, ids, 16)


def test_chat_without_template_is_refused(tiny_llama_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_llama_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tokenizer"]["chat_template"] = None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.load(bundle, threads=1)
    with pytest.raises(GenerationError, match="no chat template"):
        engine.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], ["hi"]])
def test_chat_rejects_malformed_messages(engine, messages):
    with pytest.raises(GenerationError, match="messages must be a non-empty list"):
        engine.chat(messages)


def test_seeded_sampling_is_reproducible(engine):
    def sample(seed, **kw):
        return [t.id for t in engine.generate(PROMPTS[1], max_new_tokens=32, temperature=1.0, seed=seed,
                                              ignore_eos=True, **kw)]

    a = sample(7)
    assert a == sample(7)
    assert a != sample(8)
    assert sample(7, top_k=20, top_p=0.9) == sample(7, top_k=20, top_p=0.9)


def test_degenerate_sampling_is_greedy(engine):
    greedy = [t.id for t in engine.generate(PROMPTS[2], max_new_tokens=16, ignore_eos=True)]
    for kw in (dict(temperature=1.5, top_k=1), dict(temperature=1.5, top_p=1e-9), dict(temperature=1e-4)):
        sampled = [t.id for t in engine.generate(PROMPTS[2], max_new_tokens=16, seed=3, ignore_eos=True, **kw)]
        assert sampled == greedy, kw


def test_sampler_distribution():
    from edgedec.runtime import Sampler

    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125], np.float32))
    np.testing.assert_allclose(Sampler(1.0).probs(logits), [0.5, 0.25, 0.125, 0.125], atol=1e-6)
    np.testing.assert_allclose(Sampler(1.0, top_k=2).probs(logits), [2 / 3, 1 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(Sampler(1.0, top_p=0.7).probs(logits), [2 / 3, 1 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(Sampler(1.0, top_p=0.5).probs(logits), [1, 0, 0, 0], atol=1e-6)
    hot = Sampler(2.0).probs(logits)
    assert hot[0] < 0.5 and hot[3] > 0.125
    draws = [Sampler(1.0, seed=s)(logits) for s in range(400)]
    assert abs(draws.count(0) / 400 - 0.5) < 0.1


def test_stop_strings(engine):
    """Output ends right before the first stop string, including stop strings that span tokens: the
    start of a stop string must not have been streamed already."""
    prompt = PROMPTS[3]
    tokens = list(engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True))
    full = "".join(t.text for t in tokens)
    assert len(full) > 30
    # two- and three-character stops at every boundary between two tokens' texts, and a few inside
    bounds, pos = [], 0
    for t in tokens[:-1]:
        pos += len(t.text)
        if t.text:
            bounds.append(pos)
    stops = {full[b - 1 : b + 1] for b in bounds[:12]} | {full[b - 2 : b + 1] for b in bounds[:12] if b >= 2}
    stops |= {full[i : i + 2] for i in range(0, len(full) - 2, 7)}
    for s in sorted(stops):
        pieces = list(engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, stop=[s]))
        assert "".join(t.text for t in pieces) == full[: full.index(s)], s
        assert engine.last_stats.stop_reason == "stop"
    # the earliest of several stop strings wins; a plain string is one stop string
    late, early = full[-3:], full[5:7]
    text = engine.generate_text(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, stop=[late, early])
    assert text == full[: min(full.index(late), full.index(early))]
    stopped = engine.generate_text(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, stop=early)
    assert stopped == full[: full.index(early)]
    # a stop string that never appears, or only starts to at the very end, changes nothing
    for never in ("\x00never\x00", full[-2:] + "\x00"):
        assert engine.generate_text(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, stop=[never]) == full
        assert engine.last_stats.stop_reason == "length"


@pytest.mark.parametrize("stop", [[""], ["ok", ""], [None], [3]])
def test_bad_stop_strings_are_refused(engine, stop):
    with pytest.raises(GenerationError, match="stop strings must be non-empty strings"):
        engine.generate("hello", stop=stop)


def test_eos_stops_generation(engine, monkeypatch):
    first = [t.id for t in engine.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True)]
    monkeypatch.setattr(engine.codec, "eos_ids", frozenset({first[2]}))
    assert [t.id for t in engine.generate(PROMPTS[0], max_new_tokens=4)] == first[:2]
    assert engine.last_stats.stop_reason == "eos"
    assert engine.last_stats.token_ids == first[:3]  # the eos token is counted, not yielded
    assert [t.id for t in engine.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True)] == first


def test_full_context_stops_generation(tiny, hf, hf_generate):
    model, tokenizer = hf
    engine = Engine.load(tiny["bundle"], threads=1, context_length=24)
    ids = tokenizer(PROMPTS[5])["input_ids"]
    out = [t.id for t in engine.generate(ids, max_new_tokens=100, ignore_eos=True)]
    assert engine.last_stats.stop_reason == "context_full"
    assert len(ids) + len(out) == 24 + 1  # the last token is returned but needs no cache entry
    assert out == hf_generate(model, ids, len(out))


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "the prompt is empty"),
        (dict(prompt=[]), "the prompt is empty"),
        (dict(prompt=[1, 2, 10**6]), r"prompt token ids must be in \[0, 384\)"),
        (dict(prompt=[1, -1]), r"prompt token ids must be in \[0, 384\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(max_new_tokens=-5), "max_new_tokens must be >= 1, got -5"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
        (dict(temperature=float("inf")), "temperature must be >= 0, got inf"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), "top_k must be >= 0 .0 disables it., got -1"),
    ],
)
def test_generate_rejects_bad_requests(engine, kwargs, message):
    kwargs = {"prompt": "hello", **kwargs}
    with pytest.raises(GenerationError, match=message):
        engine.generate(**kwargs)  # raises at the call, before any token is produced


def test_prompt_longer_than_context_is_refused(tiny):
    engine = Engine.load(tiny["bundle"], threads=1, context_length=16)
    with pytest.raises(GenerationError, match=r"the prompt has 16 tokens; the context holds 16"):
        engine.generate(list(range(3, 19)))
    with pytest.raises(GenerationError, match=r"the prompt has \d+ tokens; the context holds 16"):
        engine.generate("The quick brown fox jumps over the lazy dog. " * 4)
    assert len(list(engine.generate(list(range(3, 18)), max_new_tokens=5, ignore_eos=True))) == 2  # 15 fit
    assert engine.last_stats.stop_reason == "context_full"


def test_forward_beyond_capacity_is_refused(tiny):
    engine = Engine.load(tiny["bundle"], threads=1, context_length=16)
    engine.decoder.kv.length = 0
    with pytest.raises(GenerationError, match="17 tokens do not fit the context of 16 tokens"):
        engine.decoder.forward(list(range(17)))
    with pytest.raises(GenerationError, match="no tokens to run"):
        engine.decoder.forward([])


@pytest.mark.parametrize(
    "ids, rows, message",
    [
        ([1, 2, 3], [3], r"logits_rows must be a non-empty list of positions in \[0, 3\), got \[3\]"),
        ([1, 2, 3], [-1], r"logits_rows must be a non-empty list of positions in \[0, 3\), got \[-1\]"),
        ([1, 2, 3], [], r"logits_rows must be a non-empty list of positions in \[0, 3\), got \[\]"),
        ([1, 2, 384], None, r"token ids must be in \[0, 384\)"),
    ],
)
def test_forward_rejects_bad_rows_and_ids(engine, ids, rows, message):
    engine.decoder.kv.length = 0
    with pytest.raises(GenerationError, match=message):
        engine.decoder.forward(ids, logits_rows=rows)
    assert engine.decoder.kv.length == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(context_length=0), GenerationError, r"context_length must be in \[1, 256\] for this bundle, got 0"),
        (dict(context_length=257), GenerationError, r"context_length must be in \[1, 256\] for this bundle, got 257"),
        (dict(threads=0), GenerationError, "threads must be >= 1, got 0"),
    ],
)
def test_load_rejects_bad_options(tiny_llama_bundle, kwargs, error, message):
    with pytest.raises(error, match=message):
        Engine.load(tiny_llama_bundle, **kwargs)


def test_load_rejects_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="is not a bundle directory"):
        Engine.load(tmp_path / "nope")


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
