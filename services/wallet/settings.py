"""Wallet configuration (environment variables prefixed WALLET_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from runtime.config import ServiceSettings


class WalletSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="WALLET_", extra="ignore")
    service_name: ClassVar[str] = "wallet"

    port: int = 50051
    health_port: int = 50061
    regions: dict[str, str] = {"US": "USD", "GB": "GBP"}
    """Countries where coins are sold, and the currency each buys in (JSON in WALLET_REGIONS)."""
    minimum_age: int = 18
    payment_latency_ms: int = 20
    """Simulated latency of the sandbox payment provider."""
    hold_sweep_seconds: float = 5.0
    """How often holds past their expiry are released."""
    policy_version: str = "2026-11"
    """Recorded on every ledger transaction: which pricing policy was in force."""
