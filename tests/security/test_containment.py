"""Nothing outside a bundle's directory is read because the bundle says so (issue 21, "Found" 1 and 3).

Symbolic links that lead out are refused without revealing anything about their target; a draft model
the manifest names must be a bundle inside it, covered by its hashes (and so by its signature).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from _hostile import edit_manifest, rehash

from edgedec.errors import BundleError, UntrustedBundleError
from edgedec.runtime import Bundle, Engine, TrustPolicy
from edgedec.runtime.trust import load_public_keys, sign_bundle

LINK_OUT = r"bundle file {} is a symbolic link that leads outside the bundle directory; refusing the bundle"


def _refused(bundle: Path, pattern: str, cli, one_line_error) -> str:
    with pytest.raises(BundleError, match=pattern) as info:
        Engine.load(bundle, threads=1)
    one_line_error(cli("run", bundle, "-p", "hi", "-n", "2", "--threads", "1"), pattern)
    one_line_error(cli("inspect", bundle), pattern)
    return str(info.value)


# --- symbolic links -----------------------------------------------------------------------------------
def test_tokenizer_symlinked_outside_is_refused(bundle_copy, tmp_path, cli, one_line_error):
    """The same bytes outside, so hashes and sizes would all match: only the link gives it away."""
    outside = tmp_path / "elsewhere" / "tokenizer.json"
    outside.parent.mkdir()
    shutil.move(bundle_copy / "tokenizer.json", outside)
    os.symlink(outside, bundle_copy / "tokenizer.json")
    message = _refused(bundle_copy, LINK_OUT.format("tokenizer\\.json"), cli, one_line_error)
    assert "elsewhere" not in message and str(tmp_path) not in message.replace(str(bundle_copy), "")


def test_files_under_a_symlinked_directory_reveal_nothing(bundle_copy, tmp_path, cli, one_line_error):
    """A files entry under a link to another directory, with a wrong size: neither the size of the file
    there nor whether it exists may show in the message."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"s" * 12345)
    messages = []
    for name in ("key", "no-such-file"):
        b = bundle_copy.with_name(f"b-{name}")
        shutil.copytree(bundle_copy, b)
        os.symlink(secret, b / "ext")
        edit_manifest(b, lambda m, name=name: m["files"].update({f"ext/{name}": {"bytes": 1, "sha256": "0" * 64}}))
        messages.append(_refused(b, LINK_OUT.format("ext"), cli, one_line_error))
    assert messages[0].replace("b-key", "B") == messages[1].replace("b-no-such-file", "B")  # same either way
    assert "12345" not in messages[0] and "secret" not in messages[0]


def test_a_named_file_linked_out_reveals_nothing(bundle_copy, tmp_path):
    """Without the directory walk (resolve_inside alone): the per-name check says the same for a link
    to an existing file as for a dangling one, and never the size."""
    from edgedec.runtime.bundle import resolve_inside

    (tmp_path / "real").write_bytes(b"x" * 4321)
    os.symlink(tmp_path / "real", bundle_copy / "a")
    os.symlink(tmp_path / "absent", bundle_copy / "b")
    with pytest.raises(BundleError) as a:
        resolve_inside(bundle_copy, "a")
    with pytest.raises(BundleError) as b:
        resolve_inside(bundle_copy, "b")
    assert str(a.value).replace(" a ", " X ") == str(b.value).replace(" b ", " X ")
    assert "4321" not in str(a.value) and str(tmp_path / "real") not in str(a.value)


@pytest.mark.parametrize("where", ["stray", "sub/stray"])
def test_any_link_out_refuses_the_bundle(bundle_copy, where, cli, one_line_error):
    """ONNX graphs name their own external data files; a link the manifest does not name counts too."""
    (bundle_copy / "sub").mkdir()
    os.symlink("/etc/hostname", bundle_copy / where)
    _refused(bundle_copy, LINK_OUT.format(where), cli, one_line_error)


def test_manifest_linked_out_is_refused(bundle_copy, tmp_path):
    shutil.move(bundle_copy / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", bundle_copy / "manifest.json")
    with pytest.raises(BundleError, match=r"bundle file manifest\.json leads outside the bundle directory"):
        Bundle.open(bundle_copy)


def test_links_inside_the_bundle_are_fine(bundle_copy):
    (bundle_copy / "tok").mkdir()
    shutil.move(bundle_copy / "tokenizer.json", bundle_copy / "tok" / "tokenizer.json")
    os.symlink("tok/tokenizer.json", bundle_copy / "tokenizer.json")
    files = rehash(bundle_copy)["files"]
    edit_manifest(bundle_copy, lambda m: m["files"].update({"tokenizer.json": files["tok/tokenizer.json"]}))
    assert Engine.load(bundle_copy, threads=1).generate_text("x", max_new_tokens=2, ignore_eos=True)


def test_bundle_file_only_returns_hashed_files_inside(bundle_copy):
    b = Bundle.open(bundle_copy)
    assert b.file("tokenizer.json") == (bundle_copy / "tokenizer.json").resolve()
    for name in ("notes.txt", "../tiny-llama/manifest.json", "/etc/passwd", None):
        with pytest.raises(BundleError, match="not among its hashed files"):
            b.file(name)


# --- a draft model named by the manifest ---------------------------------------------------------------
def _speculate_with(bundle: Path, drafter: str) -> None:
    edit_manifest(bundle, lambda m: m.update(speculation={"drafter": drafter, "draft_len": 3}))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_manifest_drafter_outside_the_bundle_is_refused(bundle_copy, make_native_bundle, kind, cli, one_line_error):
    """An ONNX-looking bundle must not pull in another bundle (here one carrying native code) from elsewhere."""
    native = make_native_bundle(bundle_copy.parent / "native")
    if kind == "symlink":
        os.symlink(native.path, bundle_copy / "draft")
        _speculate_with(bundle_copy, "model:draft")
        pattern = LINK_OUT.format("draft")
    else:
        _speculate_with(bundle_copy, f"model:{native.path}" if kind == "absolute" else "model:../native")
        pattern = (r"the manifest's speculation\.drafter model:.* names a bundle outside this bundle's directory; "
                   r"a manifest may only name a draft bundle inside it")
    _refused(bundle_copy, pattern, cli, one_line_error)
    assert not native.ran


def test_a_manifest_drafter_is_relative_to_the_bundle_not_the_working_directory(bundle_copy, tiny_llama_bundle,
                                                                              tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_llama_bundle, work / "draft")  # a bundle at ./draft, outside the bundle
    monkeypatch.chdir(work)
    _speculate_with(bundle_copy, "model:draft")
    with pytest.raises(BundleError, match="model:draft is not a draft bundle among this bundle's hashed files"):
        Engine.load(bundle_copy, threads=1)


def test_a_caller_may_name_a_draft_anywhere(bundle_copy, tiny_llama_bundle):
    engine = Engine.load(bundle_copy, threads=1)
    engine.generate_text("def f(x):", max_new_tokens=12, ignore_eos=True, drafter=f"model:{tiny_llama_bundle}")
    assert engine.last_stats.drafted_tokens > 0 and engine.last_stats.accepted_tokens > 0


def _nest(parent: Path, draft_src: Path) -> None:
    shutil.copytree(draft_src, parent / "draft")
    _speculate_with(parent, "model:draft")
    rehash(parent)  # the parent's files list the draft's, its manifest included


def test_a_nested_draft_bundle_is_used(bundle_copy, tiny_llama_bundle):
    _nest(bundle_copy, tiny_llama_bundle)
    engine = Engine.load(bundle_copy, threads=1)
    plain = engine.generate_text("def f(x):", max_new_tokens=12, ignore_eos=True, drafter=None)
    assert engine.generate_text("def f(x):", max_new_tokens=12, ignore_eos=True) == plain
    stats = engine.last_stats
    assert stats.drafter == "model:draft" and stats.drafted_tokens > 0 and stats.accepted_tokens > 0


def test_a_nested_draft_must_be_among_the_hashed_files(bundle_copy, tiny_llama_bundle, cli, one_line_error):
    _nest(bundle_copy, tiny_llama_bundle)
    edit_manifest(bundle_copy, lambda m: m["files"].pop("draft/manifest.json"))
    _refused(bundle_copy, r"model:draft is not a draft bundle among this bundle's hashed files", cli, one_line_error)


def test_a_modified_nested_draft_is_refused(bundle_copy, tiny_llama_bundle):
    _nest(bundle_copy, tiny_llama_bundle)
    tok = bundle_copy / "draft" / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<s>", "<S>"))
    with pytest.raises(BundleError, match=r"bundle file draft/tokenizer\.json"):
        Engine.load(bundle_copy, threads=1)


def test_a_nested_native_draft_is_trusted_as_its_parent(bundle_copy, make_native_bundle, keys):
    """A TVM draft inside an ONNX bundle: refused unless the parent is trusted; the parent's signature
    covers the draft (its manifest's hash is in the parent's signed files)."""
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    native = make_native_bundle(bundle_copy / "draft")
    _speculate_with(bundle_copy, "model:draft")
    rehash(bundle_copy)
    engine = Engine.load(bundle_copy, threads=1)  # the parent itself runs no native code
    with pytest.raises(UntrustedBundleError, match="carries native code"):
        engine.generate("def f(x):", max_new_tokens=4)
    assert not native.ran

    sign_bundle(bundle_copy, keys["a"][0])
    other = TrustPolicy(keys=tuple(load_public_keys(keys["b"][1])))
    with pytest.raises(UntrustedBundleError, match="carries native code"):
        Engine.load(bundle_copy, threads=1, trust=other).generate("def f(x):", max_new_tokens=4)
    assert not native.ran
    trusted = TrustPolicy(keys=tuple(load_public_keys(keys["a"][1])))
    assert not (bundle_copy / "draft" / "manifest.sig").exists()  # only the parent is signed
    with pytest.raises(BundleError, match="the TVM runtime cannot load decoder.so"):
        Engine.load(bundle_copy, threads=1, trust=trusted).generate("def f(x):", max_new_tokens=4)
    assert native.ran


def test_the_parent_signature_covers_the_nested_manifest(bundle_copy, make_native_bundle, keys):
    """A draft manifest swapped after the parent was signed no longer matches the hash the parent lists."""
    native = make_native_bundle(bundle_copy / "draft")
    _speculate_with(bundle_copy, "model:draft")
    rehash(bundle_copy)
    sign_bundle(bundle_copy, keys["a"][0])
    text = (native.path / "manifest.json").read_text()
    (native.path / "manifest.json").write_text(text.replace("\n  ", "\n\t ", 1))  # same size, other bytes
    trusted = TrustPolicy(keys=tuple(load_public_keys(keys["a"][1])))
    engine = Engine.load(bundle_copy, threads=1, trust=trusted, verify=False)  # sizes still checked...
    with pytest.raises(UntrustedBundleError):  # ...but the draft's manifest is no longer the signed one
        engine.generate("def f(x):", max_new_tokens=4)
    assert not native.ran
    assert hashlib.sha256((native.path / "manifest.json").read_bytes()).hexdigest() != \
        Bundle.open(bundle_copy, verify_hashes=False).manifest["files"]["draft/manifest.json"]["sha256"]
