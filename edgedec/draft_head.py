"""A trained draft head for self-speculation, with a trimmed vocabulary (VocabTrim).

The verifier already computes, at every position t it runs, the final hidden state ``h_t`` from which
its head picks ``x_{t+1}``. A small head on top of it can guess the token after that, ``x_{t+2}``, in the
same graph run, so the next verification checks two tokens for little more than the price of one
(one forward over 2 tokens costs ~1.09x one token on these CPUs, measured on SmolLM2 int4). The head, in the
spirit of EAGLE/Hydra heads, sees the hidden state and the embedding of the token the verifier chose::

    z = h + W2 · silu(W1 · [h ; emb(x_{t+1})] + b1)          # (hidden,)
    draft = id_map[argmax(z · E_kept^T)]                      # E_kept: K rows of the tied head

Training (``train``): generate text with the target bundle itself (greedy, so the labels are what the
target would produce), run the source model over it for ``h``, and fit W1, b1, W2 with cross-entropy over
the kept vocabulary; the head table stays frozen (it is the model's own).

VocabTrim (``choose_vocab``): the draft only needs the tokens the target actually produces. Keep the K
most frequent tokens of target-generated text (plus every special / chat-template token) and store the
id map; the head's matmul shrinks from V to K columns. K trades coverage (a draft outside the kept set is
never proposed) against draft latency; a Tree-structured Parzen Estimator (optuna) maximises the
expected tokens per unit of time ``(1 + a * coverage(K)) / (1 + c(K))`` subject to a minimum coverage,
where ``a`` is the head's measured top-1 agreement and ``c(K)`` the draft head's FLOPs relative to a
verification step. The verifier's head is never trimmed, so speculation stays lossless.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .errors import ConfigError, ModelError
from .passes.draft_head import DraftHead  # the head and its file format live with the pass that fuses it

log = logging.getLogger(__name__)


def generate_sequences(bundle: str | Path, prompts: list, new_tokens: int, threads: int | None = None,
                       progress=None) -> list[tuple[list[int], int]]:
    """Greedy continuations of ``prompts`` by the bundle: [(prompt + generated ids, prompt length)]."""
    from .runtime import Engine

    engine = Engine.load(bundle, threads=threads)
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, dict):
            ids = engine.encode(engine.codec.apply_chat_template(prompt["messages"], add_generation_prompt=True))
        else:
            ids = engine.encode(prompt)
        gen = [t.id for t in engine.generate(ids, max_new_tokens=new_tokens, ignore_eos=True, drafter=None)]
        out.append((list(ids) + gen, len(ids)))
        if progress:
            progress(i + 1, len(prompts))
    return out


CHAT_TASKS = ("Explain this in simple words: {}", "Summarise in two sentences: {}", "Rewrite more clearly: {}",
              "Write a short Python example about: {}")


def default_prompts(n_topics: int = 48, chat: bool = False) -> list:
    """Openings of Python's own documentation topics (``pydoc_data``) plus edgedec bench's built-in set;
    with ``chat``, each opening also comes as a chat request (explain, summarise, rewrite, write code),
    which is what a chat model mostly generates in use."""
    from pydoc_data.topics import topics

    from .bench import BUILTIN_PROMPTS

    out: list = []
    keys = sorted(topics)[:: max(len(topics) // n_topics, 1)][:n_topics]
    for i, key in enumerate(keys):
        words = " ".join(topics[key].split()[:40])
        out.append(words)
        if chat:
            out.append({"messages": [{"role": "user", "content": CHAT_TASKS[i % len(CHAT_TASKS)].format(words)}]})
    return out + list(BUILTIN_PROMPTS)


def features(model, sequences: list[tuple[list[int], int]]):
    """(hidden, next token, target, sequence index) over the generated positions: h_t, x_{t+1}, x_{t+2}."""
    import torch

    hs, nxt, tgt, seq = [], [], [], []
    with torch.no_grad():
        for i, (ids, n_prompt) in enumerate(sequences):
            x = torch.tensor([ids])
            h = model.model(input_ids=x).last_hidden_state[0]  # (len, hidden), after the final norm
            start = max(n_prompt - 1, 0)  # from the last prompt position on, x_{t+1} is the model's own pick
            idx = torch.arange(start, len(ids) - 2)
            hs.append(h[idx])
            nxt.append(x[0, idx + 1])
            tgt.append(x[0, idx + 2])
            seq.append(torch.full((len(idx),), i))
    return torch.cat(hs), torch.cat(nxt), torch.cat(tgt), torch.cat(seq)


def vocab_order(targets: np.ndarray, vocab_size: int, keep: list[int]) -> np.ndarray:
    """Token ids by descending frequency among ``targets``; ``keep`` (special tokens) first."""
    counts = np.bincount(targets, minlength=vocab_size).astype(np.float64)
    counts[keep] = np.inf
    order = np.argsort(-counts, kind="stable")
    return order


def choose_vocab(order: np.ndarray, heldout_targets: np.ndarray, agreement: float, hidden: int,
                 step_flops: float, min_coverage: float = 0.9, k_max: int | None = None, trials: int = 60,
                 seed: int = 0, utility=None) -> dict:
    """K by TPE (optuna): maximise (1 + agreement * coverage(K)) / (1 + draft_flops(K) / step_flops), or
    ``utility(K, coverage(K))`` when given (a draft model's head: :mod:`edgedec.compiler.draft`)."""
    import optuna

    k_max = min(k_max or len(order), len(order))
    vocab = max(len(order), int(heldout_targets.max()) + 1 if len(heldout_targets) else 0)
    rank = np.full(vocab, vocab, np.int64)  # a token outside ``order`` is never covered
    rank[order] = np.arange(len(order))
    target_rank = np.sort(rank[heldout_targets])

    def coverage(k: int) -> float:
        return float(np.searchsorted(target_rank, k, side="left") / max(len(target_rank), 1))

    def draft_flops(k: int) -> float:
        return 2.0 * (2 * hidden * hidden + hidden * hidden + hidden * k)

    custom = utility

    def utility(k: int) -> float:
        if custom is not None:
            return custom(k, coverage(k))
        return (1 + agreement * coverage(k)) / (1 + draft_flops(k) / step_flops)

    k_min = min(64, k_max)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial):
        k = trial.suggest_int("k", k_min, k_max, log=True)
        cov = coverage(k)
        trial.set_user_attr("coverage", cov)
        return utility(k) if cov >= min_coverage else utility(k) - 1.0  # infeasible: below every feasible K

    study.optimize(objective, n_trials=trials)
    feasible = [t for t in study.trials if t.user_attrs["coverage"] >= min_coverage]
    if not feasible:
        raise ConfigError(f"no vocabulary size up to {k_max} reaches coverage {min_coverage} on the calibration "
                          f"text (best {max(t.user_attrs['coverage'] for t in study.trials):.3f}); lower min_coverage")
    best = max(feasible, key=lambda t: t.value)
    k = int(best.params["k"])
    return {"k": k, "coverage": coverage(k), "utility": utility(k), "utility_full_vocab": utility(len(order)),
            "coverage_full": coverage(k_max), "draft_flops": draft_flops(k),
            "draft_flops_full": draft_flops(len(order)),
            "step_flops": step_flops, "min_coverage": min_coverage, "trials": trials}


def train(model, sequences, special_ids: list[int], k_train: int = 4096, epochs: int = 8, lr: float = 2e-3,
          batch: int = 256, heldout: float = 0.1, seed: int = 0, min_coverage: float = 0.9, trials: int = 60,
          progress=None) -> DraftHead:
    """Fit the draft head on the target's own text; choose K by TPE; return the trimmed head."""
    import torch

    torch.manual_seed(seed)
    h, nxt, tgt, seq = features(model, sequences)
    n = len(tgt)
    if n < 64 or len(sequences) < 2:
        raise ConfigError(f"only {n} training positions in {len(sequences)} sequences: generate more text "
                          "(more prompts or --new-tokens)")
    # held out by sequence, not by position: neighbouring positions of one text are near-duplicates
    every = max(round(1 / heldout), 2) if heldout > 0 else len(sequences) + 1
    is_val = (seq % every) == (every - 1)
    if not is_val.any():
        is_val = seq == seq.max()
    val, tr = torch.nonzero(is_val).flatten(), torch.nonzero(~is_val).flatten()
    n_val = len(val)
    emb = model.get_input_embeddings().weight.detach()  # (V, hidden)
    head_w = model.get_output_embeddings().weight.detach()  # (V, hidden): tied or not, the verifier's head
    vocab, hidden = head_w.shape
    order = vocab_order(tgt[tr].numpy(), vocab, special_ids)
    k_train = min(k_train, vocab)
    kept = torch.from_numpy(order[:k_train].copy())
    remap = torch.full((vocab,), -100, dtype=torch.long)  # target id -> kept row (-100: ignored)
    remap[kept] = torch.arange(k_train)
    table = head_w[kept]  # (k_train, hidden), frozen

    w1 = torch.nn.Linear(2 * hidden, hidden)
    w2 = torch.nn.Linear(hidden, hidden, bias=False)
    torch.nn.init.zeros_(w2.weight)  # start as "the verifier's own head on h": z = h
    params = list(w1.parameters()) + list(w2.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x_in = torch.cat([h, emb[nxt]], dim=1)

    def forward(rows):
        z = h[rows] + w2(torch.nn.functional.silu(w1(x_in[rows])))
        return z @ table.T

    def agreement(rows) -> float:
        with torch.no_grad():
            pred = kept[forward(rows).argmax(-1)]
        return float((pred == tgt[rows]).float().mean())

    before = agreement(val)
    steps = epochs * math.ceil(len(tr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        shuffled = tr[torch.randperm(len(tr))]
        for i in range(0, len(tr), batch):
            rows = shuffled[i:i + batch]
            loss = torch.nn.functional.cross_entropy(forward(rows), remap[tgt[rows]], ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch + 1, epochs)
    after = agreement(val)
    log.info("draft head: top-1 agreement with the target %.3f untrained -> %.3f trained (%d positions)",
             before, after, n)
    params_total = sum(p.numel() for p in model.parameters())
    search = choose_vocab(order, tgt[val].numpy(), after, hidden, step_flops=2.0 * params_total,
                          min_coverage=min_coverage, k_max=k_train, trials=trials, seed=seed)
    k = search["k"]
    with torch.no_grad():
        head = DraftHead(
            w1=w1.weight.T.contiguous().numpy().astype(np.float32),
            b1=w1.bias.numpy().astype(np.float32),
            w2=w2.weight.T.contiguous().numpy().astype(np.float32),
            id_map=order[:k_train].astype(np.int64),
            table=table.numpy().astype(np.float32),
            stats={"positions": int(n), "heldout_positions": int(n_val), "agreement_untrained": before,
                   "agreement": after, "k_train": k_train, "vocab_size": int(vocab), "epochs": epochs,
                   "vocab_trim": search},
        )
    return head.trimmed(k)


def calibrate(bundle: str | Path, model_spec: str | None, output: str | Path, prompts: list, new_tokens: int = 96,
              threads: int | None = None, epochs: int = 8, min_coverage: float = 0.9, trials: int = 60,
              k_train: int = 4096, phase=None) -> DraftHead:
    """``edgedec calibrate draft-head``: generate with ``bundle``, train on its text, save to ``output``."""
    import contextlib

    from .models import source as sources
    from .runtime.bundle import Bundle

    phase = phase or (lambda name: contextlib.nullcontext())
    b = Bundle.open(bundle)
    with phase(f"generating calibration text ({len(prompts)} prompts x {new_tokens} tokens)"):
        seqs = generate_sequences(bundle, prompts, new_tokens, threads)
    with phase("loading the source model"):
        loaded = sources.load(model_spec or b.manifest["source"].get("registry_name") or b.manifest["source"]["path"])
    if loaded.arch.vocab_size != b.arch["vocab_size"] or loaded.arch.hidden_size != b.arch["hidden_size"]:
        raise ModelError("the source model does not match the bundle (vocabulary or hidden size differ)")
    tok = b.manifest.get("tokenizer", {})
    special = sorted({int(i) for i in [tok.get("bos_token_id"), tok.get("pad_token_id"), *tok.get("eos_token_ids", [])]
                      if i is not None} | set(_template_token_ids(b)))
    with phase("training the draft head"):
        head = train(loaded.model, seqs, special, k_train=k_train, epochs=epochs, min_coverage=min_coverage,
                     trials=trials)
    head.save(output)
    return head


def _template_token_ids(b) -> list[int]:
    """Ids of the added special tokens (chat-template markers such as <|im_start|>)."""
    import json

    try:
        data = json.loads(b.file("tokenizer.json").read_text())
    except Exception:
        return []
    return [int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")]
