"""Run-time FFN skipping (bundles built with the ``ffn-skip`` pass): which FFN blocks to skip, per token.

Torch-free. The decoder graph of such a bundle has one bool input ``ffn_skip.{l}`` (shape (1,)) per
*skippable* layer l and one output ``ffn_cos`` (float32, (skippable,)): the cosine similarity of the
hidden state entering and leaving each skippable layer's FFN block, averaged over the step's new tokens
(1.0 where the block was skipped). The controller owns both buffers; the decoder session binds them once:

* ``mask``: bool (skippable,); ``mask[i]`` is bound as ``ffn_skip.{skippable[i]}`` (a one-element view);
* ``cos``: float32 (skippable,), bound as ``ffn_cos``.

Policy (FFN-SkipLLM's saturation rule, made per token): the *running saturation* of a layer is an
exponential moving average of its measured cos over the tokens where its block ran, starting from the
calibrated mean. Prompt/verification passes (several tokens) always run the full model; so do the first
``warmup`` decoded tokens and every ``refresh``-th one (so skipped layers get measured again). Every other
decoded token skips the ``skip_per_token`` most saturated skippable layers whose running saturation is
at least ``threshold`` (the calibrated floor): a token whose stream is unusually unsaturated keeps more
blocks. Attention runs in every layer, so the KV cache stays complete.

Two uses: ``fast`` (lossy decoding, enabled by default for bundles compiled with ``use=fast``) and
``draft`` (the ``ffn-skip`` drafter drafts with skipping, the full model verifies: lossless). While a
drafter is active, plain decode steps never skip (``lossless``).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import BundleError

SKIP_INPUT = "ffn_skip"
COS_OUTPUT = "ffn_cos"
SECTION_KEYS = ("skippable", "mean_cos", "skip_per_token", "draft_skip_per_token", "threshold", "warmup",
                "refresh", "use", "num_layers")


def skip_section(manifest: dict) -> dict | None:
    """The ``ffn_skip`` report of the manifest's pass log (None for a bundle built without the pass)."""
    for p in manifest.get("passes", []):
        if isinstance(p, dict) and p.get("pass") == "ffn-skip":
            section = (p.get("report") or {}).get("ffn_skip")
            if not isinstance(section, dict) or any(k not in section for k in SECTION_KEYS):
                raise BundleError("the manifest's ffn-skip pass entry lacks its 'ffn_skip' report "
                                  f"({', '.join(SECTION_KEYS)})")
            return section
    return None


class FfnSkipController:
    """Chooses the FFN blocks each decode step skips; the :class:`DecoderSession` consults it."""

    def __init__(self, section: dict, decay: float = 0.8):
        self.skippable = [int(l) for l in section["skippable"]]  # layers with a switch
        n = len(self.skippable)
        mean = section["mean_cos"]
        if not n or any(not 0 <= l < len(mean) for l in self.skippable):
            raise BundleError(f"ffn_skip.skippable {self.skippable} does not fit {len(mean)} layers")
        self.num_layers = int(section["num_layers"])
        self.mask = np.zeros(n, np.bool_)  # (skippable,) bound as ffn_skip.{layer}
        self.cos = np.ones(n, np.float32)  # (skippable,) bound as ffn_cos
        self.prior = np.asarray([mean[l] for l in self.skippable], np.float64)
        self.skip_per_token = int(section["skip_per_token"])
        self.draft_skip_per_token = int(section["draft_skip_per_token"])
        self.threshold = float(section["threshold"])
        self.warmup, self.refresh = int(section["warmup"]), int(section["refresh"])
        self.enabled = section["use"] == "fast"  # lossy decoding with skipping
        self.lossless = False  # set while speculating: plain steps run the full model
        self.decay = decay
        self._drafting = False
        self.blocks_skipped = 0  # over the decode steps of this sequence
        self.decode_steps = 0
        self.reset()

    def reset(self) -> None:
        """A new sequence: saturation back to the calibrated prior, counters to zero."""
        self.sat = self.prior.copy()  # (skippable,) running saturation
        self.step = 0  # decode steps since the prompt
        self.mask[:] = False
        self.blocks_skipped = self.decode_steps = 0

    @property
    def skip_ratio(self) -> float:
        """Fraction of all FFN blocks skipped over this sequence's decode steps (drafts excluded)."""
        return self.blocks_skipped / (self.decode_steps * self.num_layers) if self.decode_steps else 0.0

    def set_skip(self, skip_per_token: int) -> None:
        """Change the blocks skipped per lossy decode step (0 .. number of skippable layers)."""
        if not 0 <= skip_per_token <= len(self.skippable):
            raise ValueError(f"skip_per_token must be in [0, {len(self.skippable)}], got {skip_per_token}")
        self.skip_per_token = skip_per_token

    @contextlib.contextmanager
    def drafting(self, skip_per_token: int | None = None):
        """Decode steps inside skip ``skip_per_token`` blocks (default: the bundle's draft setting)."""
        saved = self.skip_per_token, self.enabled, self.lossless, self._drafting
        self.skip_per_token = self.draft_skip_per_token if skip_per_token is None else skip_per_token
        self.enabled, self.lossless, self._drafting = True, False, True
        try:
            yield self
        finally:
            self.skip_per_token, self.enabled, self.lossless, self._drafting = saved

    def full(self) -> None:
        """Before a multi-token pass (prompt, verification): run every block."""
        self.mask[:] = False

    def before_decode(self) -> None:
        """Before a one-token step: choose the blocks to skip."""
        k = self.skip_per_token if self.enabled and not self.lossless else 0
        self.mask[:] = False
        if not self._drafting:
            step = self.step
            self.step += 1
            self.decode_steps += 1
            if step < self.warmup or (self.refresh and step % self.refresh == self.refresh - 1):
                k = 0
        if k:
            order = np.argsort(-self.sat, kind="stable")[:k]
            chosen = order[self.sat[order] >= self.threshold]
            self.mask[chosen] = True
            if not self._drafting:
                self.blocks_skipped += len(chosen)

    def after_run(self) -> None:
        """After any step: fold the measured saturation of the blocks that ran into the running mean."""
        ran = ~self.mask
        self.sat[ran] = self.decay * self.sat[ran] + (1 - self.decay) * self.cos[ran]

    @classmethod
    def bind(cls, manifest: dict, session, binding) -> "FfnSkipController | None":
        """The controller for a bundle built with ffn-skip, its buffers bound into ``binding``; else None."""
        import onnxruntime as ort

        section = skip_section(manifest)
        if section is None:
            return None
        ctl = cls(section)
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        names = [f"{SKIP_INPUT}.{l}" for l in ctl.skippable]
        missing = [n for n in names if n not in inputs] + ([COS_OUTPUT] if COS_OUTPUT not in outputs else [])
        if missing:
            raise BundleError("the manifest says the decoder skips FFN blocks but the graph lacks "
                              f"{', '.join(missing)}")
        ctl._values = [ort.OrtValue.ortvalue_from_numpy(ctl.mask[i:i + 1]) for i in range(len(names))]
        ctl._values.append(ort.OrtValue.ortvalue_from_numpy(ctl.cos))
        for name, value in zip(names, ctl._values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(COS_OUTPUT, ctl._values[-1])
        return ctl
