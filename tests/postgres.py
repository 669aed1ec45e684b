"""A real PostgreSQL for tests: the server URL, and a private schema per test.

- ``postgres_url`` (session fixture): the URL of a reachable server; ``TEST_POSTGRES_URL`` overrides the
  default ``postgresql://postgres@127.0.0.1:5432/test``. Skips when no server answers, or fails with
  ``REQUIRE_SERVICES=1`` (CI must not skip silently).
- ``postgres_schema`` (fixture): a schema created for this test alone and dropped after it; pass
  ``schema_settings(schema)`` as ``server_settings`` to every pool so that its ``search_path`` puts
  the ledger's tables there. Tests therefore never share state, and may run side by side.

Import the fixtures into a test module (``from postgres import postgres_schema, postgres_url``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from brokers import missing_service

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    """The server the tests use (``TEST_POSTGRES_URL``, else the local default)."""
    return os.environ.get("TEST_POSTGRES_URL") or DEFAULT_URL


async def _probe(url: str, seconds: float) -> str | None:
    """None when the server accepts a connection and a query, else why not."""
    try:
        conn = await asyncpg.connect(url, timeout=seconds)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        await conn.fetchval("SELECT 1", timeout=seconds)
    finally:
        await conn.close()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a reachable PostgreSQL server; skips (or fails with REQUIRE_SERVICES=1) without one."""
    url = server_url()
    problem = asyncio.run(_probe(url, seconds=3.0))
    if problem is not None:
        missing_service(f"PostgreSQL is not reachable at {_without_password(url)}: {problem}")
    return url


def schema_settings(schema: str) -> dict[str, str]:
    """Server settings that put a pool's tables into ``schema``."""
    return {"search_path": schema}


@pytest.fixture
async def postgres_schema(postgres_url: str) -> AsyncIterator[str]:
    """A fresh schema for this test alone, dropped (with everything in it) afterwards."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        yield schema
    finally:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


async def connect_to_schema(url: str, schema: str) -> asyncpg.Connection:
    """A plain connection whose ``search_path`` is ``schema`` (to look at or lock rows in tests)."""
    return await asyncpg.connect(url, server_settings=schema_settings(schema))


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
