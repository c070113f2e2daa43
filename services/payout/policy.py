"""The conversion policy, as pure integer arithmetic: coins -> diamonds -> cash, and the withdrawal fee.

Rounding never creates or loses value: diamonds are floor(coins received x rate) over all the coins
received at the rate in force (from when it came in), so the fraction a single cheap gift earns is
carried into the next gift; cash is paid in whole minor units and the
diamonds that would make a fraction of a cent stay with the creator.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.payout.settings import PayoutSettings

Segment = tuple[int, int]
"""Where a creator's current rate began: (coins received, diamonds credited) then."""


def diamonds_owed(
    total_coins_received: int, settings: PayoutSettings, segment: Segment = (0, 0)
) -> int:
    """Diamonds a creator has earned in total from `total_coins_received` coins of gifts: what was
    credited when the rate in force began, and that rate on every coin received since."""
    return owed_at(total_coins_received, rate(settings), segment)


def owed_at(total_coins_received: int, rate_: tuple[int, int], segment: Segment) -> int:
    """`diamonds_owed` at a given (numerator, denominator) rate: a creator's stored one."""
    (numerator, denominator), (coins_at, diamonds_at) = rate_, segment
    return diamonds_at + (total_coins_received - coins_at) * numerator // denominator


def rate(settings: PayoutSettings) -> tuple[int, int]:
    return settings.diamonds_per_coin_numerator, settings.diamonds_per_coin_denominator


def segment_for(
    stored_rate: tuple[int, int] | None,
    stored_segment: Segment,
    coins_received: int,
    diamonds_credited: int,
    settings: PayoutSettings,
) -> Segment:
    """The segment the next coins convert in, for a creator with `coins_received` and
    `diamonds_credited` so far. The rate in force continues its segment; a changed rate starts a new
    one here, so it applies to coins received from now on and never takes back or adds to diamonds
    already credited (the fraction of a diamond the old rate had not paid yet is the platform's, as
    each credit's platform share already counted it). A creator with no rate stored yet (credited
    before rates were kept) continues from the beginning if the current rate explains what they
    were credited, and starts a new segment otherwise."""
    if stored_rate == rate(settings):
        return stored_segment
    if stored_rate is None and diamonds_owed(coins_received, settings) == diamonds_credited:
        return (0, 0)
    return (coins_received, diamonds_credited)


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
