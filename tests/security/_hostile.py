"""Hostile-bundle helpers for the security tests (imported by tests/security/conftest.py and the tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONSTRUCTOR_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void edgedec_test_constructor(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the bundle's constructor ran\n", f); fclose(f); }
}
"""


def rehash(bundle: Path) -> dict:
    """Rewrite ``manifest['files']`` to the regular files now in ``bundle`` (as a tamperer would), nested
    bundles' manifests included; the top manifest and its signature are not listed."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    skip = {bundle / "manifest.json", bundle / "manifest.sig"}
    manifest["files"] = {
        p.relative_to(bundle).as_posix(): {"bytes": p.stat().st_size,
                                           "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(bundle.rglob("*")) if p.is_file() and not p.is_symlink() and p not in skip
    }
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def edit_manifest(bundle: Path, edit) -> dict:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return manifest
