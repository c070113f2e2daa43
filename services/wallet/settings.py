"""Wallet configuration (environment variables prefixed WALLET_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic_settings import SettingsConfigDict

from ledger.api import LedgerServiceSettings


class WalletSettings(LedgerServiceSettings):
    model_config = SettingsConfigDict(env_prefix="WALLET_", extra="ignore")
    service_name: ClassVar[str] = "wallet"

    regions: dict[str, str] = {"US": "USD", "GB": "GBP"}
    """Countries where coins are sold, and the currency each buys in (JSON in WALLET_REGIONS)."""
    minimum_age: NonNegativeInt = 18
    """The minimum age to buy coins, send and receive gifts..."""
    minimum_age_by_country: dict[str, int] = {"KR": 19}
    """...except where a country sets another (JSON in WALLET_MINIMUM_AGE_BY_COUNTRY)."""
    eligibility_cache_seconds: NonNegativeFloat = 60.0
    """How long a process remembers a user as eligible for gifts (so the hot path reads nothing);
    a new classification (SetAccountClassification) takes effect within this."""
    payment_latency_ms: NonNegativeInt = 20
    """Simulated latency of the sandbox payment provider."""
    sandbox_payments_file: Path | None = None
    """Where the sandbox payment provider records its charges (default
    `<data_dir>/sandbox-payments.sqlite3`): like a real provider, it remembers them across wallet
    restarts and replicas."""
    payment_timeout_seconds: PositiveFloat = 10.0
    """How long one call to the payment provider may take; the outcome of one that timed out is
    settled under the purchase's key (a retry, or the reconciler, which voids a charge never made).
    Keep it well under WALLET_RECONCILE_AFTER_SECONDS."""
    reconcile_every_seconds: PositiveFloat = 30.0
    reconcile_after_seconds: NonNegativeFloat = 120.0
    """Purchases pending longer than this are finished by asking the provider (a crash, a lost answer)."""
    hold_sweep_seconds: PositiveFloat = 5.0
    """How often holds past their expiry are released."""
    policy_version: str = "2026-11"
    """Recorded on every ledger transaction: which pricing policy was in force."""
    custom_min_coins: PositiveInt = 30
    custom_max_coins: PositiveInt = 2_500_000
    custom_price_per_100_coins_minor: dict[str, int] = {"US": 143, "GB": 129}
    """Custom amounts (web): price per 100 coins by region, in its currency's minor units."""
    # Purchase limits, per user over rolling windows (money in the account's currency's minor units),
    # and per payment method (provider token) over 24 hours. Pending and completed purchases count.
    limit_hourly_coins: NonNegativeInt = 50_000
    limit_daily_coins: NonNegativeInt = 200_000
    limit_hourly_minor: NonNegativeInt = 50_000
    limit_daily_minor: NonNegativeInt = 100_000
    limit_payment_method_daily_minor: NonNegativeInt = 150_000

    def policy(self) -> str:
        sold = ", ".join(f"{c} ({m})" for c, m in sorted(self.regions.items()))
        ages = "".join(f", {a} in {c}" for c, a in sorted(self.minimum_age_by_country.items()))
        return (
            f"coins sold in {sold}; from age {self.minimum_age}{ages}; a user buys at most "
            f"{self.limit_hourly_coins:,} coins an hour and {self.limit_daily_coins:,} a day, "
            f"{self.limit_hourly_minor:,} and {self.limit_daily_minor:,} minor units, a card "
            f"{self.limit_payment_method_daily_minor:,} a day; policy {self.policy_version}"
        )
