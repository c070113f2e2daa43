"""Promotion configuration (environment variables prefixed PROMOTION_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import PositiveFloat
from pydantic_settings import SettingsConfigDict

from runtime.config import ServiceSettings


class PromotionSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PROMOTION_", extra="ignore")
    service_name: ClassVar[str] = "promotion"

    wallet_address: str = ""
    """Where the wallet listens: host:port, dns:///name:port (every replica the name resolves to)
    or ipv4:host:port,host:port (a list of replicas); empty: this suite's (COINS_PORT_BASE + 1)."""
    reconcile_every_seconds: PositiveFloat = 30.0
    reconcile_after_seconds: PositiveFloat = 60.0
    """Promotions still pending after this (a crash or a lost wallet answer mid-create) are settled
    by asking the wallet what became of their budget hold."""
