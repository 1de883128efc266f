"""Session fixtures: the tiny seeded model (HF dir + bundle) from tests/_tiny.py, built once per session."""

import pytest

from _tiny import sample_text, tiny_bundle


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(HF directory, bundle) of the tiny random Llama, seed 0."""
    return tiny_bundle(tmp_path_factory, seed=0)


@pytest.fixture(scope="session")
def tiny_other(tmp_path_factory):
    """The same architecture and tokenizer with other random weights (seed 1)."""
    return tiny_bundle(tmp_path_factory, seed=1)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(sample_text("for"))
    return path
