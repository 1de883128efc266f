"""edgedec beside llama.cpp on the same GGUF, the same prompts, the same machine, in one interleaved run.

    pip install -e ".[peers]"     # llama-cpp-python, built from source (minutes; kept out of CI)
    python benchmarks/peers.py --gguf Qwen2.5-Coder-1.5B-Instruct \\
        --bundle /path/to/bundle [--bundle-plain /path/to/bundle] [--json peers.json]

Engines, each run greedy for ``--new-tokens`` tokens per prompt (end-of-sequence ignored, so every engine does
the same work) on ``--threads`` threads:

- ``llama.cpp``: llama-cpp-python's ``Llama.generate`` on the GGUF, plain decoding: the base of every ratio;
- ``llama.cpp lookup(N)``: the same with its prompt-lookup drafting (``LlamaPromptLookupDecoding``,
  ``max_ngram_size=2``, ``num_pred_tokens=N``; one engine per ``--lookup N``; ``--lookup 0`` for none);
- each ``--bundle``: an edgedec bundle as it runs by default (speculating if it was compiled with ``--spec``),
  and each ``--bundle-plain``: a bundle with speculation off, both in edgedec's runtime-only benchmark worker.

A round runs one pass over all prompts of every engine in turn (the first engine rotates), so slow and fast
moments of a shared machine fall on every engine alike; ``--rounds`` rounds are timed after ``--warmup``.
Decode speed of one generation is (tokens - 1) / (time from the first token to the last), as ``edgedec bench``
counts it: the first token comes out of the prompt's pass. Per prompt the median over rounds; per category and
overall the median over prompts; a ratio is the median over prompts of engine / llama.cpp on that prompt.
llama.cpp with lookup must produce llama.cpp's tokens (greedy is lossless): the report counts the prompts
where it does.

Prompts: ``--prompts`` (default ``benchmarks/prompts/code_mixed.jsonl``: writing, editing and explaining code,
``"category"`` per line). ``--gguf`` takes a path or a registry name (``edgedec models pull`` fetches it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's edgedec, when run from a source tree

BASE = "llama.cpp"


class LlamaCppEngine:
    """llama-cpp-python on one GGUF; ``lookup`` tokens drafted by prompt lookup, or plain decoding."""

    def __init__(self, gguf: Path, prompts: list, threads: int, new_tokens: int, lookup: int = 0,
                 extra_bufts: bool = True):
        import llama_cpp.llama_cpp as low
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.name = f"{BASE} lookup({lookup})" if lookup else BASE
        self.new_tokens = new_tokens
        t = time.perf_counter()
        probe = Llama(str(gguf), n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False,
                      vocab_only=True)
        special = {k: probe.detokenize([t]).decode(errors="replace") if t >= 0 else ""
                   for k, t in (("eos", probe.token_eos()), ("bos", probe.token_bos()))}
        fmt = Jinja2ChatFormatter(probe.metadata["tokenizer.chat_template"], eos_token=special["eos"],
                                  bos_token=special["bos"])
        self.prompts = []
        for p in prompts:
            text = fmt(messages=p["messages"]).prompt if isinstance(p, dict) else p
            self.prompts.append(probe.tokenize(text.encode(), add_bos=False, special=True))
        del probe
        n_ctx = (max(len(ids) for ids in self.prompts) + new_tokens + 32 + 255) // 256 * 256
        draft = LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=lookup) if lookup else None
        defaults = low.llama_model_default_params
        if not extra_bufts:  # Llama() takes no such argument: its model parameters start from these defaults
            def without_extra_bufts():
                params = defaults()
                params.use_extra_bufts = False
                return params

            low.llama_model_default_params = without_extra_bufts
        try:
            self.llm = Llama(str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                             draft_model=draft, verbose=False)
        finally:
            low.llama_model_default_params = defaults
        self.extra_bufts = extra_bufts
        self.load_s = time.perf_counter() - t
        self.outputs: list[list[int]] = []  # the last pass's tokens per prompt

    def one_pass(self, measured: bool) -> list[dict]:
        per_prompt, self.outputs = [], []
        for ids in self.prompts:
            self.llm.reset()  # no prefix reuse from the last pass: every prompt is prefilled in full
            t0 = time.perf_counter()
            out: list[int] = []
            t_first = t0
            for tok in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                out.append(tok)
                if len(out) == 1:
                    t_first = time.perf_counter()
                if len(out) == self.new_tokens:
                    break
            t_end = time.perf_counter()
            self.outputs.append(out)
            per_prompt.append({"prompt_tokens": len(ids), "new_tokens": len(out), "prefill_s": t_first - t0,
                               "decode_s": t_end - t_first})
        return per_prompt

    def info(self) -> dict:
        import llama_cpp

        return {"engine": "llama-cpp-python", "version": llama_cpp.__version__, "load_s": self.load_s,
                "extra_buffer_types": self.extra_bufts, "system_info": llama_cpp.llama_print_system_info().decode()}

    def close(self) -> None:
        self.llm.close()


class EdgedecEngine:
    """An edgedec bundle in the runtime-only benchmark worker (``edgedec.bench.Worker``)."""

    def __init__(self, bundle: Path, prompts: list, threads: int, new_tokens: int, spec: bool):
        from edgedec.bench import Worker

        self.name = f"edgedec {bundle.name}" + ("" if spec else " (no spec)")
        t = time.perf_counter()
        self.worker = Worker({"bundle": str(bundle), "prompts": prompts, "warmup": 0, "runs": 0,
                              "new_tokens": new_tokens, "threads": threads, "context": None,
                              "context_tokens": None, "drafter": "auto" if spec else None, "draft_len": None})
        self.load_s = time.perf_counter() - t
        self.result: dict | None = None

    def one_pass(self, measured: bool) -> list[dict]:
        return self.worker.one_pass(measured)

    def info(self) -> dict:
        r = self.result or {}
        return {"engine": "edgedec", "load_s": self.load_s, "speculation": r.get("speculation"),
                "peak_rss_mb": r.get("peak_rss_bytes", 0) / 1e6}

    def close(self) -> None:
        if self.result is None:
            self.result = self.worker.finish()
        self.worker.close()


def _err(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(names: list[str], categories: list[str], tok_s: dict[str, list[list[float]]]) -> dict:
    """Per prompt (median over rounds), per category and overall (medians over prompts), ratios vs BASE."""
    per_prompt = {n: [_median(r) for r in tok_s[n]] for n in names}
    cats = sorted(set(categories), key=categories.index)
    out = {}
    for n in names:
        ratio = [a / b for a, b in zip(per_prompt[n], per_prompt[BASE])]
        out[n] = {"median_tok_s": _median(per_prompt[n]), "ratio": _median(ratio),
                  "categories": {c: {"median_tok_s": _median([v for v, k in zip(per_prompt[n], categories) if k == c]),
                                     "ratio": _median([v for v, k in zip(ratio, categories) if k == c])}
                                 for c in cats},
                  "per_prompt_tok_s": per_prompt[n]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--gguf", required=True, help="GGUF file, or a registry name (edgedec models list)")
    ap.add_argument("--bundle", action="append", default=[], type=Path, help="edgedec bundle (its default drafter)")
    ap.add_argument("--bundle-plain", action="append", default=[], type=Path,
                    help="edgedec bundle with speculation off")
    ap.add_argument("--lookup", action="append", type=int, default=None,
                    help="llama.cpp prompt-lookup draft length (repeatable; 0: none; default 2, llama-cpp-python's "
                         "advice for CPUs)")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="llama.cpp without its extra buffer types (AMX, weight repacking), for a build whose AMX "
                         "kernels fault on this CPU (SIGILL)")
    ap.add_argument("--prompts", type=Path, default=HERE / "prompts" / "code_mixed.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--new-tokens", "-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (one pass of every engine each)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    ap.add_argument("--json", help="write the report here (- for stdout)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from edgedec.bench import load_prompt_set
    from edgedec.errors import EdgedecError

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("error: llama-cpp-python is not installed (pip install -e '.[peers]')", file=sys.stderr)
        return 2
    try:
        gguf = Path(args.gguf)
        if not gguf.is_file():
            from edgedec.models import source

            gguf = source.resolve(args.gguf)[1]
        prompts, categories = load_prompt_set(args.prompts)
        categories = categories or ["all"] * len(prompts)
        if args.limit:
            prompts, categories = prompts[: args.limit], categories[: args.limit]
        lookups = [n for n in (args.lookup if args.lookup is not None else [2]) if n > 0]
        extra = not args.no_extra_bufts
        engines = [LlamaCppEngine(gguf, prompts, args.threads, args.new_tokens, extra_bufts=extra)]
        engines += [LlamaCppEngine(gguf, prompts, args.threads, args.new_tokens, lookup=n, extra_bufts=extra)
                    for n in lookups]
        engines += [EdgedecEngine(b, prompts, args.threads, args.new_tokens, spec=True) for b in args.bundle]
        engines += [EdgedecEngine(b, prompts, args.threads, args.new_tokens, spec=False) for b in args.bundle_plain]
        names = [e.name for e in engines]
        tok_s = {n: [[] for _ in prompts] for n in names}
        prompt_tokens = {}
        same_as_base = {n: [] for n in names if n.startswith(f"{BASE} lookup")}
        t_run = time.perf_counter()
        for r in range(args.warmup + args.rounds):
            measured = r >= args.warmup
            base_out = None
            for k in range(len(engines)):
                e = engines[(r + k) % len(engines)]
                t = time.perf_counter()
                figures = e.one_pass(measured)
                _err(f"round {r + 1}/{args.warmup + args.rounds}{'' if measured else ' (warm-up)'}: {e.name}: "
                    f"{time.perf_counter() - t:.0f}s")
                prompt_tokens[e.name] = [f["prompt_tokens"] for f in figures]
                if measured:
                    for i, f in enumerate(figures):
                        tok_s[e.name][i].append((f["new_tokens"] - 1) / f["decode_s"])
                if e.name == BASE:
                    base_out = e.outputs
            for e in engines:  # greedy with prompt lookup must give plain greedy's tokens
                if e.name in same_as_base and base_out is not None:
                    same_as_base[e.name].append(sum(a == b for a, b in zip(e.outputs, base_out)))
        for e in engines:
            e.close()
    except EdgedecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarise(names, categories, tok_s)
    report = {
        "edgedec_peers": 1,
        "settings": {"gguf": str(gguf), "prompts": str(args.prompts), "n_prompts": len(prompts),
                     "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds,
                     "warmup": args.warmup, "seconds": time.perf_counter() - t_run},
        "categories": categories,
        "engines": [{"name": e.name, **e.info(), "prompt_tokens": prompt_tokens.get(e.name),
                     "same_tokens_as_llama_cpp": ({"prompts": len(prompts), "per_round": same_as_base[e.name]}
                                                  if e.name in same_as_base else None),
                     "tok_s_per_round": tok_s[e.name], **summary[e.name]} for e in engines],
    }
    _print(report)
    if args.json:
        text = json.dumps(report, indent=1)
        if args.json == "-":
            print(text)
        else:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(args.json)
    return 0


def _print(report: dict) -> None:
    """Decode tokens/s per prompt, per category, overall, and the ratios to llama.cpp plain (on stderr)."""
    engines, cats = report["engines"], report["categories"]
    w = max(12, *(len(e["name"]) for e in engines))
    p = _err
    s = report["settings"]
    p(f"decode tokens/s: {s['n_prompts']} prompts x {s['new_tokens']} tokens, {s['threads']} threads, "
      f"{s['rounds']} rounds (median), greedy; ratios: engine / {BASE} per prompt, median; {s['gguf']}")
    p(f"{'prompt':<16}" + "".join(f"{e['name']:>{w + 2}}" for e in engines))
    for i, c in enumerate(cats):
        p(f"{i + 1:>2} {c:<13}" + "".join(f"{e['per_prompt_tok_s'][i]:>{w + 2}.1f}" for e in engines))
    for c in sorted(set(cats), key=cats.index):
        p(f"median {c:<9}" + "".join(f"{e['categories'][c]['median_tok_s']:>{w + 2}.1f}" for e in engines))
    p(f"{'median all':<16}" + "".join(f"{e['median_tok_s']:>{w + 2}.1f}" for e in engines))
    for c in sorted(set(cats), key=cats.index):
        p(f"ratio {c}"[:16].ljust(16) + "".join(f"{e['categories'][c]['ratio']:>{w + 2}.2f}" for e in engines))
    p(f"{'ratio all':<16}" + "".join(f"{e['ratio']:>{w + 2}.2f}" for e in engines))
    differ = len({tuple(e["prompt_tokens"]) for e in engines if e["prompt_tokens"]}) > 1
    for e in engines:
        if differ:
            p(f"{e['name']}: prompt tokens {e['prompt_tokens']} (the engines tokenized differently)")
        if e["same_tokens_as_llama_cpp"]:
            p(f"{e['name']}: same tokens as {BASE} on {e['same_tokens_as_llama_cpp']['per_round']} of "
              f"{e['same_tokens_as_llama_cpp']['prompts']} prompts (per round)")
        if e.get("speculation"):
            sp = e["speculation"]
            p(f"{e['name']}: {sp['drafter']}, {sp['mean_accepted_per_step']:.2f} drafts accepted per verification")


if __name__ == "__main__":
    sys.exit(main())
