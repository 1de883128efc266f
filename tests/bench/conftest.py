"""Session fixtures: the tiny seeded model (HF dir + bundle) from tests/_tiny.py, built once per session."""

from _tiny import text_file, tiny, tiny_other  # noqa: F401  (fixtures)
