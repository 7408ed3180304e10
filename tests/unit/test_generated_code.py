"""The committed protobuf code is what ``make proto`` generates from the committed ``.proto`` files."""

from __future__ import annotations

from pathlib import Path

from kvstore import protogen


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    stale = []
    for fresh in protogen.generate(tmp_path):
        relative = fresh.relative_to(tmp_path)
        committed = protogen.REPO_ROOT / relative
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(relative))
    assert not stale, f"stale generated code, run `make proto`: {stale}"
