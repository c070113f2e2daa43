"""`python -m tools.migrate [SERVICE ...]`: bring services' databases to the newest schema, for a
deployment that starts its services with `<SVC>_MIGRATE_ON_START=false` (a Kubernetes Job before a
rollout). Reads the same settings as the services (`<SVC>_DATABASE_URL`, ...); idempotent.

`--check`: change nothing; fail with one line per service whose database is behind the code (a
service started with `<SVC>_MIGRATE_ON_START=false` runs this first, see runtime.server.main)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

from sqlalchemy.engine import make_url

from runtime import migrations, startup
from runtime.db import Database
from runtime.server import ServiceSpec
from runtime.telemetry import TELEMETRY_FLUSH_SECONDS, configure_logging, flush_within
from services.gifting.service import SPEC as GIFTING
from services.payout.service import SPEC as PAYOUT
from services.promotion.service import SPEC as PROMOTION
from services.wallet.service import SPEC as WALLET

log = logging.getLogger("coins.migrate")

SPECS: dict[str, ServiceSpec[Any]] = {
    spec.name: spec for spec in (WALLET, GIFTING, PAYOUT, PROMOTION)
}


async def migrate(names: list[str], *, check: bool = False) -> None:
    # Every service's settings first: a refused one stops the job before it migrates any database
    # (it migrated the services before it and left the ones after it behind).
    refused = [
        line for name in names for line in startup.refused_settings(SPECS[name].settings_type, name)
    ]
    if refused:
        raise SystemExit("\n".join(refused))
    for name in names:
        spec = SPECS[name]
        settings = spec.settings_type()
        # Its lines look like the service's own (a service that migrates on start runs this in a
        # child process: runtime.server.main); alembic's line per revision (some 20 per service
        # on a first start) gives way to one line saying from where to where.
        flush_logs = configure_logging(name, settings.log_level, settings.log_format)
        logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
        db: Database | None = None
        lag: tuple[str | None, str] | None = None
        try:
            db = Database(settings.resolved_database_url())  # refuses a URL it cannot use
            if check:
                lag = await _wait_until_migrated(name, db, spec, settings.migration_wait_seconds)
            else:
                lag = await migrations.behind(db, spec.migrations_dir)
                await migrations.upgrade(db, spec.migrations_dir)
        except Exception as error:
            why = startup.explain(error, name, settings)
            if why is None:
                raise
            raise SystemExit(why) from None
        finally:
            if db is not None:
                await db.close()
            flush_within(TELEMETRY_FLUSH_SECONDS, "log records", flush_logs)
        where = make_url(settings.resolved_database_url()).render_as_string(hide_password=True)
        if not check or lag is None:
            moved = f" from {lag[0] or 'an empty database'} to {lag[1]}" if lag is not None else ""
            done = (
                f"{name}: migrated to the newest schema{moved} ({where})"
                if not check
                else f"{name}: at the newest schema ({where})"
            )
            if settings.log_format == "json":  # one JSON object per line, as the service's own
                log.info("%s", done, extra={"fields": {"revision": lag[1] if lag else "unchanged"}})
            else:
                print(done)
        else:
            current, head = lag
            raise SystemExit(
                f"{name}: the database ({where}) is "
                f"{'not migrated' if current is None else f'at revision {current}'}, this code "
                f"needs {head}: run `python -m tools.migrate {name}` first (or start it with "
                f"{name.upper()}_MIGRATE_ON_START=true; waited "
                f"{name.upper()}_MIGRATION_WAIT_SECONDS={settings.migration_wait_seconds:g}s)"
            )


async def _wait_until_migrated(
    name: str, db: Database, spec: ServiceSpec[Any], seconds: float
) -> tuple[str | None, str] | None:
    """Whether the database is behind the code, after waiting up to `seconds` for someone else
    (the migrate Job) to migrate it."""
    deadline = time.monotonic() + seconds
    lag = await migrations.behind(db, spec.migrations_dir)
    if lag is not None and seconds > 0:
        log.info(
            "%s: the database is %s, this code needs %s: waiting up to %.0fs for it to be migrated",
            name,
            "not migrated" if lag[0] is None else f"at revision {lag[0]}",
            lag[1],
            seconds,
        )
    while lag is not None and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        lag = await migrations.behind(db, spec.migrations_dir)
    return lag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.migrate", description=__doc__)
    parser.add_argument(
        "services", nargs="*", metavar="SERVICE", help=f"any of {', '.join(SPECS)} (default: all)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing: fail if a database is behind the code (with what to run), after "
        "waiting up to <SVC>_MIGRATION_WAIT_SECONDS for a migration under way",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.services) - set(SPECS))
    if unknown:
        parser.error(f"unknown services {unknown}: choose from {', '.join(SPECS)}")
    asyncio.run(migrate(args.services or list(SPECS), check=args.check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
