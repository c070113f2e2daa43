"""A service that cannot start says why in one line with the fix, not in a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from runtime.migrations import alembic_config
from services.wallet.service import SPEC as WALLET
from tools.migrate import SPECS

ROOT = Path(__file__).resolve().parents[1]


def start_wallet(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.wallet"],
        cwd=ROOT,
        env={
            **os.environ,
            "COINS_CERTS_DIR": str(tmp_path / "certs"),
            "WALLET_PORT": "0",
            "WALLET_HEALTH_PORT": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "postgresql://postgres@127.0.0.1:5432/coins_no_such_database",
            "the database 'coins_no_such_database' does not exist on 127.0.0.1:5432: create it",
        ),
        ("postgresql://postgres@127.0.0.1:1/coins", "cannot reach PostgreSQL at 127.0.0.1:1"),
        ("mysql://someone@somewhere/coins", "is not a database URL the service can use"),
    ],
)
def test_a_database_it_cannot_use_stops_the_service_with_one_line(
    tmp_path: Path, url: str, says: str
) -> None:
    done = start_wallet(tmp_path, WALLET_DATABASE_URL=url)
    assert done.returncode == 1
    assert says in done.stderr and "WALLET_DATABASE_URL" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_port_in_use_stops_the_service_naming_the_port_and_its_variable(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = start_wallet(tmp_path, WALLET_PORT=str(port), WALLET_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in done.stderr
    assert "WALLET_PORT" in done.stderr and "COINS_PORT_BASE" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_service_that_migrates_on_start_does_so_in_a_child_process(tmp_path: Path) -> None:
    """`python -m services.wallet` migrates with `tools.migrate` in a short-lived child (its line on
    stdout, the database at head), so the server itself never loads alembic (see
    runtime.server.main); here the taken port then stops the server after the migration."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = start_wallet(tmp_path, WALLET_PORT=str(port), WALLET_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "wallet: migrated to the newest schema" in done.stdout, done.stdout[-2000:]
    with sqlite3.connect(tmp_path / "data" / "wallet.db") as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    head = ScriptDirectory.from_config(
        alembic_config(WALLET.migrations_dir, "sqlite://")
    ).get_current_head()
    assert revision == head


def test_migrations_run_on_their_own_for_services_that_do_not_migrate_on_start(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.migrate", "wallet", "payout"],
        cwd=ROOT,
        env={**os.environ, "WALLET_DATA_DIR": str(tmp_path), "PAYOUT_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wallet: migrated to the newest schema" in done.stdout
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["payout.db", "wallet.db"]
    with sqlite3.connect(tmp_path / "wallet.db") as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    head = ScriptDirectory.from_config(
        alembic_config(WALLET.migrations_dir, "sqlite://")
    ).get_current_head()
    assert revision == head


def test_a_service_that_does_not_migrate_does_not_load_alembic() -> None:
    """Alembic is ~10 MB of every process that loads it: a service deployed with
    `<SVC>_MIGRATE_ON_START=false` (the Kubernetes base, with its migrate Job) leaves it out. Its
    modules must not import it (start_service imports `runtime.migrations` only to migrate)."""
    services = ", ".join(f"services.{name}.service" for name in SPECS)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, runtime.server, {services}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
