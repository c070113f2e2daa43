"""Alembic migrations, one history per service, run at start-up or from the alembic CLI.

Each service keeps its revisions in `services/<name>/migrations/versions/` and a two-line env.py that
calls `run_env()`. At start-up `upgrade()` shares the service's async engine with Alembic (the cookbook's
"connection sharing" recipe), so there is no second database driver.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from runtime.db import Database


def alembic_config(migrations_dir: Path, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade(db: Database, migrations_dir: Path, revision: str = "head") -> None:
    """Bring the service's database to `revision` (idempotent: nothing happens when it is there)."""
    config = alembic_config(migrations_dir, db.url)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def _migrate_url(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(_migrate)
    await engine.dispose()


def run_env() -> None:
    """The body of every service's env.py."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
    else:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise SystemExit(
                "set sqlalchemy.url (alembic -x or alembic.ini) to migrate from the CLI"
            )
        asyncio.run(_migrate_url(url))
