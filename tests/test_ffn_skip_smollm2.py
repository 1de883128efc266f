"""FFN skipping on the real model: SmolLM2-135M-Instruct (float32, as in test_smollm2: with int4 weights
ONNX Runtime's one-token and multi-token kernels differ by up to ~1 logit, so no drafter is token-exact
there) with the ffn-skip pass (calibrated in the pass). The ffn-skip drafter must be lossless: greedy output
identical to decoding without speculation, which on this bundle runs the full model. ~3 minutes on 2 cores
(one compile)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "The first ten prime numbers are 2, 3, 5, 7,",
    "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
]


@pytest.fixture(scope="module")
def skip_bundle(tmp_path_factory):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("smollm2-ffn") / "bundle"
    compile_model(None, out, CompileOptions(passes=(
        ("ffn-skip", {"ratio": 0.25, "use": "draft", "samples": 2, "sequence_length": 128}),)))
    return out


def test_ffn_skip_drafter_lossless(skip_bundle):
    from edgedec.runtime import Engine

    eng = Engine.load(skip_bundle, threads=2)
    ctl = eng.decoder.ffn_skip
    assert ctl is not None and not ctl.enabled and ctl.draft_skip_per_token == 8  # round(0.25 x 30)
    for prompt in PROMPTS:
        want = [t.id for t in eng.generate(prompt, max_new_tokens=32, ignore_eos=True, drafter=None)]
        got = [t.id for t in eng.generate(prompt, max_new_tokens=32, ignore_eos=True, drafter="ffn-skip",
                                          draft_len=3, adaptive_draft=False)]
        assert got == want
        st = eng.last_stats
        assert st.drafted_tokens > 0 and st.accepted_tokens > 0
