"""FFN skipping on a real bundle: quality per skip ratio, decode speed, the drafter, and an ORT profile.

Build the bundles first (SmolLM2-135M int4; minutes each):

    edgedec compile -q int4 -o /tmp/ffn/int4
    edgedec calibrate ffn /tmp/ffn/int4 -o /tmp/ffn/stats.json
    edgedec compile -q int4 --pass ffn-skip:ratio=0.25,stats=/tmp/ffn/stats.json -o /tmp/ffn/int4_s25
    edgedec compile -q int4 --pass ffn-skip:ratio=0.3,stats=/tmp/ffn/stats.json,use=draft -o /tmp/ffn/int4_s30d

then

    python benchmarks/ffn_skip.py quality --plain /tmp/ffn/int4 --skip /tmp/ffn/int4_s30d --text heldout.txt
    python benchmarks/ffn_skip.py speed   --plain /tmp/ffn/int4 --skip /tmp/ffn/int4_s25
    python benchmarks/ffn_skip.py draft   --plain /tmp/ffn/int4 --skip /tmp/ffn/int4_s30d
    python benchmarks/ffn_skip.py profile --plain /tmp/ffn/int4 --skip /tmp/ffn/int4_s25

quality: perplexity ratio and greedy agreement against the plain bundle with 10/20/25/30% of the FFN
blocks skipped per decoded token (the skip bundle's controller set to round(ratio x layers) blocks; every
scored token is a decode step, as ``edgedec eval`` does for a skipping bundle). speed: decode tok/s of
the plain bundle, the skip bundle with skipping off (the If overhead) and on, interleaved rounds in one
process, medians and ratios. draft: the ffn-skip drafter vs plain decoding (identical tokens checked).
profile: ONNX Runtime's per-op kernel time per decode step with and without skipping.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

import numpy as np

PROMPTS = [
    "The history of the Roman empire",
    "Write a short story about a lighthouse keeper.",
    "def quicksort(items):",
    "Explain how photosynthesis works in simple terms.",
]


def _chat(engine, prompt):
    return engine.codec.encode(engine.codec.apply_chat_template([{"role": "user", "content": prompt}],
                                                                 add_generation_prompt=True),
                               add_special_tokens=False)


def quality(args):
    from edgedec.evaluate import _nll, _window_logits, read_texts, windows
    from edgedec.runtime import Engine

    ref = Engine.load(args.plain, threads=args.threads, context_length=args.window)
    eng = Engine.load(args.skip, threads=args.threads, context_length=args.window)
    ctl = eng.decoder.ffn_skip
    ids = [i for _, t in read_texts(args.text) for i in eng.codec.encode(t)][: args.max_tokens]
    spans = windows(len(ids), args.window, args.stride)
    ref_rows = [_window_logits(ref, ids[b:e], f - b) for b, e, f in spans]
    targets = [np.asarray(ids[f:e]) for b, e, f in spans]
    ref_nll = sum(float(_nll(r, t).sum()) for r, t in zip(ref_rows, targets))
    n = sum(len(t) for t in targets)
    out = []
    for ratio in args.ratios:
        k = int(round(ratio * ctl.num_layers))
        ctl.enabled = True
        ctl.set_skip(k)
        nll = agree = 0.0
        skipped = steps = 0
        for (b, e, f), r, t in zip(spans, ref_rows, targets):
            rows = _window_logits(eng, ids[b:e], f - b)
            nll += float(_nll(rows, t).sum())
            agree += int((rows.argmax(1) == r.argmax(1)).sum())
            skipped += ctl.blocks_skipped
            steps += ctl.decode_steps
        row = {"target_ratio": ratio, "blocks_per_token": k,
               "measured_skip_ratio": skipped / (steps * ctl.num_layers) if steps else 0.0,
               "perplexity": float(np.exp(nll / n)), "reference_perplexity": float(np.exp(ref_nll / n)),
               "perplexity_ratio": float(np.exp((nll - ref_nll) / n)), "greedy_agreement": agree / n, "tokens": n}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _decode_rate(engine, prompts, new_tokens, **kw):
    rates = []
    for p in prompts:
        toks = [t.id for t in engine.generate(_chat(engine, p), max_new_tokens=new_tokens, ignore_eos=True, **kw)]
        rates.append(engine.last_stats.decode_tok_s)
    return statistics.median(rates), toks


def speed(args):
    from edgedec.runtime import Engine

    plain = Engine.load(args.plain, threads=args.threads)
    skip = Engine.load(args.skip, threads=args.threads)
    ctl = skip.decoder.ffn_skip
    res = collections.defaultdict(list)
    ratios = []
    variants = [("plain", plain, None), ("skip bundle, skipping off", skip, False),
                ("skip bundle, skipping on", skip, True)]
    for r in range(args.rounds):  # interleaved, order rotated: load on a shared machine hits all variants alike
        for name, engine, enabled in variants[r % 3:] + variants[: r % 3]:
            if enabled is not None:
                ctl.enabled = enabled
            res[name].append(_decode_rate(engine, PROMPTS, args.new_tokens, drafter=None)[0])
            if enabled:
                ratios.append(ctl.skip_ratio)
    base = statistics.median(res["plain"])
    for k, v in res.items():
        print(f"{k:28s} median {statistics.median(v):7.1f} tok/s  ({statistics.median(v) / base:.3f}x plain)  "
              f"runs {[round(x, 1) for x in v]}")
    per_round = [round(on / pl, 3) for on, pl in zip(res["skip bundle, skipping on"], res["plain"])]
    print(f"skipping on / plain, per round (same load within a round): {per_round}")
    print(f"measured skip ratio over decode steps (last prompt): {ratios[-1]:.3f}")


def draft(args):
    from edgedec.runtime import Engine

    plain = Engine.load(args.plain, threads=args.threads)
    skip = Engine.load(args.skip, threads=args.threads)
    rows = collections.defaultdict(list)
    same = collections.Counter()
    for _ in range(args.rounds):
        for p in PROMPTS:
            ids = _chat(plain, p)
            want = [t.id for t in plain.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True, drafter=None)]
            rows["plain"].append(plain.last_stats.decode_tok_s)
            # control: a drafter that costs nothing, on the plain bundle (same verification path)
            ctrl = [t.id for t in plain.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True,
                                                 drafter="ngram")]
            same["ngram drafter (control)"] += ctrl == want
            for name, kw in (("ffn-skip drafter, adaptive", {}), ("ffn-skip drafter, k=3 fixed",
                                                                  {"draft_len": 3, "adaptive_draft": False})):
                got = [t.id for t in skip.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True,
                                                   drafter="ffn-skip", **kw)]
                same[name] += got == want
                st = skip.last_stats
                rows[name].append(st.decode_tok_s)
                rows[name + " accepted/verify"].append(st.mean_accepted_per_step)
                rows[name + " acceptance"].append(st.accepted_tokens / st.drafted_tokens if st.drafted_tokens else 0)
    base = statistics.median(rows["plain"])
    for k, v in rows.items():
        m = statistics.median(v)
        print(f"{k:42s} median {m:7.3f}" + (f"  ({m / base:.3f}x plain tok/s)" if "accept" not in k else ""))
    total = args.rounds * len(PROMPTS)
    for k, v in same.items():  # int4 kernels give slightly different logits for 1 vs several tokens per run
        print(f"{k:42s} identical to plain greedy decoding on {v}/{total} generations")


def profile(args):
    import onnxruntime as ort

    from edgedec.runtime import Engine

    base_opts = ort.SessionOptions

    class Profiled(base_opts):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = "/tmp/ffn_skip_profile"

    def run(path, enabled):
        ort.SessionOptions = Profiled
        try:
            eng = Engine.load(path, threads=args.threads)
        finally:
            ort.SessionOptions = base_opts
        if eng.decoder.ffn_skip is not None:
            eng.decoder.ffn_skip.enabled = enabled
        for p in PROMPTS[:2]:
            list(eng.generate(_chat(eng, p), max_new_tokens=args.new_tokens, ignore_eos=True, drafter=None))
        f = eng.decoder.session.end_profiling()
        ev = json.load(open(f))
        os.remove(f)
        runs = sorted((x for x in ev if x.get("name") == "model_run"), key=lambda x: x["ts"])
        med = np.median([r["dur"] for r in runs])
        decode = [r for r in runs if r["dur"] < 4 * med]  # one-token steps, not the prompt passes
        starts = np.array([r["ts"] for r in decode])
        agg, nodes = collections.Counter(), collections.Counter()
        for x in ev:
            if x.get("cat") == "Node" and x["name"].endswith("_kernel_time"):
                i = np.searchsorted(starts, x["ts"], side="right") - 1
                if i >= 0 and x["ts"] <= decode[i]["ts"] + decode[i]["dur"]:
                    agg[x["args"].get("op_name")] += x["dur"]
                    nodes[x["args"].get("op_name")] += 1
        n = len(decode)
        print(f"== {path} skipping {'on' if enabled else 'off'}: {n} decode steps; model_run median "
              f"{np.median([r['dur'] for r in decode]) / 1e3:.2f} ms; "
              f"kernel time/step {sum(agg.values()) / n / 1e3:.2f} ms;"
              f" kernels launched/step {sum(nodes.values()) / n:.1f} (If counts its branch's kernels too)")
        for op, d in agg.most_common(8):
            print(f"   {op:32s} {d / n:8.0f} us/step  {nodes[op] / n:6.1f} launches/step")

    run(args.plain, False)
    run(args.skip, False)
    run(args.skip, True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["quality", "speed", "draft", "profile"])
    ap.add_argument("--plain", required=True, help="bundle without ffn-skip (the reference)")
    ap.add_argument("--skip", required=True, help="bundle built with the ffn-skip pass")
    ap.add_argument("--text", action="append", default=[], help="held-out text (quality)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.25, 0.3])
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    {"quality": quality, "speed": speed, "draft": draft, "profile": profile}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
