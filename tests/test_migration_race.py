"""Replicas starting at once on a new PostgreSQL database each migrate it (each service process runs
`tools.migrate` on start): one does, the others wait for it and find the schema at head
(runtime.migrations takes a lock first), instead of failing on tables the first is creating."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from runtime.db import Database
from tests.suite import create_pg_database, drop_pg_database, require_postgres

ROOT = Path(__file__).resolve().parents[1]


async def test_replicas_migrating_a_new_database_at_once_all_start(backend: str) -> None:
    if backend == "sqlite":
        pytest.skip("replicas share a database on PostgreSQL; a SQLite file is one process's")
    await require_postgres()
    name = f"coins_migrate_race_{uuid.uuid4().hex[:12]}"
    url = await create_pg_database(name)
    env = {**os.environ, "GIFTING_DATABASE_URL": url}
    try:
        replicas = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tools.migrate",
                "gifting",
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            for _ in range(3)
        ]
        outputs = await asyncio.wait_for(
            asyncio.gather(*(replica.communicate() for replica in replicas)), timeout=120
        )
        said = [out.decode(errors="replace")[-1500:] for out, _ in outputs]
        assert [replica.returncode for replica in replicas] == [0, 0, 0], said
        db = Database(url)
        try:
            async with db.read() as conn:
                revisions = (
                    await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                ).all()
        finally:
            await db.close()
        assert len(revisions) == 1
    finally:
        await drop_pg_database(name)
