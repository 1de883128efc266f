"""The runtime is torch-free: loading a bundle and generating imports no torch, transformers, optimum,
onnx or compiler code (DESIGN: the runtime never imports the compiler)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import edgedec

HEAVY = ["torch", "transformers", "optimum", "onnx", "onnxscript", "accelerate", "safetensors", "gguf"]

SCRIPT = """
import json, sys
from edgedec.runtime import Engine
engine = Engine.load(sys.argv[1], threads=1)
text = engine.generate_text("def f(x):", max_new_tokens=8, ignore_eos=True)
chat = engine.generate_text(
    engine.codec.encode(engine.codec.apply_chat_template([{"role": "user", "content": "hi"}]),
                        add_special_tokens=False),
    max_new_tokens=4, ignore_eos=True, temperature=0.8, seed=1)
print(json.dumps({"new_tokens": engine.last_stats.new_tokens,
                  "modules": sorted(m for m in sys.modules if "." not in m or m.startswith("edgedec."))}))
"""


def test_runtime_imports_no_torch(tiny_llama_bundle):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_bundle)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["new_tokens"] == 4
    loaded = set(result["modules"])
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not {m for m in loaded if m.startswith(("edgedec.compiler", "edgedec.models", "edgedec.passes",
                                                     "edgedec.targets", "edgedec.cli"))}


def test_runtime_sources_import_nothing_heavy():
    """Static check, so that a heavy import behind a rarely taken branch is caught too."""
    runtime = Path(edgedec.__file__).parent / "runtime"
    for path in sorted(runtime.glob("*.py")) + [Path(edgedec.__file__), Path(edgedec.__file__).parent / "errors.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"
                assert not name.lstrip(".").startswith(("compiler", "passes", "targets", "models", "cli")), \
                    f"{path.name} imports {name}"
