"""The benchmark worker: one fresh process that loads one bundle with the runtime alone and times it.

    python -m edgedec.bench_worker REQUEST.json RESULT.json     # warm-up and timed passes, then exit
    python -m edgedec.bench_worker --serve REQUEST.json          # load, then one pass per command

It imports nothing but the standard library and :mod:`edgedec.runtime` (numpy, onnxruntime,
tokenizers, jinja2) — never torch or transformers — so its peak resident memory is what an app that
embeds the runtime would use for this bundle and workload. :mod:`edgedec.bench` starts it; it is not
a user command.

REQUEST.json::

    {"bundle": "path", "prompts": ["text", {"messages": [{"role": ..., "content": ...}]}, ...],
     "warmup": 1, "runs": 3, "new_tokens": 64, "threads": null, "context": null, "context_tokens": null}

With ``context_tokens`` N each prompt is repeated (as tokens) to exactly N tokens and prefilled, so
the decode steps run over a cache already holding N tokens (decode speed at context N); the cache
capacity is then at least N + new_tokens.

RESULT.json, on success::

    {"threads": 2, "load_s": 0.1, "peak_rss_bytes": 123456789,
     "runs": [[{"prompt_tokens", "new_tokens", "prefill_s", "ttft_s", "decode_s", "stop_reason"}, ...per prompt],
              ...per measured run],
     "speculation": null}

and on an edgedec error ``{"error": "message", "error_type": "BundleError"}`` (exit code 2).
Generation is greedy and ignores end-of-sequence so every run of a prompt makes ``new_tokens`` tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM on Linux, ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux and the BSDs


def _speculation(stats_list) -> dict | None:
    """Speculation figures over the timed passes; None when the bundle ran without a drafter.

    mean_accepted_per_step: draft tokens accepted per verification pass (each pass adds one model token);
    draft_share / model_share: fractions of decode time spent drafting (host) and inside session.run;
    draft_cost: what one draft token cost, in plain decode steps, as the adaptive draft length measured it
    (mean over the prompts; None without the adaptive length or before a plain step was timed).
    """
    if not any(s.drafter for s in stats_list):
        return None
    steps = sum(s.verify_steps for s in stats_list)
    accepted = sum(s.accepted_tokens for s in stats_list)
    decode_s = sum(s.decode_s for s in stats_list) or float("nan")
    costs = [s.draft_cost for s in stats_list if s.draft_cost is not None]
    return {"drafter": stats_list[0].drafter, "verify_steps": steps, "accepted_tokens": accepted,
            "drafted_tokens": sum(s.drafted_tokens for s in stats_list),
            "mean_accepted_per_step": accepted / steps if steps else 0.0,
            "draft_cost": statistics.fmean(costs) if costs else None,
            "draft_share": sum(s.draft_s for s in stats_list) / decode_s,
            "model_share": sum(s.run_s for s in stats_list) / decode_s}


class Session:
    """One loaded bundle and its workload: the unit both modes run passes on."""

    def __init__(self, request: dict):
        from .runtime import Engine
        from .runtime.drafters import spins_with

        t = time.perf_counter()
        fill = request.get("context_tokens")
        context = request.get("context")
        if fill:
            context = max(context or 0, int(fill) + int(request["new_tokens"]) + 1)
        # without a drafter, plain decode at its fastest: a bundle compiled with --spec would otherwise run its
        # single tokens as two rows (exact_rows, ~10% slower), and speculation would be measured against that
        exact_rows = False if request.get("drafter", "auto") is None else None
        trust = request.get("trust")
        if isinstance(trust, dict):
            from .runtime.trust import TrustPolicy

            trust = TrustPolicy.from_dict(trust)
        self.engine = Engine.load(request["bundle"], threads=request.get("threads"), context_length=context,
                                  spin=spins_with(request.get("drafter")), exact_rows=exact_rows, trust=trust)
        self.load_s = time.perf_counter() - t
        self.prompts = [_filled(self.engine, p, int(fill)) for p in request["prompts"]] if fill else request["prompts"]
        self.kwargs = dict(max_new_tokens=int(request["new_tokens"]), ignore_eos=True,
                           drafter=request.get("drafter", "auto"), draft_len=request.get("draft_len"))
        self.runs: list[list[dict]] = []
        self.stats: list = []  # the measured passes' GenerationStats

    def one_pass(self, measured: bool) -> list[dict]:
        """Generate for every prompt once; return the per-prompt figures (kept when ``measured``)."""
        engine, per_prompt = self.engine, []
        engine.forget_drafters()  # every pass starts cold: replayed prompts must not draft from the last pass
        for prompt in self.prompts:
            if isinstance(prompt, dict):
                stream = engine.chat(prompt["messages"], **self.kwargs)
            else:
                stream = engine.generate(prompt, **self.kwargs)
            for _ in stream:
                pass
            s = engine.last_stats
            per_prompt.append({"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "prefill_s": s.prefill_s,
                               "ttft_s": s.ttft_s, "decode_s": s.decode_s, "stop_reason": s.stop_reason,
                               "verify_steps": s.verify_steps, "accepted_tokens": s.accepted_tokens})
            if measured:
                self.stats.append(s)
        if measured:
            self.runs.append(per_prompt)
        return per_prompt

    def result(self) -> dict:
        engine = self.engine
        kv = engine.bundle.manifest["kv_cache"]
        arch = engine.bundle.arch
        per_token = kv.get("bytes_per_token", arch["num_layers"] * 2 * arch["num_kv_heads"] * arch["head_dim"] * 4)
        return {"threads": engine.threads, "load_s": self.load_s, "runs": self.runs,
                "peak_rss_bytes": peak_rss_bytes(), "speculation": _speculation(self.stats),
                "kv_bytes_per_token": int(per_token),
                "kv_cache_bytes": int(getattr(getattr(engine.decoder, "kv", None), "nbytes", 0))}


def run(request: dict) -> dict:
    """Load, run ``warmup`` untimed and ``runs`` timed passes, report."""
    session = Session(request)
    for i in range(int(request["warmup"]) + int(request["runs"])):
        session.one_pass(measured=i >= int(request["warmup"]))
    return session.result()


def serve(request: dict, commands, replies) -> int:
    """Load, then answer commands (one JSON object per line) until ``finish``.

    ``{"cmd": "pass", "measured": bool}`` runs one pass and replies ``{"pass": [...per prompt]}``;
    ``{"cmd": "finish"}`` replies ``{"result": ...}`` (as RESULT.json) and returns. After loading the
    worker replies ``{"ready": true}``; an edgedec error replies ``{"error", "error_type"}`` and returns 2.
    """
    from .errors import EdgedecError

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        session = Session(request)
        reply({"ready": True})
        for line in commands:
            cmd = json.loads(line)
            if cmd.get("cmd") == "pass":
                reply({"pass": session.one_pass(bool(cmd.get("measured")))})
            elif cmd.get("cmd") == "finish":
                reply({"result": session.result()})
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except EdgedecError as exc:
        reply({"error": str(exc), "error_type": type(exc).__name__})
        return 2
    return 0  # the parent closed the pipe: nothing more to do


def _filled(engine, prompt, n: int) -> list[int]:
    """``prompt`` (text or chat) as token ids, repeated to exactly ``n`` tokens."""
    if isinstance(prompt, dict):
        ids = engine.codec.encode(engine.codec.apply_chat_template(prompt["messages"], add_generation_prompt=True),
                                  add_special_tokens=False)
    else:
        ids = engine.codec.encode(prompt)
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def main(argv: list[str] | None = None) -> int:
    from .errors import EdgedecError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--serve":
        with open(argv[1]) as f:
            request = json.load(f)
        replies = os.fdopen(os.dup(1), "w")  # replies on the original stdout; anything else printed goes to stderr
        os.dup2(2, 1)
        return serve(request, sys.stdin, replies)
    if len(argv) != 2:
        print("usage: python -m edgedec.bench_worker REQUEST.json RESULT.json\n"
              "       python -m edgedec.bench_worker --serve REQUEST.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        request = json.load(f)
    try:
        result, code = run(request), 0
    except EdgedecError as exc:
        result, code = {"error": str(exc), "error_type": type(exc).__name__}, 2
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
