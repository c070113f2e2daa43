"""The conversion policy's arithmetic never creates or loses value (property-based)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.payout.policy import diamonds_owed, quote, segment_for
from services.payout.settings import PayoutSettings

DEFAULT = PayoutSettings()
gifts = st.lists(st.integers(min_value=1, max_value=44_999 * 100), max_size=200)


@given(gifts)
def test_diamonds_credited_gift_by_gift_add_up_to_the_total(gift_coins: list[int]) -> None:
    credited = 0
    total = 0
    for coins in gift_coins:
        total += coins
        delta = diamonds_owed(total, DEFAULT) - credited
        assert delta >= 0
        credited += delta
    assert credited == total // 2  # the creator's half, rounded down once over everything
    assert total - 2 * credited in (0, 1)  # at most half a diamond (one coin) not yet credited


@given(
    st.integers(min_value=1, max_value=10**9),
    st.integers(min_value=0, max_value=9_999),
    st.integers(min_value=0, max_value=500),
    st.sampled_from([d for d in range(1, 10_001) if 10_000 % d == 0]),
)
def test_a_withdrawal_quote_pays_exactly_what_it_takes(
    requested: int, fee_bps: int, fee_fixed: int, diamonds_per_minor: int
) -> None:
    settings = PayoutSettings(
        withdrawal_fee_bps=fee_bps,
        withdrawal_fee_fixed_minor=fee_fixed,
        diamonds_per_minor_unit=diamonds_per_minor,
        min_withdrawal_minor=10**7,  # high enough that every fee above leaves the minimum paying
        daily_withdrawal_cap_minor=10**7,
    )
    q = quote(requested, settings)
    assert q.diamonds <= requested
    assert requested - q.diamonds < diamonds_per_minor  # only a fraction of a cent stays behind
    assert q.gross_minor * diamonds_per_minor == q.diamonds  # the cash is exactly their value
    assert q.diamonds * settings.diamond_value_micros == q.gross_minor * 10_000  # and their books
    assert 0 <= q.fee_minor <= q.gross_minor
    assert q.net_minor + q.fee_minor == q.gross_minor


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=10_000),  # a gift's coins
            st.sampled_from([(1, 2), (1, 3), (2, 5), (1, 1)]),  # the rate in force for it
        ),
        max_size=60,
    )
)
def test_a_changed_rate_never_takes_back_or_adds_to_what_was_credited(
    gifts_and_rates: list[tuple[int, tuple[int, int]]],
) -> None:
    """Gift by gift under rates that change: every share is >= 0, and the diamonds credited are
    those of each rate's own segment of coins (segment_for/diamonds_owed, as payout applies them)."""
    received = credited = 0
    stored_rate: tuple[int, int] | None = None
    segment = (0, 0)
    expected = 0
    run_coins, run_rate = 0, None
    for coins, (numerator, denominator) in gifts_and_rates:
        settings = PayoutSettings(
            diamonds_per_coin_numerator=numerator, diamonds_per_coin_denominator=denominator
        )
        segment = segment_for(stored_rate, segment, received, credited, settings)
        stored_rate = (numerator, denominator)
        received += coins
        owed = diamonds_owed(received, settings, segment)
        assert owed >= credited
        credited = owed
        if run_rate != (numerator, denominator):  # a new segment: the last one's diamonds stand
            expected += run_coins * run_rate[0] // run_rate[1] if run_rate else 0
            run_coins, run_rate = 0, (numerator, denominator)
        run_coins += coins
    if run_rate:
        expected += run_coins * run_rate[0] // run_rate[1]
    assert credited == expected


def test_a_creator_credited_before_rates_were_kept_continues_or_starts_a_segment() -> None:
    """No rate stored (credited before migration 0020): the current rate continues from the
    beginning when it explains what was credited, and starts here when it does not."""
    assert segment_for(None, (0, 0), 101, 50, DEFAULT) == (0, 0)  # 101 x 1/2 = 50
    assert segment_for(None, (0, 0), 101, 33, DEFAULT) == (101, 33)  # credited at 1/3 before
    assert segment_for((1, 2), (40, 10), 101, 40, DEFAULT) == (40, 10)  # the rate goes on
    assert segment_for((1, 3), (0, 0), 99, 33, DEFAULT) == (99, 33)  # a new rate starts here
