"""Bundles this user compiles carry native code signed with the local key, so they load without --trust;
the same bundle is refused where that key is not trusted, and once anything in it changes."""

from __future__ import annotations

import json
import shutil

import pytest

from edgedec.errors import UntrustedBundleError
from edgedec.runtime import Engine
from edgedec.runtime.trust import SIGNATURE, local_key_path, local_public_key

pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def signed_tvm(tmp_path_factory, tiny_llama_dir):
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("local-key") / "tvm"
    manifest = compile_model(str(tiny_llama_dir), out, CompileOptions(target="cpu-tvm", max_context=128))
    return out, manifest


def test_compile_signs_with_the_local_key_and_the_bundle_loads_without_trust(signed_tvm):
    out, manifest = signed_tvm
    assert (out / SIGNATURE).is_file() and manifest["signed_by"]
    assert local_key_path().is_file() and local_public_key() is not None
    engine = Engine.load(out, threads=1)  # no trust=...: the local key's signature is enough
    assert len(engine.generate_text("def f(x):", max_new_tokens=4, ignore_eos=True)) > 0


def test_the_same_bundle_elsewhere_is_refused(signed_tvm, monkeypatch):
    out, _ = signed_tvm
    monkeypatch.setenv("EDGEDEC_LOCAL_KEY", "off")  # another user / machine: the signer is not trusted there
    with pytest.raises(UntrustedBundleError, match="not trusted"):
        Engine.load(out, threads=1)


def test_a_changed_manifest_loses_the_local_signature(signed_tvm, tmp_path):
    out, _ = signed_tvm
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["tokenizer"]["chat_template"] = (m["tokenizer"].get("chat_template") or "") + " "
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UntrustedBundleError):
        Engine.load(copy, threads=1)
