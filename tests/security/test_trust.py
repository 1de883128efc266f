"""Native code loads only from bundles the user trusts (issue 21, "Found" 1).

The reproducer: a bundle whose TVM "library" is a shared object with a constructor that writes a
marker file (tests/security/conftest.py). Without the opt-in, neither ``Engine.load`` nor ``edgedec run``
may create the marker; with ``--trust``, or a signature by a trusted key, the library is opened (and the
marker appears, so these tests would see a check that never lets anything through).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _hostile import edit_manifest, rehash

from edgedec.errors import BundleError, ConfigError, UntrustedBundleError
from edgedec.runtime import Engine, TrustPolicy
from edgedec.runtime.trust import (SIGNATURE, TRUSTED_KEYS_ENV, load_public_keys, sign_bundle, verify_bundle)

UNTRUSTED = r"carries native code \(decoder\.so, .*\) and is not trusted \(.*\): pass --trust"


def _edgedec(*args, env=None) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (a dlopen there cannot hide in this one)."""
    return subprocess.run([sys.executable, "-m", "edgedec.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _policy(*public_paths) -> TrustPolicy:
    return TrustPolicy(keys=tuple(k for p in public_paths for k in load_public_keys(p)))


# --- the reproducer -----------------------------------------------------------------------------------
def test_engine_load_never_runs_the_constructor_without_the_opt_in(make_native_bundle):
    b = make_native_bundle()
    for kwargs in ({}, {"trust": False}, {"verify": False}, {"trust": TrustPolicy()}):
        with pytest.raises(UntrustedBundleError, match=UNTRUSTED):
            Engine.load(b.path, threads=1, **kwargs)
        assert not b.ran, kwargs


def test_cli_run_never_runs_the_constructor_without_the_opt_in(make_native_bundle, cli, one_line_error):
    b = make_native_bundle()
    one_line_error(cli("run", b.path, "-p", "hi", "-n", "2"), UNTRUSTED)
    r = _edgedec("run", b.path, "-p", "hi", "-n", "2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--trust" in lines[0], r.stderr
    assert not b.ran


def _command(name: str, bundle: Path, tmp_path: Path) -> list:
    if name == "run":
        return ["run", bundle, "-p", "hi", "-n", "2"]
    if name == "bench":  # the bundle loads in a worker process
        return ["bench", bundle, "--runs", "1", "--warmup", "0", "--new-tokens", "2"]
    if name == "eval":
        (tmp_path / "text.txt").write_text("def f(x):\n    return x\n" * 20)
        return ["eval", bundle, "--text", tmp_path / "text.txt", "--window", "16", "--stride", "8"]
    budget = tmp_path / "budget.toml"
    budget.write_text('min_decode_tok_s = "1e-6x baseline"\n[settings]\nwarmup = 0\nruns = 1\nnew_tokens = 2\n')
    return ["gate", bundle, "--budget", budget, "--baseline", bundle]


@pytest.mark.parametrize("command", ["run", "bench", "eval", "gate"])
def test_every_command_that_loads_a_bundle_takes_the_opt_in(command, make_native_bundle, tmp_path):
    """Without --trust: refused in one line, the constructor never runs; with it: the library is opened
    (also inside bench's worker process)."""
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    b = make_native_bundle()
    r = _edgedec(*_command(command, b.path, tmp_path))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]  # (gate shows its steps too)
    assert r.returncode == 2 and len(errors) == 1 and "--trust" in errors[0], r.stderr
    assert not b.ran
    r = _edgedec(*_command(command, b.path, tmp_path), "--trust")
    assert r.returncode == 2 and "the TVM runtime cannot load decoder.so" in r.stderr, r.stderr
    assert b.ran


def test_the_opt_in_does_open_the_library(make_native_bundle):
    """Honesty check: with trust=True the loader goes on to dlopen the library, so the constructor runs
    (then TVM refuses it: it is no Relax executable)."""
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    b = make_native_bundle()
    with pytest.raises(BundleError, match="the TVM runtime cannot load decoder.so"):
        Engine.load(b.path, threads=1, trust=True)
    assert b.ran


def test_onnx_bundles_need_no_trust(bundle_copy):
    engine = Engine.load(bundle_copy, threads=1)
    assert engine.trust.trusted and engine.trust.reason == "no native code"


def test_only_shared_libraries_are_opened(make_native_bundle):
    """TVM's load_module runs a C compiler on .o/.tar files: a bundle may only name a shared library."""
    b = make_native_bundle()
    os.rename(b.path / "decoder.so", b.path / "decoder.tar")
    edit_manifest(b.path, lambda m: m["graphs"]["decoder"].update(file="decoder.tar"))
    rehash(b.path)
    with pytest.raises(BundleError, match=r"the decoder graph's file 'decoder\.tar' is not a shared library"):
        Engine.load(b.path, threads=1, trust=True)
    assert not b.ran


# --- signatures ---------------------------------------------------------------------------------------
def test_a_signature_by_a_trusted_key_trusts_the_bundle(make_native_bundle, keys):
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    (priv_a, pub_a, id_a), (_, pub_b, _) = keys["a"], keys["b"]
    b = make_native_bundle()
    assert sign_bundle(b.path, priv_a) == id_a
    with pytest.raises(UntrustedBundleError, match=f"{SIGNATURE} is signed by key {id_a}, not by a trusted key"):
        Engine.load(b.path, threads=1, trust=_policy(pub_b))
    assert not b.ran
    with pytest.raises(BundleError, match="the TVM runtime cannot load decoder.so"):
        Engine.load(b.path, threads=1, trust=_policy(pub_b, pub_a))
    assert b.ran


def test_trusted_keys_from_the_environment(make_native_bundle, keys, monkeypatch, tmp_path):
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    b = make_native_bundle()
    sign_bundle(b.path, keys["a"][0])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["b"][1]))
    with pytest.raises(UntrustedBundleError, match="not by a trusted key"):
        Engine.load(b.path, threads=1)
    assert not b.ran
    trusted = tmp_path / "trusted"  # a directory of public keys
    trusted.mkdir()
    (trusted / "ci.pub").write_bytes(keys["a"][1].read_bytes())
    monkeypatch.setenv(TRUSTED_KEYS_ENV, os.pathsep.join([str(keys["b"][1]), str(trusted)]))
    with pytest.raises(BundleError, match="the TVM runtime cannot load decoder.so"):
        Engine.load(b.path, threads=1)
    assert b.ran


def test_cli_trusted_key(make_native_bundle, keys):
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    b = make_native_bundle()
    sign_bundle(b.path, keys["a"][0])
    r = _edgedec("run", b.path, "-p", "hi", "--trusted-key", keys["b"][1])
    assert r.returncode == 2 and "not by a trusted key" in r.stderr and not b.ran, r.stderr
    r = _edgedec("run", b.path, "-p", "hi", "--trusted-key", keys["a"][1])
    assert r.returncode == 2 and "the TVM runtime cannot load decoder.so" in r.stderr, r.stderr
    assert b.ran


def test_a_manifest_edited_after_signing_is_not_trusted(make_native_bundle, keys):
    b = make_native_bundle()
    sign_bundle(b.path, keys["a"][0])
    edit_manifest(b.path, lambda m: m["source"].update(name="someone else's"))
    with pytest.raises(UntrustedBundleError, match="does not match manifest.json \\(modified after signing\\)"):
        Engine.load(b.path, threads=1, trust=_policy(keys["a"][1]))
    assert not b.ran


def test_a_library_swapped_after_signing_is_not_opened_even_without_hash_checks(make_native_bundle, keys):
    b = make_native_bundle()
    sign_bundle(b.path, keys["a"][0])
    raw = bytearray((b.path / "decoder.so").read_bytes())
    raw[-1] ^= 0xFF  # same size: only the hash notices
    (b.path / "decoder.so").write_bytes(bytes(raw))
    with pytest.raises(UntrustedBundleError, match="bundle file decoder.so does not match its sha256 in the signed"):
        Engine.load(b.path, threads=1, verify=False, trust=_policy(keys["a"][1]))
    assert not b.ran


def test_sign_checks_the_bundle_first(bundle_copy, keys):
    data = bundle_copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="does not match its sha256"):
        sign_bundle(bundle_copy, keys["a"][0])
    assert not (bundle_copy / SIGNATURE).exists()


def test_two_signers(bundle_copy, keys):
    sign_bundle(bundle_copy, keys["a"][0])
    sign_bundle(bundle_copy, keys["b"][0])
    sign_bundle(bundle_copy, keys["a"][0])  # re-signing replaces that key's entry
    doc = json.loads((bundle_copy / SIGNATURE).read_text())
    assert sorted(e["key_id"] for e in doc["signatures"]) == sorted([keys["a"][2], keys["b"][2]])
    for name in ("a", "b"):
        assert verify_bundle(bundle_copy, load_public_keys(keys[name][1])).ok


# --- the commands -------------------------------------------------------------------------------------
def test_keygen_sign_verify_commands(bundle_copy, tmp_path, cli, one_line_error):
    key = tmp_path / "ci-key"
    r = cli("keygen", "-o", key)
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (tmp_path / "ci-key.pub").is_file()
    one_line_error(cli("keygen", "-o", key), "already exists; pass --force")
    other = tmp_path / "other"
    assert cli("keygen", "-o", other).exit_code == 0

    r = cli("verify", bundle_copy, "--pubkey", f"{key}.pub")
    assert r.exit_code == 1 and "no manifest.sig" in r.stderr, r.stderr  # unsigned: a check that fails
    r = cli("sign", bundle_copy, "--key", key)
    assert r.exit_code == 0 and (bundle_copy / SIGNATURE).is_file(), r.stderr
    r = cli("verify", bundle_copy, "--pubkey", f"{key}.pub")
    assert r.exit_code == 0 and "verified" in r.stdout, r.stderr
    r = cli("verify", bundle_copy, "--pubkey", f"{other}.pub")
    assert r.exit_code == 1 and "not by a trusted key" in r.stderr

    data = bundle_copy / "tokenizer.json"  # modified after signing: the signature holds, the file does not
    data.write_text(data.read_text().replace("<s>", "<S>"))
    r = cli("verify", bundle_copy, "--pubkey", f"{key}.pub")
    assert r.exit_code == 1 and "tokenizer.json" in r.stderr, r.stderr

    one_line_error(cli("verify", tmp_path, "--pubkey", f"{key}.pub"), "is not a bundle")
    one_line_error(cli("verify", bundle_copy, "--pubkey", tmp_path / "missing.pub"), "does not exist")
    one_line_error(cli("verify", bundle_copy, "--pubkey", key), "holds no ed25519 public key")
    one_line_error(cli("sign", bundle_copy, "--key", f"{key}.pub"), "is not an unencrypted ed25519 private key")


def test_verify_pubkey_overrides_the_environment(bundle_copy, keys, cli, monkeypatch):
    sign_bundle(bundle_copy, keys["a"][0])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["a"][1]))
    assert cli("verify", bundle_copy).exit_code == 0
    assert cli("verify", bundle_copy, "--pubkey", keys["b"][1]).exit_code == 1


def test_verify_without_any_key_is_bad_input(bundle_copy, cli, one_line_error, monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    monkeypatch.setenv("EDGEDEC_LOCAL_KEY", "off")  # nor the local key compile signs with
    one_line_error(cli("verify", bundle_copy), "no public key to verify with")


def test_openssh_keys_work(bundle_copy, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    (tmp_path / "id").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
    (tmp_path / "id.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH) + b" ci\n")
    sign_bundle(bundle_copy, tmp_path / "id")
    assert verify_bundle(bundle_copy, load_public_keys(tmp_path / "id.pub")).ok


def test_a_broken_trusted_keys_variable_is_bad_input_only_when_it_matters(make_native_bundle, bundle_copy,
                                                                         monkeypatch, tmp_path):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "nowhere.pub"))
    Engine.load(bundle_copy, threads=1)  # no native code: keys are not needed
    b = make_native_bundle()
    with pytest.raises(ConfigError, match="nowhere.pub does not exist"):
        Engine.load(b.path, threads=1)
    assert not b.ran
    pytest.importorskip("tvm", reason="the TVM runtime opens the library")
    with pytest.raises(BundleError, match="the TVM runtime cannot load"):  # the opt-in reads no keys
        Engine.load(b.path, threads=1, trust=True)
