"""The conversion policy's arithmetic never creates or loses value (property-based)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.payout.policy import diamonds_owed, quote
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
    st.integers(min_value=0, max_value=10_000),
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
    )
    q = quote(requested, settings)
    assert q.diamonds <= requested
    assert requested - q.diamonds < diamonds_per_minor  # only a fraction of a cent stays behind
    assert q.gross_minor * diamonds_per_minor == q.diamonds  # the cash is exactly their value
    assert q.diamonds * settings.diamond_value_micros == q.gross_minor * 10_000  # and their books
    assert 0 <= q.fee_minor <= q.gross_minor
    assert q.net_minor + q.fee_minor == q.gross_minor
