"""Shared fixtures: a running mesh API on 127.0.0.1 with the embedded defaults."""

from __future__ import annotations

import pytest
import trio

from tests.harness import MeshClient, start_mesh


@pytest.fixture
async def mesh(nursery: trio.Nursery) -> MeshClient:
    return await start_mesh(nursery)
