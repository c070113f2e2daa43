"""Settings from environment variables (pydantic-settings), shared by every service.

Each service subclasses ServiceSettings with its own prefix: WALLET_PORT, GIFTING_DATABASE_URL,
PAYOUT_MIN_WITHDRAWAL_MINOR, ... Defaults run the whole suite on one machine with SQLite files.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every service can be told: where to listen, where its database is, how to behave under load."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: ClassVar[str]

    host: str = "127.0.0.1"
    port: int = 0
    database_url: str = ""
    """SQLAlchemy async URL; empty means a SQLite file `<data_dir>/<service>.db`."""
    data_dir: Path = Path("data")
    migrate_on_start: bool = True
    reflection: bool = True
    grace_seconds: float = 5.0
    max_concurrent_rpcs: int = 2000
    max_message_bytes: int = 1024 * 1024
    log_level: str = "INFO"
    downstream_timeout_seconds: float = 5.0
    """Deadline for a call to another service when the incoming call carries none."""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{self.service_name}.db').resolve()}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
