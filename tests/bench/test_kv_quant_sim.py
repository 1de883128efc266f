"""benchmarks/kv_quant_sim.py on a tiny model: the fake-quantized cache is wired through attention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SIM = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_quant_sim.py"


def _run(model_dir: Path, text: Path, *args: str) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, str(SIM), "--model", str(model_dir), "--text", str(text),
                           "--tokens", "256", "--threads", "1", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["variant"]: r for r in rows}


def test_int8_everywhere_is_nearly_free_and_int4_keys_cost_more(tiny_llama_dir, tmp_path):
    """int8 in every layer: each variant's ratio stays within 1% of the float cache (a transform applied
    on one side only, or scales in the wrong layout, would move it far off); int4 moves it further."""
    from pydoc_data.topics import topics

    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(list(topics.values())[:20]))
    variants = "keys,centred,rotated,rotated-values,token-values"
    int8 = _run(tiny_llama_dir, text, "--int8-layers", "0,1", "--variants", variants)
    assert int8["float"]["tokens"] == 256 and int8["float"]["perplexity"] > 1
    for v in variants.split(","):
        assert abs(int8[v]["ratio"] - 1) < 0.01, (v, int8[v])
    int4 = _run(tiny_llama_dir, text, "--variants", "centred,rotated")
    for v in ("centred", "rotated"):
        assert abs(int4[v]["ratio"] - 1) > abs(int8[v]["ratio"] - 1), (v, int4[v], int8[v])
