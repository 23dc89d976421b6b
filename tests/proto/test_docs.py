"""Docs derived from code are current (STYLE §14)."""

from __future__ import annotations

import re
from pathlib import Path

import mesh_proto

from ._support import gen_docs

ROOT = Path(__file__).resolve().parents[2]


def test_status_page_is_current() -> None:
    checked_in = (ROOT / "docs" / "status.md").read_text(encoding="utf-8")
    assert checked_in == gen_docs().render(), (
        "docs/status.md is stale: regenerate it with `python tools/gen_docs.py`"
    )


def test_status_page_covers_every_pair_and_route() -> None:
    page = gen_docs().render()
    rows = [line for line in page.splitlines() if re.match(r"\| `\w+` \(\d\) \|", line)]
    assert len(rows) == len(mesh_proto.Status)
    cells = sum(len(row.split("|")) - 3 for row in rows)
    assert cells == len(mesh_proto.RULES) == 36
    for spec in mesh_proto.ROUTES:
        path = spec.pattern if spec.bare else "/api/v1" + spec.pattern
        assert f"| {spec.role.value} | {spec.method} | `{path}` |" in page


def test_core_page_mentions_every_public_name() -> None:
    page = (ROOT / "docs" / "core.md").read_text(encoding="utf-8")
    missing = [name for name in mesh_proto.__all__ if f"`{name}" not in page]
    assert not missing, f"docs/core.md does not mention {missing}"
