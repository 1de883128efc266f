"""edgedec.evaluate: the strided-window perplexity, checked against transformers on the tiny model."""

from __future__ import annotations

import math

import pytest

from _tiny import copy_bundle, edit_manifest, rehash, sample_text
from edgedec.errors import ConfigError
from edgedec.evaluate import CHUNK, EvalOptions, evaluate, read_texts, windows


# --- the window plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,window,stride", [(10, 6, 3), (10, 4, 1), (100, 32, 16), (7, 32, 16), (33, 8, 7),
                                             (2, 2, 1)])
def test_windows_score_every_token_after_the_first_exactly_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert sorted(scored) == list(range(1, n))
    for k, (begin, end, first) in enumerate(spans):
        assert 0 <= begin < first < end <= n and end - begin <= window
        if k > 0:  # later windows give every scored token at least window - stride tokens of context
            assert first - begin >= window - stride


def test_disjoint_windows_skip_each_window_start():
    spans = windows(9, 4, 4)
    assert spans == [(0, 4, 1), (4, 8, 5)]  # token 8 alone in a window has no context: not scored
    assert windows(10, 4, 4)[-1] == (8, 10, 9)


def test_hf_guide_example():
    # window 6, stride 3 over 10 tokens: the module docstring's picture
    assert windows(10, 6, 3) == [(0, 6, 1), (3, 9, 6), (6, 10, 9)]


# --- options and inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(window=1), "window must be >= 2"),
    (dict(window=8, stride=9), r"stride must be in \[1, window=8\]"),
    (dict(window=8, stride=0), r"stride must be in \[1, window=8\]"),
    (dict(max_tokens=1), "max_tokens must be >= 2"),
    (dict(threads=0), "threads must be >= 1"),
])
def test_invalid_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalOptions(**kwargs)


def test_read_texts_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ConfigError, match="empty.txt is empty"):
        read_texts([tmp_path / "empty.txt"])
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        read_texts([tmp_path / "binary.txt"])
    with pytest.raises(ConfigError, match="at least one --text"):
        read_texts([])


def test_window_larger_than_context(tiny):
    _, bundle = tiny
    with pytest.raises(ConfigError, match=r"window 1024 is larger than the context .* \(512 tokens\)"):
        evaluate(bundle, [("t", sample_text())], EvalOptions(window=1024))


def test_text_of_one_token(tiny):
    _, bundle = tiny
    with pytest.raises(ConfigError, match="perplexity needs at least 2"):
        evaluate(bundle, [("t", "a")], EvalOptions(window=16, stride=8))


# --- numbers -----------------------------------------------------------------------------------
def _transformers_perplexity(hf_dir, texts, window, stride, max_tokens=None):
    """The Hugging Face perplexity guide's strided method, written independently with torch."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    nll, count, budget = 0.0, 0, max_tokens
    for text in texts:
        ids = torch.tensor(tok.encode(text).ids)
        if budget is not None:
            ids, budget = ids[:budget], budget - min(budget, len(ids))
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            input_ids = ids[begin:end][None]
            labels = input_ids.clone()
            labels[:, : -(end - prev_end)] = -100  # tokens the previous window scored
            with torch.no_grad():
                logits = model(input_ids).logits[0]
            nll += F.cross_entropy(logits[:-1].double(), labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count), count


@pytest.mark.parametrize("window,stride", [(64, 32), (CHUNK + 40, 100), (48, 48)])
def test_perplexity_matches_transformers(tiny, window, stride):
    hf, bundle = tiny
    texts = [sample_text("for"), sample_text("while")]
    result = evaluate(bundle, [("for", texts[0]), ("while", texts[1])],
                      EvalOptions(window=window, stride=stride, max_tokens=700, threads=1))
    expected, count = _transformers_perplexity(hf, texts, window, stride, max_tokens=700)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.reference is None and result.perplexity_ratio is None and result.greedy_agreement is None
    d = result.to_dict()
    assert {"perplexity", "tokens"} <= d.keys() and "perplexity_ratio" not in d


def test_self_reference_gives_ratio_one_and_full_agreement(tiny):
    _, bundle = tiny
    result = evaluate(bundle, [("for", sample_text("for"))], EvalOptions(window=64, stride=32, threads=1),
                      reference=bundle)
    assert result.perplexity_ratio == 1.0
    assert result.greedy_agreement == 1.0
    assert result.reference_perplexity == result.perplexity
    d = result.to_dict()
    assert {"perplexity", "tokens", "reference_perplexity", "perplexity_ratio", "greedy_agreement"} <= d.keys()


def test_other_weights_disagree(tiny, tiny_other):
    _, bundle = tiny
    _, other = tiny_other
    opts = EvalOptions(window=64, stride=32, max_tokens=300, threads=1)
    text = [("for", sample_text("for"))]
    result = evaluate(bundle, text, opts, reference=other)
    alone = evaluate(other, text, opts)
    assert result.reference_perplexity == pytest.approx(alone.perplexity, rel=1e-9)
    assert result.perplexity_ratio == pytest.approx(result.perplexity / alone.perplexity)
    assert 0.0 <= result.greedy_agreement < 1.0


def test_max_tokens_and_several_texts(tiny):
    _, bundle = tiny
    opts = EvalOptions(window=32, stride=16, threads=1)
    a, b = ("a", sample_text("for")), ("b", sample_text("if"))
    both = evaluate(bundle, [a, b], EvalOptions(window=32, stride=16, max_tokens=150, threads=1))
    first = evaluate(bundle, [a], EvalOptions(window=32, stride=16, max_tokens=150, threads=1))
    assert both.tokens == first.tokens == 149  # the first text alone exceeds the budget; b is never read
    assert [t.name for t in both.texts] == ["a"]
    separately = [evaluate(bundle, [t], opts) for t in (a, b)]
    together = evaluate(bundle, [a, b], opts)
    nll = sum(math.log(r.perplexity) * r.tokens for r in separately)
    assert together.tokens == sum(r.tokens for r in separately)
    assert together.perplexity == pytest.approx(math.exp(nll / together.tokens), rel=1e-9)


def test_reference_with_other_vocabulary_is_refused(tiny, tmp_path):
    _, bundle = tiny
    other = copy_bundle(bundle, tmp_path / "other")
    edit_manifest(other, lambda m: m["architecture"].update(vocab_size=301))
    # a manifest whose vocabulary disagrees with its own graph is refused at load (issue 21) ...
    from edgedec.errors import BundleError

    with pytest.raises(BundleError, match=r"must end in vocab_size \(301\)"):
        evaluate(bundle, [("t", sample_text())], EvalOptions(window=32, stride=16), reference=other)
    # ... and two consistent bundles of different vocabularies are refused as such
    from types import SimpleNamespace

    from edgedec.evaluate import _check_compatible

    engine = lambda vocab: SimpleNamespace(bundle=SimpleNamespace(arch={"vocab_size": vocab}))  # noqa: E731
    with pytest.raises(ConfigError, match="different vocabularies"):
        _check_compatible(engine(300), engine(301), "a", "b")


def test_reference_with_other_tokenizer_is_refused(tiny, tmp_path):
    import json

    _, bundle = tiny
    other = copy_bundle(bundle, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]  # swap two ids: same size, different tokenizer
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    rehash(other)
    with pytest.raises(ConfigError, match="different tokenizers"):
        evaluate(bundle, [("t", sample_text())], EvalOptions(window=32, stride=16), reference=other)
