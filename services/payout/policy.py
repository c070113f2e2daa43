"""The conversion policy, as pure integer arithmetic: coins -> diamonds -> cash, and the withdrawal fee.

Rounding never creates or loses value: diamonds are always floor(total coins received x rate), so the
fraction a single cheap gift earns is carried into the next gift; cash is paid in whole minor units and the
diamonds that would make a fraction of a cent stay with the creator.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.payout.settings import PayoutSettings


def diamonds_owed(total_coins_received: int, settings: PayoutSettings) -> int:
    """Diamonds a creator has earned in total from `total_coins_received` coins of gifts."""
    return (
        total_coins_received
        * settings.diamonds_per_coin_numerator
        // settings.diamonds_per_coin_denominator
    )


@dataclass(frozen=True)
class Quote:
    """What a withdrawal of some diamonds pays."""

    diamonds: int
    """Diamonds actually taken: the requested ones less any that would make a fraction of a minor unit."""
    gross_minor: int
    fee_minor: int

    @property
    def net_minor(self) -> int:
        return self.gross_minor - self.fee_minor


def quote(diamonds_requested: int, settings: PayoutSettings) -> Quote:
    gross = diamonds_requested // settings.diamonds_per_minor_unit
    # The fee is rounded up (in the platform's favour by under one minor unit; it is never negative).
    proportional = -(-gross * settings.withdrawal_fee_bps // 10_000)
    fee = min(gross, settings.withdrawal_fee_fixed_minor + proportional)
    return Quote(gross * settings.diamonds_per_minor_unit, gross, fee)


def cash_value(diamonds: int, settings: PayoutSettings) -> int:
    return diamonds // settings.diamonds_per_minor_unit
