"""Calibrations: statistics measured by running a bundle (or a graph) on text, that passes then use.

``ffn``: per-layer FFN saturation for the ``ffn-skip`` pass (after FFN-SkipLLM). For every layer the
cosine similarity of the residual stream entering and leaving its FFN block, ``cos(x, x + ffn(x))``,
measured at every token of the calibration sequences (prefill over an empty cache: the same numbers a
token-by-token decode would see). From it:

* ``mean_cos`` / ``p10_cos`` per layer: how saturated the stream is across the block (1 = the block
  hardly turns the hidden state; FFN-SkipLLM skips those);
* ``never_skip_first`` / ``never_skip_last``: the leading and trailing layers whose blocks change the
  stream most (lowest saturation), which must never be skipped;
* ``recommended``: for target ratios 0.1 ... 0.5, the layers a static choice would skip (highest mean
  saturation among the eligible ones) and the cos threshold that separates them.

Other calibrations (e.g. vocabulary statistics for speculative decoding) get their own ``calibrate_*``
function here and their own ``edgedec calibrate WHAT`` subcommand.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .errors import BundleError, ConfigError

# The calibration itself lives with the pass that uses it (a pass never imports a tool); this module adds
# what a command needs: reading a bundle. The names stay importable from here.
from .passes.ffn_skip import (  # noqa: F401 (re-exported)
    FFN_STATS_KIND,
    FFN_STATS_VERSION,
    RECOMMENDED_RATIOS,
    FfnStats,
    _feeds,
    calibrate_ffn_graph,
    never_skip,
    plan_skipping,
    read_calibration_text,
)

def calibrate_ffn(bundle: str | Path, texts: list[str] | None = None, samples: int = 8, length: int = 256,
                  threads: int | None = None) -> FfnStats:
    """FFN saturation of the decoder of ``bundle`` on ``texts`` (files; default: Python's documentation)."""
    from tokenizers import Tokenizer

    from .runtime import Bundle

    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if not 2 <= length <= 8192:
        raise ConfigError(f"sequence length must be in 2..8192, got {length}")
    b = Bundle.open(bundle)
    graph = b.graph("decoder")
    try:
        model = onnx.load(str(b.file(graph["file"])))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise BundleError(f"cannot load {graph['file']} of {bundle}: {exc}") from exc
    tok = Tokenizer.from_file(str(b.file(b.manifest["tokenizer"]["file"])))
    pieces = [read_calibration_text(t) for t in (texts or [None])]
    ids = [i for text, _ in pieces for i in tok.encode(text).ids]
    length = min(length, int(b.manifest["kv_cache"]["max_capacity"]))
    return calibrate_ffn_graph(model, ids, samples, length, source=", ".join(s for _, s in pieces), threads=threads)



