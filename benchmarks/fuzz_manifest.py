"""Fuzz a bundle's manifest: every mutation must end in a clean refusal or a bundle that works.

    python benchmarks/fuzz_manifest.py --n 5000 [--seed 0] [--bundle DIR ...]

Each trial applies one to three random edits to a bundle's ``manifest.json`` (a value replaced by
another JSON value of any type, a key deleted or added, a list entry dropped or duplicated, a number
pushed past its bounds; the files it hashes stay as they are), then ``Engine.load`` → ``generate`` →
``chat`` (and ``edgedec inspect`` first, which must exit 0 or 2). A trial is **clean** when it raises an :class:`edgedec.errors.EdgedecError` whose message is
one line (what the CLI turns into exit 2) or when all three succeed; anything else (TypeError,
KeyError, MemoryError, an ONNX Runtime error, a message over several lines) is a **crash**, printed
with its mutation. Exit status: 0 when no trial crashed, 1 otherwise.

Without ``--bundle`` the script compiles the tiny seeded model of ``benchmarks/make_tiny_model.py``
as a plain cpu bundle, an int4 bundle with ngram speculation, and an int4-cache bundle with a sink +
sliding window, and fuzzes them in turn. ``tests/security/test_fuzz.py`` runs a few hundred trials of
the same code in the suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# values a mutation may put anywhere: every JSON type, edge numbers, and names the runtime knows
POOL = [None, True, False, 0, 1, -1, -2, 2, 3, 7, 16, 1.5, -0.0, 0.5, 2**31, 2**40, 10**30, 16 * 10**12,
        "", "x", "fp32", "fp16", "int8", "int4", "float32", "float16", "uint8", "decoder", "prefill",
        "static", "tvm", "onnxruntime", "tvm-relax-vm", "ngram", "recycling", "ngram+recycling", "head",
        "ffn-skip", "CPUExecutionProvider", "decoder.onnx", "tokenizer.json", "{{ }}", "{{ messages }}",
        "{% for m in messages %}{{ m.content }}{% endfor %}", [], [{}], [1], ["x", "y"], [0, 1],
        {}, {"a": 1}, {"drafter": ["x"]}, {"sinks": 4, "window": 8, "rotary_inv_freq": []}]


def _paths(value, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):  # long lists (TVM params): the first entries are enough
            yield from _paths(v, prefix + (i,))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def mutate(manifest: dict, rng: random.Random) -> tuple[dict, list[str]]:
    """A copy of ``manifest`` with 1-3 random edits, and what they were (for the report)."""
    m = copy.deepcopy(manifest)
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        paths = [p for p, _ in _paths(m) if p]
        # the runtime reads architecture, kv_cache, tokenizer, graphs, speculation and passes: favour them
        hot = [p for p in paths if p[0] in ("architecture", "kv_cache", "tokenizer", "speculation", "format_version")
               or (p[0] == "graphs" and "params" not in p) or (p[0] == "passes" and (len(p) <= 3 or "ffn_skip" in p))]
        path = rng.choice(hot if hot and rng.random() < 0.8 else paths)
        parent, key = _get(m, path[:-1]), path[-1]
        old = parent[key]
        op = rng.random()
        if op < 0.55:
            new = rng.choice(POOL)
            if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.5:
                new = rng.choice([old + 1, old - 1, old * 2, -old, old // 2 if isinstance(old, int) else old / 2,
                                  old * 10**6, 0])
            elif rng.random() < 0.1:  # a value from elsewhere in the manifest
                new = copy.deepcopy(rng.choice([v for _, v in _paths(m)]))
            parent[key] = new
            done.append(f"{_show(path)} = {_short(new)}")
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
            done.append(f"del {_show(path)}")
        elif op < 0.8 and isinstance(parent, list):
            if rng.random() < 0.5:
                del parent[key]
                done.append(f"del {_show(path)}")
            else:
                parent.insert(key, copy.deepcopy(old))
                done.append(f"dup {_show(path)}")
        elif op < 0.9 and isinstance(old, dict):
            k = rng.choice(["a", "window", "layers", "quantization", "drafter", "role", "shapes", "format"])
            old[k] = rng.choice(POOL)
            done.append(f"{_show(path + (k,))} = {_short(old[k])}")
        else:
            parent[key] = None
            done.append(f"{_show(path)} = null")
    return m, done


def _show(path) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 50 else text[:47] + "..."


def trial(bundle: Path, manifest: dict, inspect: bool = True) -> tuple[str, str]:
    """Write ``manifest`` into ``bundle``, ``edgedec inspect`` it, then load, generate and chat:
    ("ok" | "refused" | "crash", detail)."""
    from edgedec.errors import EdgedecError
    from edgedec.runtime import Engine

    (bundle / "manifest.json").write_text(json.dumps(manifest))
    if inspect:  # `edgedec inspect` shows any bundle it accepts: 0, or one line and exit 2
        from typer.testing import CliRunner

        from edgedec.cli import app

        r = CliRunner().invoke(app, ["inspect", "--no-verify", str(bundle)])
        lines = r.stderr.strip().splitlines()
        if r.exit_code not in (0, 2) or (r.exit_code == 2 and (len(lines) != 1 or not lines[0].startswith("error:"))):
            return "crash", f"inspect: exit {r.exit_code}: {r.stderr.strip()[-300:]!r}"
    stage = "load"
    try:
        engine = Engine.load(bundle, threads=1, verify=False)
        stage = "generate"
        engine.generate_text("def f(x):\n    return", max_new_tokens=4)
        stage = "chat"
        if engine.manifest["tokenizer"].get("chat_template"):
            "".join(t.text for t in engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=3))
        return "ok", ""
    except EdgedecError as exc:
        message = str(exc)
        if "\n" in message or not message:
            return "crash", f"{stage}: {type(exc).__name__} over several lines: {message[:300]!r}"
        return "refused", f"{stage}: {message[:200]}"
    except Exception as exc:  # noqa: BLE001 -- exactly what the fuzzer looks for
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return "crash", f"{stage}: {type(exc).__name__}: {str(exc)[:200]} ({Path(tb.filename).name}:{tb.lineno})"


def fuzz(bundles: list[Path], n: int, seed: int = 0, work: Path | None = None, log=None,
         inspect_every: int = 1) -> dict:
    """``n`` trials spread over ``bundles`` (each copied once into ``work``), every ``inspect_every``-th also
    through ``edgedec inspect``; returns the counts and crashes."""
    import logging

    logging.getLogger("edgedec").setLevel(logging.ERROR)  # capped threads, fallbacks: expected under fuzzing
    rng = random.Random(seed)
    work = Path(work or tempfile.mkdtemp(prefix="fuzz-manifest-"))
    copies, originals = [], []
    for i, b in enumerate(bundles):
        dst = work / f"b{i}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(b, dst)
        copies.append(dst)
        originals.append(json.loads((b / "manifest.json").read_text()))
    counts = {"ok": 0, "refused": 0, "crash": 0}
    crashes = []
    for t in range(n):
        i = t % len(copies)
        m, edits = mutate(originals[i], rng)
        outcome, detail = trial(copies[i], m, inspect=t % inspect_every == 0)
        counts[outcome] += 1
        if outcome == "crash":
            crashes.append({"trial": t, "bundle": str(bundles[i]), "edits": edits, "detail": detail})
            if log:
                log(f"CRASH #{t} {bundles[i].name}: {'; '.join(edits)} -> {detail}")
        if log and (t + 1) % 500 == 0:
            log(f"{t + 1}/{n}: {counts}")
    return {"trials": n, **counts, "crashes": crashes}


def build_bundles(out: Path) -> list[Path]:
    """The tiny model as three kinds of bundle (cpu plain, int4 + ngram, int4 cache with a window)."""
    import importlib.util

    from edgedec.compiler.pipeline import CompileOptions, compile_model

    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "benchmarks" / "make_tiny_model.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    hf = maker.make_tiny_model(out / "hf", seed=0, max_positions=256)
    kinds = {"cpu": CompileOptions(), "int4-ngram": CompileOptions(passes=(("int4", {}),), spec="ngram"),
             "window-kv4": CompileOptions(kv="int4", kv_window=32, kv_sinks=4)}
    paths = []
    for name, options in kinds.items():
        compile_model(str(hf), out / name, options)
        paths.append(out / name)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path, action="append", help="bundle to fuzz (repeatable; default: build three)")
    ap.add_argument("--json", type=Path, help="write the counts and crashes as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-manifest-") as tmp:
        bundles = args.bundle or build_bundles(Path(tmp) / "bundles")
        t = time.perf_counter()
        result = fuzz(bundles, args.n, args.seed, Path(tmp) / "work", log=lambda s: print(s, flush=True))
        result["seconds"] = round(time.perf_counter() - t, 1)
    print(f"{result['trials']} trials in {result['seconds']} s: {result['ok']} worked, {result['refused']} refused "
          f"cleanly, {result['crash']} crashed")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["crash"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
