"""Shared values and builders of the core tests (plain functions: no fixtures needed)."""

from __future__ import annotations

import importlib.util
from collections.abc import Generator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from mesh_proto import Envelope, Status, StoreReply, StoreRequest

ROOT = Path(__file__).resolve().parents[2]

T0 = datetime(2026, 11, 28, 14, 24, 6, 123456, tzinfo=UTC)
ID = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
OTHER_ID = "0b9c8d7e-6f5a-4b3c-9d2e-1f0a9b8c7d6e"


def envelope(
    status: Status = Status.PENDING,
    data: Mapping[str, Any] | None = None,
    *,
    revision: int = 0,
    envelope_id: str = ID,
    created_at: datetime = T0,
    updated_at: datetime = T0,
) -> Envelope:
    return Envelope(
        id=envelope_id,
        status=status,
        created_at=created_at,
        updated_at=updated_at,
        data={"actor": "echo"} if data is None else dict(data),
        revision=revision,
    )


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def drive(
    proc: Generator[StoreRequest, StoreReply, Any],
    transport: Any,
) -> Any:
    """Run a store procedure to completion the way a runtime does, with a sync transport."""
    request = next(proc)
    while True:
        reply = transport(request)
        try:
            request = proc.send(reply)
        except StopIteration as done:
            return done.value


def gen_docs() -> ModuleType:
    """`tools/gen_docs.py` as a module (it is a script, not a package), to compare what it
    renders with the checked-in files."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
