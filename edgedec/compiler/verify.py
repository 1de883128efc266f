"""Verify a built bundle against its source model: the runtime's own session against transformers' logits.

A bundle is checked as it will run: :func:`verify_bundle` opens the staged bundle with the runtime
(:class:`edgedec.runtime.Engine`, whatever its backend) and feeds it fixed token ids in the steps a
generation takes, comparing every row's logits with the ones the source model gave for the same ids
(:func:`source_reference`, computed once, before the source model is freed)::

    reference = verify.source_reference(hf_model, vocab_size, "transformers")   # (12, vocab) float32
    del hf_model                                                                 # the weights can go now
    ...build and stage the bundle...
    verification = verify.verify_bundle(staging_dir, reference, tolerance=1e-2)  # ModelError beyond it

The steps (:data:`STEPS`): a prefill of 9 tokens with every row's logits, one single-token decode on
top of that cache, then a 2-token step (on the TVM targets, the static ``verify2`` function a speculative
verification calls). The TVM targets verify their library this way; the ONNX targets still verify the
exported graph before their passes (:func:`edgedec.compiler.export.verify_against_source`) and can move
here by calling :func:`verify_bundle` on their staged bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError

STEPS = (9, 1, 2)  # tokens per call: prefill (every row's logits), one decode step, a 2-row verification
SEED = 0


@dataclass(frozen=True)
class Reference:
    """What the bundle is compared with: the source model's logits on ``ids`` (all rows, in one call)."""

    ids: np.ndarray  # (sum(STEPS),) int64
    logits: np.ndarray  # (len(ids), vocab) float32
    description: str  # e.g. "transformers with the quantized weights' dequantization"


def verification_ids(vocab_size: int, seed: int = SEED) -> np.ndarray:
    """The fixed token ids the checks run (the same as the ONNX export's verification)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=sum(STEPS), dtype=np.int64)


def source_reference(hf_model, vocab_size: int, description: str = "transformers", seed: int = SEED) -> Reference:
    """Run the transformers model once on :func:`verification_ids`; keep its logits (a few MB)."""
    import torch

    ids = verification_ids(vocab_size, seed)
    with torch.no_grad():
        logits = hf_model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
    return Reference(ids=ids, logits=np.ascontiguousarray(logits), description=description)


def check_decoder(decoder, reference: Reference) -> dict:
    """Run ``decoder`` (a runtime session: ``forward(ids, logits_rows)``, ``kv.length``) through
    :data:`STEPS` from an empty cache; return the worst difference per step and overall."""
    decoder.kv.length = 0
    diffs, start = [], 0
    for n in STEPS:
        chunk = reference.ids[start:start + n].tolist()
        out = decoder.forward(chunk, None if n == 1 else list(range(n)))
        out = np.asarray(out, dtype=np.float32).reshape(n, -1)
        diffs.append(float(np.abs(out - reference.logits[start:start + n]).max()))
        start += n
    return {"max_abs_logit_diff": max(diffs), "per_step": diffs}


def verify_bundle(bundle_dir: str | Path, reference: Reference, tolerance: float, subject: str | None = None,
                  threads: int | None = None) -> dict:
    """Open the (staged) bundle with the runtime and compare it with ``reference``; the manifest's
    ``verification`` entry. Raises :class:`ModelError` when the difference exceeds ``tolerance``."""
    from ..runtime import Engine

    engine = Engine.load(bundle_dir, threads=threads, context_length=max(16, sum(STEPS)), verify=False,
                         trust=True)  # the library this compile just built
    graph = engine.bundle.graph("decoder")
    subject = subject or f"{graph['file']} through the runtime's {type(engine.decoder).__name__}"
    result = check_decoder(engine.decoder, reference)
    worst = result["max_abs_logit_diff"]
    if not worst <= tolerance:  # NaN fails too
        raise ModelError(f"the built bundle ({subject}) differs from the source model by {worst:.3g} in logits "
                         f"(tolerance {tolerance}); refusing to write a wrong bundle")
    return {
        "max_abs_logit_diff": worst,
        "tokens": len(reference.ids),
        "reference": reference.description,
        "subject": subject,
        "steps": f"prefill {STEPS[0]} rows, decode 1, verify {STEPS[2]} rows",
        "per_step": [round(d, 6) for d in result["per_step"]],
        "tolerance": tolerance,
        "logit_scale": float(np.abs(reference.logits).max()),
    }
