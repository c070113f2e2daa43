"""`python -m tools.migrate [SERVICE ...]`: bring services' databases to the newest schema, for a
deployment that starts its services with `<SVC>_MIGRATE_ON_START=false` (a Kubernetes Job before a
rollout). Reads the same settings as the services (`<SVC>_DATABASE_URL`, ...); idempotent."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sqlalchemy.engine import make_url

from runtime import migrations, startup
from runtime.db import Database
from runtime.server import ServiceSpec
from runtime.telemetry import configure_logging
from services.gifting.service import SPEC as GIFTING
from services.payout.service import SPEC as PAYOUT
from services.promotion.service import SPEC as PROMOTION
from services.wallet.service import SPEC as WALLET

SPECS: dict[str, ServiceSpec[Any]] = {
    spec.name: spec for spec in (WALLET, GIFTING, PAYOUT, PROMOTION)
}


async def migrate(names: list[str]) -> None:
    for name in names:
        spec = SPECS[name]
        settings = spec.settings_type()
        # Alembic's "Running upgrade ..." lines look like the service's own (a service that
        # migrates on start runs this in a child process: runtime.server.main).
        flush_logs = configure_logging(name, settings.log_level, settings.log_format)
        db: Database | None = None
        try:
            db = Database(settings.resolved_database_url())  # refuses a URL it cannot use
            await migrations.upgrade(db, spec.migrations_dir)
        except Exception as error:
            why = startup.explain(error, name, settings)
            if why is None:
                raise
            raise SystemExit(why) from None
        finally:
            if db is not None:
                await db.close()
            flush_logs()
        where = make_url(settings.resolved_database_url()).render_as_string(hide_password=True)
        print(f"{name}: migrated to the newest schema ({where})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.migrate", description=__doc__)
    parser.add_argument(
        "services", nargs="*", metavar="SERVICE", help=f"any of {', '.join(SPECS)} (default: all)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.services) - set(SPECS))
    if unknown:
        parser.error(f"unknown services {unknown}: choose from {', '.join(SPECS)}")
    asyncio.run(migrate(args.services or list(SPECS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
