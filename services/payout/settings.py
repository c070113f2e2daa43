"""Payout configuration (environment variables prefixed PAYOUT_). All of it is policy, not code."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from ledger.api import LedgerServiceSettings


class PayoutSettings(LedgerServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PAYOUT_", extra="ignore")
    service_name: ClassVar[str] = "payout"

    port: int = 50053
    health_port: int = 50063
    diamonds_per_coin_numerator: int = 1
    diamonds_per_coin_denominator: int = 2
    """A creator earns floor(coins received x 1/2) diamonds: 2 coins = 1 diamond (the platform keeps ~50%)."""
    diamonds_per_minor_unit: int = 2
    """2 diamonds = 1 cent, so 200 diamonds = $1 and 1 diamond = $0.005."""
    currency_code: str = "USD"
    min_withdrawal_minor: int = 1000
    """$10.00: smaller withdrawals are refused (BELOW_MINIMUM)."""
    daily_withdrawal_cap_minor: int = 100_000
    """$1,000.00 per creator per UTC calendar day (DAILY_LIMIT_EXCEEDED)."""
    withdrawal_fee_bps: int = 0
    withdrawal_fee_fixed_minor: int = 0
    """The platform charges no fee by default; both are configurable."""
    processor_latency_ms: int = 50
    processor_timeout_seconds: float = 10.0
    """How long one processor call may take before it counts as failed and is retried later."""
    processor_max_backoff_seconds: float = 300.0
    """The longest pause between two attempts to pay one withdrawal."""
    processor_calls_at_once: int = 8
    """Withdrawals paid side by side (one hung call never holds up the others)."""
    maturation_days: float = 15.0
    """Credited diamonds stay *pending* this long (the chargeback window) before they become
    *available* to withdraw; 0: available at once."""
    maturation_every_seconds: float = 60.0
    """How often the maturation sweep moves due diamonds from pending to available."""
    maturation_batch: int = 2000
    """Gift credits matured per sweep transaction (a backlog drains in several)."""
    credit_batches_at_once: int = 4
    """Credit batches applied at the same time; more wait their turn. Batches lock the same creators'
    rows, so more at once only queue inside PostgreSQL, holding connections and memory."""
    policy_version: str = "2026-11"
