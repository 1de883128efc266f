"""The user docs hold together: every relative link in README.md, CHANGELOG.md and docs/*.md points at a
file that exists and, with ``#anchor``, at a heading that file has (GitHub's anchor rules); the README stays
a user's page, and its set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ... are not checked here


def test_slug_follows_github():
    assert slug("`round_offsets`: speed back, weight by weight") == "round_offsets-speed-back-weight-by-weight"
    assert slug("Sink + sliding window") == "sink--sliding-window"
    assert slug("cpu-tvm and arm64 (Apache TVM)") == "cpu-tvm-and-arm64-apache-tvm"
    assert slug("`-q int4:activations=int8`") == "-q-int4activationsint8"


def test_link_reader_skips_code_and_absolute_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](x.md) `[b](y.md)` [c](https://e.org) ![img](i.png)\n```\n[d](z.md)\n```\n[e](w.md#h)\n")
    assert links(page) == ["x.md", "w.md#h"]


def test_pages_exist():
    for name in ("README.md", "CHANGELOG.md", "docs/architecture.md"):
        assert (ROOT / name).is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {dest.name} has no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_readme_is_a_users_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details into docs/"


def test_readme_setup_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"## Set up\n.*?```bash\n(.*?)\n```.*?```bash\n(.*?)\n```", readme, re.S)
    assert blocks, "README.md lost its two set-up commands"
    install_and_run, install_and_test = blocks[0]
    assert install_and_run.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = install_and_test.split(" && ")
    assert steps[0] + " && " + steps[1] in ci and steps[2] in ci, (install_and_test, ci)
