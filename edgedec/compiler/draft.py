"""``compile --spec model:DRAFT``: a draft model built into the target's bundle, in ``draft/``.

The draft is a bundle of its own (compiled from DRAFT, a model source, with the target's options; or an
existing draft bundle directory, copied in as it is) inside the target's directory, so the pair ships,
hashes and loads as one: the target's manifest lists the draft's files (``draft/decoder.so``,
``draft/manifest.json``, ...) with their hashes, and its ``speculation`` entry names the draft relative to
the bundle (``model:draft``), which the runtime resolves inside the bundle and nowhere else. The draft
must share the target's tokenizer (same vocabulary size and tokenizer.json, or the same vocabulary,
merges and added tokens); anything else is refused in one line, since its token ids would mean other
tokens.

**Built for drafting (VocabTrim).** A draft only changes how many drafts are accepted, never the output,
so on the TVM targets its LM head keeps only the K tokens the target actually writes: the staged target
generates text on calibration prompts, its tokens are ranked by frequency (special tokens first, then the
rest of the vocabulary by id, BPE's own rough frequency order), and K is chosen by the same TPE search as
the draft head's (:func:`edgedec.draft_head.choose_vocab`), maximising tokens per unit of decode cost::

    a = ALPHA * coverage(K)                       (a draft outside the kept tokens is never right)
    tokens per round = (1 - a^(k+1)) / (1 - a)    k = the draft length
    cost = k * draft_bytes(K) / target_bytes + 1 + VERIFY_SLOPE * k      (in target steps)

subject to a coverage of at least ``MIN_COVERAGE`` of held-out target text. The draft's head then has K
rows (``architecture.head_rows``; logits of the kept tokens only) and ``head_ids.bin`` (int32, K) maps a
row to its token id; its embedding keeps the whole vocabulary, so it reads any token the target verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..models.arch import ArchFacts
from ..runtime.bundle import MANIFEST, Bundle, sha256_file
from ..runtime.drafters import DRAFT_DIR, split_model, tokenizer_mismatch
from . import bundle_writer

log = logging.getLogger(__name__)

ALPHA = 0.88  # prior chance that the draft's greedy token is the target's (Qwen2.5-Coder 0.5B vs 1.5B, code)
VERIFY_SLOPE = 0.2  # prior cost of each extra verified row, in target steps
DRAFT_LEN = 4  # the draft length the search assumes
MIN_COVERAGE = 0.97  # the kept tokens must cover this much of the target's held-out text
CALIBRATION_TOKENS = 64  # generated per calibration prompt
HEAD_IDS = "head_ids.bin"


@dataclasses.dataclass(frozen=True)
class DraftArch(ArchFacts):
    """A draft model's architecture: its LM head may keep fewer rows than the vocabulary (VocabTrim)."""

    head_rows: int | None = None  # rows of the LM head (None: the vocabulary)


def is_model_spec(spec: str | None) -> bool:
    """Whether ``--spec`` names a draft model (``model:DRAFT`` or ``ngram+model:DRAFT``)."""
    return bool(spec) and split_model(spec) is not None


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def check_source(spec: str) -> None:
    """Refuse, before any work, a DRAFT that is neither a bundle nor a model source edgedec can find."""
    from ..models import registry

    _, source = split_model(spec)
    path = Path(source).expanduser()
    if _is_bundle(path):
        Bundle.open(path, verify_hashes=False)  # structure and sizes now; hashes when it is copied in
        return
    if path.is_dir() and (path / "config.json").is_file():
        return
    if path.is_file() and path.suffix.lower() == ".gguf":
        return
    if not path.exists() and registry.lookup(source) is not None:
        return
    raise ConfigError(f"--spec model:{source}: not a draft bundle, Hugging Face directory, .gguf file or "
                      "registry model")


def attach_draft(staging: Path, manifest: dict, options, phase: Callable[[str], contextlib.AbstractContextManager]
                 ) -> dict:
    """Put the draft bundle into ``staging / draft`` (the target's bundle, written but not published),
    point the target's ``speculation`` at it and rewrite the target's manifest (hashing the draft's
    files with the rest). Returns the new manifest."""
    prefix, source = split_model(options.spec)
    dest = staging / DRAFT_DIR
    path = Path(source).expanduser()
    target = Bundle(staging, manifest)
    if _is_bundle(path):
        with phase(f"copying the draft bundle {path.name}"):
            draft = Bundle.open(path)  # every hash: what is copied is what its manifest describes
            _check_tokenizer(draft, target, source)
            shutil.copytree(path, dest)
        how = "copied"
    else:
        compile_draft(source, dest, staging, dataclasses.replace(options, spec=None, force=False),
                      lambda name: phase("draft: " + name))
        how = "compiled"
    draft = Bundle.open(dest, verify_hashes=False)
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    body["speculation"] = {
        "drafter": f"{prefix}model:{DRAFT_DIR}", "draft_len": options.draft_len,
        "draft": {"path": DRAFT_DIR, "how": how, "source": draft.manifest.get("source", {}),
                  "target": draft.manifest["target"].get("name"),
                  "head_rows": draft.arch.get("head_rows") or draft.arch["vocab_size"],
                  **({"vocab_trim": draft.manifest["draft_head"]["vocab_trim"]} if "draft_head" in draft.manifest
                     else {})}}
    with phase("hashing the bundle with its draft"):
        return bundle_writer.write_manifest(staging, body)


def compile_draft(model: str, output: Path, target_bundle: Path, options,
                  phase: Callable[[str], contextlib.AbstractContextManager]) -> dict:
    """Compile ``model`` as a draft for the bundle at ``target_bundle`` (``compile --draft-for``, and
    ``--spec model:DRAFT`` on the staged target): its tokenizer is checked against the target's as soon as
    it is loaded, and on the TVM targets its head is vocabulary-trimmed to the target's text (VocabTrim;
    ``options.draft_vocab``). Returns the draft's manifest."""
    from ..targets import get_target
    from .pipeline import compile_model

    target = Bundle.open(target_bundle, verify_hashes=False)
    trim = None
    if options.draft_vocab != "full" and get_target(options.target).backend == "tvm":
        trim = VocabTrim.calibrate(target_bundle, options.draft_vocab, phase)
    elif options.draft_vocab not in ("auto", "full"):
        raise ConfigError(f"--draft-vocab {options.draft_vocab}: a trimmed draft head needs a TVM target "
                          f"(cpu-tvm, arm64), not {options.target}")

    def prepare(loaded, staging: Path) -> dict:
        tok = staging / "tokenizer.json"
        tok.write_text(loaded.tokenizer_json)
        # a staged bundle's view: Bundle.file() hands out only files the manifest hashes
        staged = Bundle(staging, {"architecture": loaded.arch.to_dict(), "tokenizer": {"file": "tokenizer.json"},
                                  "files": {"tokenizer.json": {"bytes": tok.stat().st_size,
                                                               "sha256": sha256_file(tok)}}})
        _check_tokenizer(staged, target, model)
        return trim.prepare(loaded, staging) if trim is not None else {}

    return compile_model(model, output, dataclasses.replace(options, spec=None), phase=phase, prepare=prepare)


def _check_tokenizer(draft, target, source: str) -> None:
    why = tokenizer_mismatch(draft, target)
    if why:
        raise ConfigError(f"the draft model {source} does not share the target's tokenizer ({why}): a draft's "
                          "token ids must mean the target's tokens")


# ------------------------------------------------------------------------------------------------
def step_bytes(arch, head_rows: int | None = None) -> float:
    """Weight bytes one decode step reads with ``-q int4`` on the TVM targets: 4-bit projections and an
    8-bit head, each with a float16 scale and offset per 32 weights (the embedding reads one row)."""
    a = arch
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_layer = a.hidden_size * (2 * q + 2 * kv) + 3 * a.hidden_size * a.intermediate_size
    return a.num_layers * per_layer * (0.5 + 4 / 32) + (head_rows or a.vocab_size) * a.hidden_size * (1 + 4 / 32)


@dataclasses.dataclass
class VocabTrim:
    """What the calibration learned from the staged target: its token order and held-out text."""

    order: np.ndarray  # (vocab,) token ids, most useful first
    heldout: np.ndarray  # target-generated token ids not used for the order
    target_bytes: float  # what a target step reads
    k: int | None  # a fixed K (``--draft-vocab K``), or None: TPE
    stats: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def calibrate(cls, staging: Path, setting: str, phase) -> VocabTrim:
        from ..draft_head import default_prompts
        from ..runtime import Engine

        engine = Engine.load(staging, trust=True)  # the target this compile just built
        target, arch = engine.bundle, engine.bundle.arch
        prompts = default_prompts(n_topics=12, chat=True)
        seqs = []
        with phase(f"generating the target's text for VocabTrim ({len(prompts)} prompts x {CALIBRATION_TOKENS})"):
            for prompt in prompts:
                text = prompt if isinstance(prompt, str) else engine.codec.apply_chat_template(
                    prompt["messages"], add_generation_prompt=True)
                ids = engine.codec.encode(text)[: engine.context_length // 2]  # a small context: the prompt's start
                new = min(CALIBRATION_TOKENS, engine.context_length - len(ids) - 1)
                gen = [t.id for t in engine.generate(ids, max_new_tokens=new, ignore_eos=True, drafter=None)]
                seqs.append((list(ids) + gen, len(ids)))
        del engine
        every = 5  # one sequence in five is held out
        fit = np.concatenate([ids[n:] for i, (ids, n) in enumerate(seqs) if i % every != every - 1]).astype(np.int64)
        held = np.concatenate([ids[n:] for i, (ids, n) in enumerate(seqs) if i % every == every - 1]).astype(np.int64)
        tok = target.manifest["tokenizer"]
        special = {int(i) for i in [tok.get("bos_token_id"), tok.get("pad_token_id"), *(tok.get("eos_token_ids") or [])]
                   if i is not None}
        vocab = arch["vocab_size"]
        counts = np.bincount(fit, minlength=vocab).astype(np.float64)
        counts[sorted(special)] = np.inf
        order = np.argsort(-counts, kind="stable")  # by count, then by id (BPE's merge order) among the unseen
        facts = ArchFacts(**{f.name: arch[f.name] for f in dataclasses.fields(ArchFacts)})
        k = None if setting == "auto" else int(setting)
        return cls(order, held, step_bytes(facts), k, {"calibration_tokens": int(len(fit) + len(held)),
                                                       "heldout_tokens": len(held)})

    def choose(self, arch) -> tuple[int, dict]:
        """K (a multiple of 32, the kernels' group of outputs) and the search's figures."""
        from ..draft_head import choose_vocab

        vocab = arch.vocab_size
        rank = np.empty(vocab, np.int64)
        rank[self.order] = np.arange(vocab)
        held_rank = np.sort(rank[self.heldout])
        coverage = lambda k: float(np.searchsorted(held_rank, k) / max(len(held_rank), 1))
        cost = lambda k: step_bytes(arch, k) / self.target_bytes

        def utility(k: int, cov: float) -> float:
            a = min(ALPHA * cov, 0.999)
            return (1 - a ** (DRAFT_LEN + 1)) / (1 - a) / (DRAFT_LEN * cost(k) + 1 + VERIFY_SLOPE * DRAFT_LEN)

        if self.k is not None:
            k = self.k
            search = {"k": k, "coverage": coverage(k), "utility": utility(k, coverage(k)), "chosen_by": "--draft-vocab"}
        else:
            search = choose_vocab(self.order, self.heldout, ALPHA, arch.hidden_size, 1.0, min_coverage=MIN_COVERAGE,
                                  trials=60, utility=utility)
            search["chosen_by"] = "TPE"
            for key in ("draft_flops", "draft_flops_full", "step_flops"):  # the draft head's cost model, not used
                search.pop(key, None)
        k = min(vocab, -(-int(search["k"]) // 32) * 32)
        search.update(k=k, coverage=coverage(k), utility=utility(k, coverage(k)),
                      utility_full_vocab=utility(vocab, 1.0), draft_cost=cost(k), draft_cost_full=cost(vocab),
                      alpha_prior=ALPHA, draft_len=DRAFT_LEN, verify_slope=VERIFY_SLOPE, **self.stats)
        return k, search

    def prepare(self, loaded, staging: Path) -> dict:
        """The draft compile's hook: trim the loaded model's head to the chosen K and write head_ids.bin."""
        import torch

        arch = loaded.arch
        if not 32 <= (self.k or 32) <= arch.vocab_size or (self.k or 32) % 32:
            raise ConfigError(f"--draft-vocab must be a multiple of 32 in [32, {arch.vocab_size}], got {self.k}")
        k, search = self.choose(arch)
        ids = np.ascontiguousarray(self.order[:k], dtype="<i4")
        model = loaded.model
        with torch.no_grad():
            rows = model.get_output_embeddings().weight[torch.from_numpy(ids.astype(np.int64))].clone()
            head = torch.nn.Linear(arch.hidden_size, k, bias=False)
            head.weight.copy_(rows)
        model.lm_head = head
        model.config.tie_word_embeddings = False
        loaded.arch = DraftArch(**{**arch.to_dict(), "tie_word_embeddings": False}, head_rows=k)
        ids.tofile(staging / HEAD_IDS)
        log.info("VocabTrim: K = %d of %d tokens, coverage %.3f of the target's held-out text", k, arch.vocab_size,
                 search["coverage"])
        return {"draft_head": {"file": HEAD_IDS, "dtype": "int32", "rows": k,
                               "note": "the LM head's rows are these token ids (VocabTrim): logits row i is "
                                       "token head_ids[i]; only a draft model's head is trimmed",
                               "vocab_trim": search}}
