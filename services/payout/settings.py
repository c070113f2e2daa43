"""Payout configuration (environment variables prefixed PAYOUT_). All of it is policy, not code."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from ledger.api import LedgerServiceSettings
from runtime.protos import money_text

_MICROS_PER_MINOR_UNIT = 10_000
"""Millionths of a currency unit in one minor unit (cents: two decimals)."""
DEV_WEBHOOK_SECRET = "dev-payout-webhook-secret"
"""The webhook secret of a development suite: public (it is in this file), so anyone could sign a
processor callback with it."""
MIN_WEBHOOK_SECRET_BYTES = 16
"""The shortest webhook secret payout starts with off a dev PKI (HMAC-SHA256 keys of 32 random
bytes are the norm: `openssl rand -hex 32`)."""


class PayoutSettings(LedgerServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PAYOUT_", extra="ignore")
    service_name: ClassVar[str] = "payout"

    diamonds_per_coin_numerator: PositiveInt = 1
    diamonds_per_coin_denominator: PositiveInt = 2
    """A creator earns floor(coins received x 1/2) diamonds: 2 coins = 1 diamond (the platform keeps ~50%)."""
    diamonds_per_minor_unit: PositiveInt = 2
    """2 diamonds = 1 cent, so 200 diamonds = $1 and 1 diamond = $0.005."""
    coin_value_micros: PositiveInt = 9_900
    """What a coin is worth on the books, in millionths of the currency: $0.0099 (100 coins =
    $0.99, the platform's own coin rate). A gift's value is its coins at this; the platform's
    revenue from it is that less its creator's diamonds' value (each kept with the gift)."""
    currency_code: str = "USD"
    min_withdrawal_minor: NonNegativeInt = 1000
    """$10.00: smaller withdrawals are refused (BELOW_MINIMUM)."""
    daily_withdrawal_cap_minor: NonNegativeInt = 100_000
    """$1,000.00 per creator per calendar day in the creator's time zone (set with their
    verification; UTC by default): DAILY_LIMIT_EXCEEDED."""
    auto_approve_max_minor: NonNegativeInt = 10_000
    """Withdrawals are approved at once while the creator's day (the daily cap's calendar day) totals
    at most $100.00 with them (verified creators: all are); beyond, a reviewer decides
    (ReviewWithdrawal). 0: every withdrawal is reviewed."""
    withdrawal_fee_bps: int = Field(default=0, ge=0, le=10_000)
    withdrawal_fee_fixed_minor: int = Field(default=0, ge=0)
    """The platform charges no fee by default; both are configurable (a negative fee would pay out
    more than the diamonds are worth)."""
    processor: Literal["sandbox"] = "sandbox"
    """The payout processor adapter. Only the local PayPal-like sandbox exists: no real money moves."""
    sandbox_file: Path | None = None
    """Where the sandbox processor keeps its records (default `<data_dir>/sandbox-payouts.sqlite3`):
    shared by every payout process on the machine and kept across restarts, like a real processor's."""
    processor_latency_ms: NonNegativeInt = 50
    """Sandbox: how long each processor call takes."""
    processor_settle_ms: NonNegativeInt = 200
    """Sandbox: how long after submission an item succeeds or fails."""
    processor_unclaimed_return_ms: NonNegativeInt = 2_000
    """Sandbox: how long an unclaimed item (receiver `unclaimed…`) waits before it is returned; a paid
    item to a receiver `returned…` is returned after this long too."""
    processor_callback_delay_ms: NonNegativeInt = 300
    """Sandbox: each callback is delivered after a random delay up to this (so out of order)."""
    processor_duplicate_callback_percent: int = Field(default=20, ge=0, le=100)
    """Sandbox: the share of callbacks delivered twice."""
    processor_webhook_secret: SecretStr = SecretStr(DEV_WEBHOOK_SECRET)
    """The HMAC-SHA256 key processor callbacks are signed with. The default is public: off a dev
    PKI (COINS_DEV_PKI=false, a real deployment) payout refuses to start on it, or on one shorter
    than MIN_WEBHOOK_SECRET_BYTES (`_webhook_secret_is_private`)."""
    processor_timeout_seconds: PositiveFloat = 10.0
    """How long one processor call may take before it counts as failed and is retried later."""
    processor_max_backoff_seconds: PositiveFloat = 300.0
    """The longest pause between two attempts on one withdrawal."""
    processor_max_attempts: PositiveInt = 20
    """Failed attempts after which a withdrawal is parked for an admin (RetryWithdrawal)."""
    processor_calls_at_once: PositiveInt = 8
    """Processor calls side by side (one hung call never holds up the others)."""
    processor_batch_size: PositiveInt = 50
    """Withdrawals sent to the processor in one payout batch."""
    processor_poll_seconds: PositiveFloat = 30.0
    """How often a withdrawal still processing is looked up at the processor (callbacks are the fast
    path; polling finds what a lost callback never said)."""
    return_watch_days: NonNegativeFloat = 30.0
    """How long after it was paid a withdrawal is still looked up at the processor, for a return
    whose callback was lost (the sandbox's callbacks die with the process that sends them; PayPal
    returns an unclaimed payment after 30 days). 0: returns arrive by callback only."""
    return_poll_seconds: PositiveFloat = 3600.0
    """How often a paid withdrawal is looked up for a return while it is watched."""
    reconcile_every_seconds: float = Field(default=3600.0, gt=0)
    """How often the reconciliation job compares the processor's records with ours."""
    reconcile_window_hours: PositiveFloat = 72.0
    """Withdrawals sent in this window (and the processor's items of it) are compared."""
    reconcile_grace_seconds: NonNegativeFloat = 300.0
    """A processor outcome younger than this is not yet a mismatch (its callback may be on its way)."""
    processor_event_retention_days: PositiveFloat = 30.0
    """How long a processor callback's id is kept to recognise a redelivery (PayPal redelivers for
    up to 3 days; one redelivered later than this is looked up again, which changes nothing)."""
    maturation_days: NonNegativeFloat = 15.0
    """Credited diamonds stay *pending* this long (the chargeback window) before they become
    *available* to withdraw; 0: available at once."""
    maturation_every_seconds: PositiveFloat = 60.0
    """How often the maturation sweep moves due diamonds from pending to available."""
    maturation_batch: int = Field(default=2000, ge=1)
    """Gift credits matured, and debtors looked at for repayment, per sweep transaction (a backlog
    drains in several)."""
    credit_batches_at_once: int = Field(default=2, ge=1)
    """Credit batches applied at the same time; more wait their turn. Batches lock the same creators'
    rows, so more at once only queue inside PostgreSQL, holding connections and memory: measured
    (500-credit batches over 200 creators, 16 in flight) 2 at once gave 29-30 batches/s at 19 ms
    of PostgreSQL CPU per batch, 4 at once 25/s at 29 ms."""
    policy_version: str = "2026-11"

    def policy(self) -> str:
        def cash(minor: int) -> str:
            return money_text(self.currency_code, minor)

        return (
            f"{self.diamonds_per_coin_numerator} diamond(s) per {self.diamonds_per_coin_denominator}"
            f" coin(s), {self.diamonds_per_minor_unit * 100} diamonds = {cash(100)}, maturation "
            f"{self.maturation_days:g} days, withdrawals from {cash(self.min_withdrawal_minor)}, "
            f"approved at once up to {cash(self.auto_approve_max_minor)} a day, at most "
            f"{cash(self.daily_withdrawal_cap_minor)} a day, fee {self.withdrawal_fee_bps} bps + "
            f"{cash(self.withdrawal_fee_fixed_minor)}, policy {self.policy_version}"
        )

    @property
    def diamond_value_micros(self) -> int:
        """What a diamond is worth, in millionths: a minor unit over the diamonds it takes (exact:
        the setting must divide 10,000, see `_coins_have_value`)."""
        return _MICROS_PER_MINOR_UNIT // self.diamonds_per_minor_unit

    @model_validator(mode="after")
    def _coins_have_value(self) -> PayoutSettings:
        if self.coin_value_micros <= 0:
            raise ValueError("PAYOUT_COIN_VALUE_MICROS must be positive")
        if self.diamonds_per_minor_unit <= 0:
            raise ValueError("PAYOUT_DIAMONDS_PER_MINOR_UNIT must be positive")
        if _MICROS_PER_MINOR_UNIT % self.diamonds_per_minor_unit:
            raise ValueError(
                f"PAYOUT_DIAMONDS_PER_MINOR_UNIT={self.diamonds_per_minor_unit} must divide 10000 "
                "(e.g. 1, 2, 4, 5, 8, 10, 20, 25, 50, 100), so a diamond's value is a whole number "
                "of millionths: otherwise the books value diamonds below what withdrawals pay and "
                "overstate the platform's share"
            )
        if self.diamonds_per_coin_numerator <= 0 or self.diamonds_per_coin_denominator <= 0:
            raise ValueError("PAYOUT_DIAMONDS_PER_COIN_NUMERATOR and _DENOMINATOR must be positive")
        smallest = max(self.min_withdrawal_minor, 1)
        fee = self.withdrawal_fee_fixed_minor + -(-smallest * self.withdrawal_fee_bps // 10_000)
        if fee >= smallest:
            raise ValueError(
                f"the fee on the smallest withdrawal (PAYOUT_MIN_WITHDRAWAL_MINOR={smallest}) is "
                f"{fee} (PAYOUT_WITHDRAWAL_FEE_FIXED_MINOR={self.withdrawal_fee_fixed_minor}, "
                f"PAYOUT_WITHDRAWAL_FEE_BPS={self.withdrawal_fee_bps}): it must pay the creator "
                "something, so raise the minimum or lower the fee"
            )
        if self.daily_withdrawal_cap_minor < smallest:
            raise ValueError(
                f"PAYOUT_DAILY_WITHDRAWAL_CAP_MINOR={self.daily_withdrawal_cap_minor} is below "
                f"the smallest withdrawal ({smallest}, PAYOUT_MIN_WITHDRAWAL_MINOR="
                f"{self.min_withdrawal_minor}): no withdrawal could ever be made (each would be "
                "refused DAILY_LIMIT_EXCEEDED), so raise the cap or lower the minimum"
            )
        return self

    @model_validator(mode="after")
    def _webhook_secret_is_private(self) -> PayoutSettings:
        """Off a dev PKI, a webhook secret anyone knows (the public default) or could guess (empty,
        short) would let them forge processor callbacks: a "failed" after a real "paid" gives back
        the diamonds that were paid out. Said without the secret's value."""
        if self.security.dev_pki:
            return self
        # Judged without the spaces or line break around it (a Secret made from a file often
        # ends with a newline): the default with a newline is still the default.
        given = self.processor_webhook_secret.get_secret_value()
        secret = given.strip()
        padded = " (with spaces or a line break around it)" if secret != given else ""
        if secret == DEV_WEBHOOK_SECRET:
            problem = f"the public development default{padded}"
        elif not secret:
            problem = "empty" if not given else "only spaces or line breaks"
        elif len(secret.encode()) < MIN_WEBHOOK_SECRET_BYTES:
            problem = f"{len(secret.encode())} bytes long{padded}"
        else:
            return self
        raise ValueError(
            f"PAYOUT_PROCESSOR_WEBHOOK_SECRET is {problem}, and with COINS_DEV_PKI=false (a real "
            "deployment) a forged processor callback signed with it would be believed: set it to "
            f"the secret the processor signs its webhooks with, at least {MIN_WEBHOOK_SECRET_BYTES} bytes (e.g. "
            "`openssl rand -hex 32`)"
        )
