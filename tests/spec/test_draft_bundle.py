"""``compile --spec model:DRAFT``: one bundle holding the target and its draft model (in ``draft/``).

A tiny seeded Qwen2 pair with one tokenizer: the target has three layers, its last one weak (its output
projections scaled down), and the draft is the target's first two layers, so the draft agrees with the
target on most tokens but not all. Through the combined bundle speculation must be lossless, make and
accept drafts, turn off with ``--no-spec`` (same tokens), and the draft's files must be hashed in the
target's manifest.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edgedec.runtime import Engine

PROMPTS = ["def fibonacci(n):\n    return", "The quick brown fox jumps over the lazy dog. The quick",
           "Once upon a time", "class Point:\n    def __init__(self, x, y):"]


def _qwen2_pair(base, src):
    """(target dir, draft dir) from the tiny Qwen2 at ``src``: target = 3 layers (the third weak), draft =
    the target's first 2 layers; both with ``src``'s tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    src_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = src_model.config.to_dict()
    dirs = {}
    for name, layers in (("target", 3), ("draft", 2)):
        c = {k: v for k, v in cfg.items() if k not in ("layer_types", "architectures")}
        torch.manual_seed(7)  # the same weights for the layers both have
        model = Qwen2ForCausalLM(Qwen2Config(**{**c, "num_hidden_layers": 3}))
        model.load_state_dict(src_model.state_dict(), strict=False)  # layers 0-1, embedding, head, norm
        with torch.no_grad():
            last = model.model.layers[2]
            for proj in (last.self_attn.q_proj, last.self_attn.k_proj, last.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
            last.self_attn.o_proj.weight.mul_(0.15)
            last.mlp.down_proj.weight.mul_(0.15)
        if layers < 3:
            model.model.layers = model.model.layers[:layers]
            model.config = Qwen2Config(**{**c, "num_hidden_layers": layers})
        out = base / name
        model.eval().save_pretrained(out, safe_serialization=True)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
                shutil.copy(f, out / f.name)
        dirs[name] = out
    return dirs["target"], dirs["draft"]


@pytest.fixture(scope="module")
def pair(tiny_qwen2_dir, tmp_path_factory):
    return _qwen2_pair(tmp_path_factory.mktemp("pair"), tiny_qwen2_dir)


@pytest.fixture(scope="module", params=["cpu", "cpu-tvm"])
def combined(request, pair, tmp_path_factory):
    """The target compiled with --spec model:DRAFT (the draft's model directory), for ``target``."""
    from typer.testing import CliRunner

    from edgedec.cli import app

    if request.param == "cpu-tvm":
        pytest.importorskip("tvm")
    target_dir, draft_dir = pair
    out = tmp_path_factory.mktemp(f"combined-{request.param}") / "bundle"
    r = CliRunner().invoke(app, ["compile", str(target_dir), "-o", str(out), "--target", request.param,
                                 "--spec", f"model:{draft_dir}", "--draft-len", "4"])
    assert r.exit_code == 0, r.stderr
    return request.param, out


def _tokens(engine, prompt, **kw):
    return [t.id for t in engine.generate(prompt, max_new_tokens=40, ignore_eos=True, **kw)]


def test_the_manifest_names_the_draft_inside_the_bundle_and_hashes_its_files(combined):
    from edgedec.runtime.bundle import sha256_file

    kind, bundle = combined
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["speculation"]
    assert spec["drafter"] == "model:draft" and spec["draft_len"] == 4 and spec["draft"]["how"] == "compiled"
    draft_files = json.loads((bundle / "draft" / "manifest.json").read_text())["files"]
    listed = {n.removeprefix("draft/"): f for n, f in manifest["files"].items() if n.startswith("draft/")}
    signed = {"manifest.sig"} if (bundle / "draft" / "manifest.sig").is_file() else set()  # a TVM draft: local key
    assert set(listed) == set(draft_files) | {"manifest.json"} | signed  # the draft's own manifest is covered too
    for name, info in listed.items():
        assert info["sha256"] == sha256_file(bundle / "draft" / name), name
    assert manifest["architecture"]["num_layers"] == 3
    draft = json.loads((bundle / "draft" / "manifest.json").read_text())
    assert draft["architecture"]["num_layers"] == 2
    if kind == "cpu-tvm":  # built for drafting: VocabTrim keeps the tokens the target writes (K by TPE)
        trim = spec["draft"]["vocab_trim"]
        k = draft["architecture"]["head_rows"]
        assert trim["chosen_by"] == "TPE" and k == trim["k"] == spec["draft"]["head_rows"]
        assert 32 <= k < draft["architecture"]["vocab_size"] and k % 32 == 0, k
        assert trim["coverage"] >= trim["min_coverage"] and trim["calibration_tokens"] > 500
        assert "draft/head_ids.bin" in manifest["files"] and (bundle / "draft" / "head_ids.bin").stat().st_size == 4 * k
    else:  # ONNX Runtime drafts keep their whole head
        assert "head_rows" not in draft["architecture"] and "draft/head_ids.bin" not in manifest["files"]


def test_the_combined_bundle_speculates_losslessly_by_default(combined):
    _, bundle = combined
    engine = Engine.load(bundle, threads=1)
    drafted = accepted = steps = 0
    for prompt in PROMPTS:
        spec = _tokens(engine, prompt, adaptive_draft=False)  # the adaptive length may pause a tiny pair's drafts
        s = engine.last_stats
        assert s.drafter == "model:draft", s.drafter
        drafted, accepted, steps = drafted + s.drafted_tokens, accepted + s.accepted_tokens, steps + s.verify_steps
        assert spec == _tokens(engine, prompt, drafter=None), prompt
        assert engine.last_stats.verify_steps == 0
    assert steps >= 20 and drafted >= 80, (steps, drafted)
    assert accepted >= drafted / 3, (accepted, drafted)  # the draft agrees with the target on most tokens
    assert accepted < drafted  # ... but not all: rejections and rollbacks were exercised


def test_a_tampered_draft_file_is_refused_by_the_target_manifest(combined, tmp_path):
    from edgedec.errors import BundleError

    _, bundle = combined
    copy = shutil.copytree(bundle, tmp_path / "b")
    draft_manifest = copy / "draft" / "manifest.json"
    draft_manifest.write_text(draft_manifest.read_text().replace('"draft_len"', '"draft_len" ', 1) + " ")
    with pytest.raises(BundleError, match="draft/manifest.json"):
        Engine.load(copy, threads=1)


def test_cli_run_speculates_by_default_and_no_spec_gives_the_same_text(cli, combined):
    _, bundle = combined
    args = ("run", bundle, "--prompt", PROMPTS[0], "-n", "32", "--json", "--threads", "1")
    on, off = cli(*args), cli(*args, "--no-spec")
    assert on.exit_code == 0 and off.exit_code == 0, (on.stderr, off.stderr)
    on, off = json.loads(on.stdout), json.loads(off.stdout)
    assert on["drafter"] == "model:draft" and on["verify_steps"] > 0 and on["accepted_tokens"] > 0
    assert off["drafter"] == "" and off["verify_steps"] == 0
    assert on["token_ids"] == off["token_ids"] and on["text"] == off["text"]


def test_an_existing_draft_bundle_is_copied_in(pair, tiny_qwen2_dir, tmp_path, cli):
    target_dir, draft_dir = pair
    draft = tmp_path / "draft-bundle"
    assert cli("compile", draft_dir, "-o", draft).exit_code == 0
    out = tmp_path / "combined"
    r = cli("compile", target_dir, "-o", out, "--spec", f"ngram+model:{draft}")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["speculation"]["drafter"] == "ngram+model:draft"
    assert manifest["speculation"]["draft"]["how"] == "copied"
    engine = Engine.load(out, threads=1)
    for prompt in PROMPTS[:2]:
        assert _tokens(engine, prompt) == _tokens(engine, prompt, drafter=None)
    spec = _tokens(engine, PROMPTS[1])
    assert engine.last_stats.drafter == "ngram+model:draft" and engine.last_stats.accepted_tokens > 0
    assert spec == _tokens(engine, PROMPTS[1], drafter=None)


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(pair, tiny_llama_dir, tmp_path, cli, one_line_error):
    target_dir, _ = pair
    out = tmp_path / "combined"
    r = cli("compile", target_dir, "-o", out, "--spec", f"model:{tiny_llama_dir}")  # found once both are built
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not share the target's tokenizer" in last, last
    assert not out.exists() and not list(tmp_path.glob(".combined.*"))  # nothing published, nothing left
    r = cli("compile", target_dir, "-o", out, "--spec", f"model:{tmp_path / 'nothing'}")
    one_line_error(r, "not a draft bundle, Hugging Face directory")


def test_a_manifest_drafter_outside_the_bundle_is_refused(combined, tmp_path):
    from _tiny import edit_manifest

    from edgedec.errors import BundleError

    _, bundle = combined
    copy = shutil.copytree(bundle, tmp_path / "b")
    edit_manifest(copy, lambda m: m["speculation"].update(drafter=f"model:{bundle / 'draft'}"))
    with pytest.raises(BundleError, match="outside"):
        _tokens(Engine.load(copy, threads=1), "Hello")


def test_onnx_runtime_threads_do_not_spin_when_the_bundle_drafts_with_a_model(combined):
    """Draft and target take turns on the same cores: a bundle whose default drafter is a draft model loads
    its ONNX Runtime session with spinning off (so does the draft's); --no-spec (spin=True) keeps it on."""
    from edgedec.runtime.drafters import spins_with

    kind, bundle = combined
    if kind != "cpu":
        pytest.skip("ONNX Runtime's spinning; the TVM sessions share TVM's one thread pool")
    def allow(engine) -> str:  # the entry is absent (ONNX Runtime's default: spin) unless set
        try:
            return engine.decoder.session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning")
        except RuntimeError:
            return "1"

    assert allow(Engine.load(bundle, threads=1)) == "0"
    assert allow(Engine.load(bundle, threads=1, spin=True)) == "1"
    engine = Engine.load(bundle, threads=1)
    _tokens(engine, "Hello")
    assert allow(engine._drafters[("nested", "model:draft")].engine) == "0"
    assert spins_with("auto") is None and spins_with(None) is True and spins_with("ngram+model:x") is False
