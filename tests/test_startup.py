"""A service that cannot start says why in one line with the fix, not in a traceback."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import asyncpg
import pydantic
import pytest
from alembic.script import ScriptDirectory
from pydantic import SecretStr
from sqlalchemy import exc as sa_exc

from runtime.config import SecuritySettings
from runtime.db import Database
from runtime.migrations import alembic_config, upgrade
from runtime.startup import explain, explain_settings, mistyped_settings, refused_settings
from services.gifting.settings import GiftingSettings
from services.payout.settings import PayoutSettings
from services.wallet.service import SPEC as WALLET
from services.wallet.settings import WalletSettings
from tests.suite import PG_ADMIN_URL, create_pg_database, drop_pg_database, require_postgres
from tools.migrate import SPECS

ROOT = Path(__file__).resolve().parents[1]


def python_module(*arguments: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m ARGUMENTS` in the checkout with `env`: its exit code and what it printed."""
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_wallet(
    tmp_path: Path, *python_options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python_options, "-m", "services.wallet"],
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


def test_a_setting_it_refuses_stops_the_service_naming_the_variable(tmp_path: Path) -> None:
    done = start_wallet(tmp_path, WALLET_MAX_IN_FLIGHT_RPCS="lots")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "wallet: WALLET_MAX_IN_FLIGHT_RPCS=lots: Input should be a valid integer, unable to parse "
        "string as an integer"
    ], done.stderr[-2000:]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        (
            "WALLET_DATABASE_URL",
            "sqlite+aiosqlite:////nonexistent/folder/wallet.db",
            "wallet: cannot open the SQLite file /nonexistent/folder/wallet.db: its folder does "
            "not exist",
        ),
        (
            "WALLET_DATA_DIR",
            "/proc/no-such-folder",
            "wallet: cannot use the data folder /proc/no-such-folder (No such file or directory): "
            "set WALLET_DATA_DIR",
        ),
        ("WALLET_PORT", "70000", "wallet: WALLET_PORT=70000: Input should be less than or equal"),
        ("WALLET_LOG_LEVEL", "LOUD", "wallet: WALLET_LOG_LEVEL=LOUD: Input should be 'DEBUG'"),
        (
            "COINS_RATE_LIMIT_REDIS_URL",
            "http://cache:6379",
            "COINS_RATE_LIMIT_REDIS_URL=http://cache:6379: write redis://host:port/db",
        ),
    ],
)
def test_a_folder_port_or_url_it_cannot_use_is_named_in_one_line(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    """R6: each of these printed a traceback (the launcher's own, for the port); the service and
    make up each say it in a line."""
    done = start_wallet(tmp_path, **{variable: value})
    assert done.returncode == 1
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    if variable.endswith("DATABASE_URL"):
        return  # make up relays what the service said (test_make_up_exits_non_zero_when...)
    from tests.test_make_up import free_port_base

    env = {**os.environ, "COINS_DATA_DIR": str(tmp_path / "data"), variable: value}
    env["COINS_PORT_BASE"] = str(free_port_base())
    launched = python_module("tools.suite", env=env)  # it refuses these before starting any
    assert launched.returncode == 1
    assert "Traceback" not in launched.stderr, launched.stderr[-2000:]
    assert variable in launched.stderr, launched.stderr[-2000:]


def test_make_up_names_every_variable_a_service_would_refuse() -> None:
    done = python_module(
        "tools.suite",
        env={**os.environ, "PAYOUT_WITHDRAWAL_FEE_BPS": "-5", "PROMOTION_GRACE_SECONDS": "soon"},
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "payout: PAYOUT_WITHDRAWAL_FEE_BPS=-5: Input should be greater than or equal to 0",
        "promotion: PROMOTION_GRACE_SECONDS=soon: Input should be a valid number, unable to "
        "parse string as a number",
        "the suite cannot start: fix the variables above",
    ], done.stderr[-2000:]


def test_a_payout_configuration_with_a_negative_fee_or_a_zero_rate_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        PayoutSettings(diamonds_per_minor_unit=0)
    with pytest.raises(pydantic.ValidationError, match="must divide 10000"):
        PayoutSettings(diamonds_per_minor_unit=3)  # 3,333 millionths a diamond, paid 3,333.33
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 0"):
        PayoutSettings(withdrawal_fee_fixed_minor=-1)
    # A fee that eats the smallest withdrawal: refused with what to change (it answered
    # "$10.00 is below the minimum of $10.00", and paid $0.01 of $15.01).
    with pytest.raises(pydantic.ValidationError, match="must pay the creator something"):
        PayoutSettings(withdrawal_fee_fixed_minor=1500)
    with pytest.raises(pydantic.ValidationError, match="PAYOUT_WITHDRAWAL_FEE_BPS=10000"):
        PayoutSettings(withdrawal_fee_bps=10_000)
    assert PayoutSettings(withdrawal_fee_fixed_minor=999).withdrawal_fee_fixed_minor == 999
    # A daily cap below the minimum: every withdrawal refused, "capped at $5.00 a day" against a
    # $10.00 minimum (review r22).
    with pytest.raises(pydantic.ValidationError, match="no withdrawal could ever be made"):
        PayoutSettings(daily_withdrawal_cap_minor=500)
    with pytest.raises(pydantic.ValidationError, match="PAYOUT_DAILY_WITHDRAWAL_CAP_MINOR=0"):
        PayoutSettings(daily_withdrawal_cap_minor=0)
    with pytest.raises(pydantic.ValidationError, match="no withdrawal could ever be made"):
        PayoutSettings(daily_withdrawal_cap_minor=0, min_withdrawal_minor=0)  # a cent is the least
    assert PayoutSettings(daily_withdrawal_cap_minor=1000).daily_withdrawal_cap_minor == 1000


def test_gifting_keeps_room_for_gifts_beside_its_feeds() -> None:
    """Open WatchLive streams count against grpc's concurrency limit: 10,000 watchers allowed
    beside a limit of 2,000 let 40 idle watchers (at a limit of 40) refuse every gift (review
    r25). Watchers may take at most half."""
    assert GiftingSettings().feed_max_watchers * 2 <= GiftingSettings().max_concurrent_rpcs
    with pytest.raises(pydantic.ValidationError, match="leave no room for gifts"):
        GiftingSettings(feed_max_watchers=1_001, max_concurrent_rpcs=2_000)
    assert GiftingSettings(feed_max_watchers=1_000, max_concurrent_rpcs=2_000)


def test_payout_off_a_dev_pki_refuses_a_webhook_secret_anyone_knows(tmp_path: Path) -> None:
    """The default webhook secret is public: a real deployment (COINS_DEV_PKI=false, certificates
    from the operator) that kept it accepted forged processor callbacks, a "failed" after a real
    "paid" giving back diamonds that were paid out. Payout, and make up, refuse it (and an empty
    or short one) in one line naming the variable, without echoing the secret."""
    env = {
        **os.environ,
        "COINS_CERTS_DIR": str(tmp_path / "certs"),
        "COINS_DEV_PKI": "false",
        "PAYOUT_DATA_DIR": str(tmp_path / "data"),
        "PAYOUT_PORT": "0",
        "PAYOUT_HEALTH_PORT": "0",
    }
    env.pop("PAYOUT_PROCESSOR_WEBHOOK_SECRET", None)
    why = (
        "and with COINS_DEV_PKI=false (a real deployment) a forged processor callback signed with "
        "it would be believed: set it to the secret the processor signs its webhooks with, at "
        "least 16 bytes (e.g. `openssl rand -hex 32`)"
    )
    for secret, problem in (
        (None, "the public development default"),
        ("", "empty"),
        ("fifteen-bytes!!", "15 bytes long"),
    ):
        done = python_module(
            "services.payout",
            env=env if secret is None else {**env, "PAYOUT_PROCESSOR_WEBHOOK_SECRET": secret},
        )
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"payout: bad configuration: PAYOUT_PROCESSOR_WEBHOOK_SECRET is {problem}, {why}"
        ], done.stderr[-2000:]
        assert not secret or secret not in done.stderr
    assert not (tmp_path / "data").exists(), "it started (migrated) before refusing"
    suite = python_module("tools.suite", env=env)
    assert suite.returncode == 1
    assert suite.stderr.strip().splitlines() == [
        f"payout: bad configuration: PAYOUT_PROCESSOR_WEBHOOK_SECRET is the public development "
        f"default, {why}",
        "the suite cannot start: fix the variables above",
    ], suite.stderr[-2000:]
    # A dev PKI (make up, the dev defaults) keeps the default; off one, a secret of 16 bytes will do.
    assert PayoutSettings(security=SecuritySettings(dev_pki=True))
    off = SecuritySettings(dev_pki=False)
    assert PayoutSettings(security=off, processor_webhook_secret=SecretStr("sixteen-bytes!!!"))
    with pytest.raises(pydantic.ValidationError, match="PAYOUT_PROCESSOR_WEBHOOK_SECRET"):
        PayoutSettings(security=off)
    # Judged without the spaces and line breaks around it (a Secret made from a file ends with a
    # newline): the default with one, or 16 spaces, is no secret either.
    for padded, problem in (
        ("dev-payout-webhook-secret\n", "the public development default (with spaces"),
        ("  dev-payout-webhook-secret ", "the public development default (with spaces"),
        (" " * 16, "only spaces or line breaks"),
        ("fifteen-bytes!!\n", "15 bytes long (with spaces"),
    ):
        with pytest.raises(pydantic.ValidationError, match=re.escape(f"SECRET is {problem}")):
            PayoutSettings(security=off, processor_webhook_secret=SecretStr(padded))


@pytest.mark.parametrize(
    ("tool", "code"),
    [
        (["tools.migrate", "payout"], 1),
        (["tools.migrate"], 1),  # every service: none migrated (it migrated those before payout)
        (["tools.cross_audit"], 2),  # 1 is "the books differ"
        (["ledger.auditor", "payout"], 2),  # 1 is "findings"
    ],
)
def test_a_tool_refuses_the_settings_its_service_would_in_one_line(
    tmp_path: Path, tool: list[str], code: int
) -> None:
    """The migration job, the cross audit and the ledger audit read a service's settings: what
    the service refuses (here payout's public webhook secret off a dev PKI) they refuse in the
    service's own words, exiting `code`, not with pydantic's traceback."""
    env = {**os.environ, "COINS_DEV_PKI": "false", "COINS_DATA_DIR": str(tmp_path / "data")}
    env.pop("PAYOUT_PROCESSOR_WEBHOOK_SECRET", None)
    done = python_module(*tool, env=env)
    assert done.returncode == code, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "payout: bad configuration: PAYOUT_PROCESSOR_WEBHOOK_SECRET is the public development "
        "default"
    ), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists(), "it went on after refusing"


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
    assert not (tmp_path / "data" / "wallet.db").exists(), "it migrated before finding the clash"


def assert_wallet_at_head(database: Path) -> None:
    with sqlite3.connect(database) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    head = ScriptDirectory.from_config(
        alembic_config(WALLET.migrations_dir, "sqlite://")
    ).get_current_head()
    assert revision == head


def test_a_service_that_migrates_on_start_does_so_in_a_child_process(tmp_path: Path) -> None:
    """`python -m services.wallet` migrates with `tools.migrate` in a short-lived child (its line on
    stdout, the database at head) and the server itself never imports alembic (`-X importtime`
    lists the server's imports, not the child's); here the health port set to the API's (both
    free before the migration) then stops the server after it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = start_wallet(
        tmp_path,
        "-X",
        "importtime",
        WALLET_PORT=port,
        WALLET_HEALTH_PORT=port,
        WALLET_DATA_DIR=str(tmp_path / "data"),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"wallet health: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
    assert "wallet: migrated to the newest schema" in done.stdout, done.stdout[-2000:]
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "runtime.server" in imported  # the server's own imports are listed
    assert not [m for m in imported if m.split(".")[0] in ("alembic", "mako", "pygments")]
    assert_wallet_at_head(tmp_path / "data" / "wallet.db")


def test_a_service_that_does_not_migrate_refuses_a_database_that_was_not(tmp_path: Path) -> None:
    """With `<SVC>_MIGRATE_ON_START=false` and no migrate Job run first, a server would report
    SERVING and fail every call on missing tables: it stops with one line saying what to run."""
    done = start_wallet(
        tmp_path,
        WALLET_MIGRATE_ON_START="false",
        WALLET_MIGRATION_WAIT_SECONDS="0",
        WALLET_DATA_DIR=str(tmp_path / "data"),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "wallet: the database (sqlite+aiosqlite:///" in done.stderr
    assert "is not migrated, this code needs" in done.stderr
    assert "run `python -m tools.migrate wallet` first" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def migrate_tool(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return python_module(
        "tools.migrate",
        *args,
        env={**os.environ, "WALLET_DATA_DIR": str(data_dir), "WALLET_MIGRATION_WAIT_SECONDS": "0"},
    )


def test_a_database_a_newer_release_migrated_is_named_not_a_traceback(tmp_path: Path) -> None:
    """A rollback: the database is at a revision this code's history lacks. The migration job and a
    service that migrates on start said it in alembic's traceback ("Can't locate revision")."""
    assert migrate_tool(tmp_path, "wallet").returncode == 0
    with sqlite3.connect(tmp_path / "wallet.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    says = "is at schema revision 9999, which this code does not know: a newer release migrated it"
    job = migrate_tool(tmp_path, "wallet")
    started = start_wallet(tmp_path, WALLET_DATA_DIR=str(tmp_path))
    for done in (job, started):
        assert done.returncode == 1, done.stderr[-2000:]
        assert says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_the_check_names_the_revision_a_database_is_behind_at(tmp_path: Path) -> None:
    async def migrate_to_0005() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}")
        try:
            await upgrade(db, WALLET.migrations_dir, "0005")
        finally:
            await db.close()

    asyncio.run(migrate_to_0005())
    behind = migrate_tool(tmp_path, "--check", "wallet")
    assert behind.returncode == 1
    assert "is at revision 0005, this code needs" in behind.stderr, behind.stderr[-2000:]
    assert migrate_tool(tmp_path, "wallet").returncode == 0
    at_head = migrate_tool(tmp_path, "--check", "wallet")
    assert at_head.returncode == 0, at_head.stderr[-2000:]
    assert at_head.stdout.startswith("wallet: at the newest schema ("), at_head.stdout


def test_a_service_that_does_not_migrate_waits_for_the_migrate_job(tmp_path: Path) -> None:
    """Deployed with its migrate Job (applied at the same time), a service that starts first waits
    for the Job instead of stopping: the check passes once the database reaches head."""
    waiting = subprocess.Popen(
        [sys.executable, "-m", "tools.migrate", "--check", "wallet"],
        cwd=ROOT,
        env={**os.environ, "WALLET_DATA_DIR": str(tmp_path), "WALLET_MIGRATION_WAIT_SECONDS": "60"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "wallet.db").exists():  # the check has looked once
            assert waiting.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert migrate_tool(tmp_path, "wallet").returncode == 0  # the Job
        _, stderr = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, stderr[-2000:]
    assert "waiting up to 60s for it to be migrated" in stderr


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
    assert_wallet_at_head(tmp_path / "wallet.db")


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


def test_settings_that_are_never_valid_are_refused_and_a_misspelt_one_is_named() -> None:
    """A relay batch of 0 spun gifting at full CPU without a log line; a negative maturation
    period skipped the chargeback window; a typo left the default in force without a word."""
    refused: list[tuple[type[pydantic.BaseModel], str, int]] = [
        (GiftingSettings, "relay_batch_size", 0),
        (PayoutSettings, "maturation_days", -1),
    ]
    for settings_type, field, value in refused:
        with pytest.raises(pydantic.ValidationError) as caught:
            settings_type(**{field: value})
        prefix = str(settings_type.model_config.get("env_prefix", ""))
        (line,) = explain_settings(caught.value, "svc", prefix).splitlines()
        assert line.startswith(f"svc: {prefix}{field.upper()}={value}: Input should be greater")
    assert mistyped_settings(
        "payout",
        PayoutSettings,
        {"PAYOUT_MATURATION_DAY": "0", "PAYOUT_SERVICE_HOST": "10.0.0.1", "PATH": "/bin"},
    ) == [
        "payout: PAYOUT_MATURATION_DAY is not a setting (did you mean PAYOUT_MATURATION_DAYS?): ignored"
    ]


def test_a_service_says_the_rates_and_limits_it_runs_with() -> None:
    """Logged once at start ("payout runs with ..."): a changed rate or maturation period shows in
    the log, not only in the environment."""
    payout = PayoutSettings(
        diamonds_per_coin_denominator=4, maturation_days=0, withdrawal_fee_bps=250
    )
    said = payout.policy()
    assert "1 diamond(s) per 4 coin(s)" in said and "maturation 0 days" in said
    assert "fee 250 bps + $0.00" in said and "200 diamonds = $1.00" in said
    assert "coins sold in GB (GBP), US (USD)" in WalletSettings().policy()


def test_a_rule_across_settings_is_named_beside_a_refused_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic runs a rule across settings (payout's webhook secret off a dev PKI) only once every
    field is valid: with a bad fee beside it, only the fee was named, and the secret after the fee
    was fixed (verification G). Both are named at once."""
    monkeypatch.setenv("COINS_DEV_PKI", "false")
    monkeypatch.setenv("PAYOUT_WITHDRAWAL_FEE_BPS", "-5")
    monkeypatch.delenv("PAYOUT_PROCESSOR_WEBHOOK_SECRET", raising=False)
    lines = refused_settings(PayoutSettings, "payout")
    assert len(lines) == 2, lines
    assert (
        lines[0]
        == "payout: PAYOUT_WITHDRAWAL_FEE_BPS=-5: Input should be greater than or equal to 0"
    )
    assert lines[1].startswith(
        "payout: bad configuration: PAYOUT_PROCESSOR_WEBHOOK_SECRET is the public development default"
    ), lines


def test_shared_variables_are_named_as_set_and_no_refusal_hides_another() -> None:
    """COINS_* variables are shared by every service: a refusal names them as they are set (not
    WALLET_DEV_PKI, which no service reads), make up says each once, and a refused shared variable
    no longer hides the service's own refusals."""
    env = {
        **os.environ,
        "COINS_DEV_PKI": "maybe",
        "COINS_USER_RATE_BURST": "-3",
        "PAYOUT_WITHDRAWAL_FEE_BPS": "-5",
    }
    suite = python_module("tools.suite", env=env)
    assert suite.returncode == 1
    assert suite.stderr.strip().splitlines() == [
        "all services: COINS_DEV_PKI=maybe: Input should be a valid boolean, unable to interpret "
        "input",
        "all services: COINS_USER_RATE_BURST=-3: Input should be greater than 0",
        "payout: PAYOUT_WITHDRAWAL_FEE_BPS=-5: Input should be greater than or equal to 0",
        "the suite cannot start: fix the variables above",
    ], suite.stderr[-2000:]
    alone = python_module("services.payout", env=env)
    assert alone.returncode == 1
    assert "payout: COINS_DEV_PKI=maybe" in alone.stderr, alone.stderr[-2000:]
    assert "payout: PAYOUT_WITHDRAWAL_FEE_BPS=-5" in alone.stderr, alone.stderr[-2000:]
    assert "PAYOUT_DEV_PKI" not in alone.stderr and "Traceback" not in alone.stderr


def test_a_metrics_port_in_use_stops_the_service_naming_its_variable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = start_wallet(
            tmp_path, WALLET_METRICS_PORT=str(port), WALLET_DATA_DIR=str(tmp_path / "data")
        )
    assert done.returncode == 1
    assert f"wallet metrics: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
    assert "WALLET_METRICS_PORT" in done.stderr and "Traceback" not in done.stderr


def test_a_certificate_that_is_not_pem_is_named_not_taken_for_a_port_in_use(
    tmp_path: Path,
) -> None:
    """gRPC takes any bytes as a certificate and then fails to listen: that read as "the port is
    in use" (an operator review), sending the operator after the wrong problem."""
    from runtime import pki

    certs = tmp_path / "certs"
    pki.ensure_dev_pki(certs)
    (certs / "wallet.pem").write_text("garbage\n")
    done = start_wallet(tmp_path, COINS_DEV_PKI="false", WALLET_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 1
    assert f"{certs / 'wallet.pem'} is not a PEM certificate" in done.stderr, done.stderr[-2000:]
    assert "port is in use" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "wallet.db").exists(), "it migrated before finding it"
    pki.ensure_dev_pki(tmp_path / "other")  # a key that is not the certificate's
    (certs / "wallet.pem").write_bytes((tmp_path / "other" / "wallet.pem").read_bytes())
    done = start_wallet(tmp_path, COINS_DEV_PKI="false", WALLET_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 1
    assert f"{certs / 'wallet-key.pem'} is not the key of" in done.stderr, done.stderr[-2000:]


def test_make_up_exits_non_zero_when_a_service_cannot_start(tmp_path: Path) -> None:
    """A script or CI running `make up` learns that the suite did not start."""
    from tests.test_make_up import free_port_base

    done = subprocess.run(
        [sys.executable, "-m", "tools.suite"],
        cwd=tmp_path,
        env={
            **os.environ,
            "COINS_PORT_BASE": str(free_port_base()),
            "COINS_CERTS_DIR": str(tmp_path / "certs"),
            "WALLET_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/coins",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cannot reach PostgreSQL at 127.0.0.1:1" in done.stderr, done.stderr[-2000:]
    assert "wallet exited with code 1 while starting" in done.stderr, done.stderr[-2000:]


def test_a_service_stops_within_its_grace_when_the_trace_collector_is_down(
    tmp_path: Path,
) -> None:
    """The exporters retry an unreachable collector for 10 s per signal and flush: a review saw a
    stop take 18-25 s, past the 15 s an orchestrator allows before it kills. The last telemetry
    gets a bounded wait (runtime.telemetry.flush_within); the stop says what was lost."""
    import signal
    import socket

    from runtime.telemetry import TELEMETRY_FLUSH_SECONDS

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        collector = closed.getsockname()[1]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        health_port = free.getsockname()[1]
    wallet = subprocess.Popen(
        [sys.executable, "-m", "services.wallet"],
        cwd=ROOT,
        env={
            **os.environ,
            "COINS_CERTS_DIR": str(tmp_path / "certs"),
            "WALLET_DATA_DIR": str(tmp_path / "data"),
            "WALLET_PORT": "0",
            "WALLET_HEALTH_PORT": str(health_port),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector}",
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        from tools.suite import _serving

        deadline = time.monotonic() + 60
        while not _serving(f"127.0.0.1:{health_port}"):
            assert wallet.poll() is None and time.monotonic() < deadline, "the wallet did not start"
            time.sleep(0.2)
        wallet.send_signal(signal.SIGTERM)
        began = time.monotonic()
        _, stderr = wallet.communicate(timeout=60)
        took = time.monotonic() - began
    finally:
        if wallet.poll() is None:
            wallet.kill()
    grace = 5.0  # WALLET_GRACE_SECONDS' default; nothing is in flight, so it is not waited out
    assert wallet.returncode == 0, stderr[-2000:]
    assert took < grace + 2 * TELEMETRY_FLUSH_SECONDS + 3, f"stopped after {took:.1f}s"
    assert "spans and metrics not exported within" in stderr, stderr[-2000:]


def test_a_downstream_address_that_is_no_address_is_refused_and_an_unknown_exporter_named() -> None:
    """`GIFTING_WALLET_ADDRESS="not a host::"` started, answered SERVING and failed every gift;
    `OTEL_TRACES_EXPORTER=jaeger` exported nothing without a word (an operator review)."""
    from runtime.startup import refused_settings, unknown_exporters

    env = {**os.environ, "GIFTING_WALLET_ADDRESS": "not a host::"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert refused_settings(GiftingSettings, "gifting") == [
            "gifting: bad configuration: GIFTING_WALLET_ADDRESS='not a host::' is not an address: "
            "write host:port, dns:///name:port or ipv4:host:port,host:port"
        ]
        patch.setenv("GIFTING_WALLET_ADDRESS", "localhost:99999")  # no such port
        assert len(refused_settings(GiftingSettings, "gifting")) == 1
        for good in ("wallet:50051", "dns:///wallet:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"):
            patch.setenv("GIFTING_WALLET_ADDRESS", good)
            assert GiftingSettings().wallet_address == good
    assert unknown_exporters("wallet", {"OTEL_TRACES_EXPORTER": "jaeger"}) == [
        "wallet: OTEL_TRACES_EXPORTER=jaeger is not an exporter this service has "
        "(otlp, console, none): it exports none"
    ]
    assert unknown_exporters("wallet", {"OTEL_TRACES_EXPORTER": "otlp"}) == []


async def test_a_database_that_refuses_connections_is_one_line_for_the_service_and_the_audit(
    tmp_path: Path,
) -> None:
    """A database that takes no connections (ALLOW_CONNECTIONS false, max_connections reached):
    the service stops with one line naming it, and the cross audit says it cannot read the books
    (exit 2), not that they differ (review r16: ~100 lines of traceback, and exit 1 from the
    audit, which would page for a money difference in a connection storm)."""
    await require_postgres()
    name = f"coins_test_refusing_{uuid.uuid4().hex[:8]}"
    url = (await create_pg_database(name)).replace("+asyncpg", "")
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        started = start_wallet(tmp_path, WALLET_DATABASE_URL=url)
        audited = python_module(
            "tools.cross_audit",
            env={**os.environ, "COINS_DATA_DIR": str(tmp_path), "WALLET_DATABASE_URL": url}
            | {f"{svc}_DATABASE_URL": url for svc in ("GIFTING", "PAYOUT", "PROMOTION")},
        )
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        await drop_pg_database(name)
    assert started.returncode == 1
    assert "refuses connections to the database in WALLET_DATABASE_URL" in started.stderr, (
        started.stderr[-2000:]
    )
    assert "Traceback" not in started.stderr, started.stderr[-2000:]
    assert audited.returncode == 2, audited.stderr[-2000:]
    assert "cannot read the books" in audited.stderr and "Traceback" not in audited.stderr, (
        audited.stderr[-2000:]
    )


def test_a_database_out_of_connections_is_one_line_naming_the_limit() -> None:
    """PostgreSQL at max_connections (replicas open up to twice DATABASE_CONNECTIONS each): a
    replica starting then stopped with ~70 lines of traceback (a review's), as the error is
    an outage to a running service, not a refusal `explain` knew."""
    full = asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")
    wrapped = sa_exc.OperationalError("connect", {}, full)
    settings = WalletSettings(database_url="postgresql://postgres@db.example:5432/wallet")
    for error in (full, wrapped):
        said = explain(error, "wallet", settings)
        assert said is not None
        assert "has no connection left" in said and "max_connections" in said
        assert "WALLET_DATABASE_CONNECTIONS" in said
