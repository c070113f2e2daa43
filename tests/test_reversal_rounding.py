"""A reversal takes back what the creator's standing coins no longer earn (review r11 #1): whichever
gifts are reversed, a creator ends with floor(coins kept x rate) diamonds, pending or available, and
later gifts round from what they keep; gifts of an earlier rate round in the coins that rate
converted."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest
import sqlalchemy as sa

from coins.payout.v1 import payout_pb2
from runtime.db import Database
from runtime.migrations import upgrade
from services.payout.domain import GiftCredit, Payouts
from tests.helpers import SERVICES, ShiftedClock, eventually, new_id
from tests.suite import Suite
from tests.test_payout_maturation import DAYS, balance_of


async def gift(suite: Suite, creator: str, coins: int) -> tuple[str, int]:
    """A gift of `coins` credited to `creator`: (its id, the diamonds it credited)."""
    gift_id = new_id("g")
    answer = await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=f"gift:{gift_id}", creator_id=creator, coins=coins, reference=gift_id
        )
    )
    return gift_id, answer.diamonds_credited


async def reverse(suite: Suite, gift_ids: list[str]) -> list[payout_pb2.GiftReversal]:
    answer = await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=gift_ids, reason="chargeback"
        ),
        metadata=suite.token(new_id("risk"), admin=True),
    )
    return list(answer.reversals)


def net(balance: payout_pb2.DiamondBalance) -> int:
    """What the creator holds: pending and available, less what they owe back."""
    return balance.pending_diamonds + balance.available_diamonds - balance.debt_diamonds


async def matured(suite: Suite, clock: ShiftedClock, creator: str) -> payout_pb2.DiamondBalance:
    """Every credit matured and debts repaid by the service's own sweep."""
    clock.shift += dt.timedelta(days=DAYS, seconds=1)
    await eventually(lambda: _nothing_pending(suite, creator), "every credit matured")
    return await balance_of(suite, creator)


async def _nothing_pending(suite: Suite, creator: str) -> bool:
    balance = await balance_of(suite, creator)
    return balance.pending_diamonds == 0 and not (
        balance.debt_diamonds and balance.available_diamonds
    )


async def test_reversing_the_gifts_that_credited_nothing_still_takes_back_their_half(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """40 one-coin gifts at 1/2 credit 0 and 1 alternately (20 diamonds). Reversing the 20 that
    credited 0 took nothing back (20 diamonds for 20 coins kept); now it takes back 10, as a debt
    while the creator's diamonds are all pending, repaid when they mature."""
    suite, clock = maturing
    creator = new_id("creator")
    gifts = [await gift(suite, creator, 1) for _ in range(40)]
    assert sorted({diamonds for _, diamonds in gifts}) == [0, 1]
    zeros = [gift_id for gift_id, diamonds in gifts if diamonds == 0]
    reversals = await reverse(suite, zeros)
    assert sum(r.diamonds for r in reversals) == 0  # what they had credited
    assert sum(r.diamonds_taken for r in reversals) == 10
    assert all(
        r.diamonds_taken == r.from_pending + r.from_available + r.to_debt - r.to_available
        for r in reversals
    )
    balance = await balance_of(suite, creator)
    assert (balance.pending_diamonds, balance.available_diamonds, balance.debt_diamonds) == (
        20,
        0,
        10,
    )
    listed = await suite.as_caller("gifting").payout.ListReversedCredits(
        payout_pb2.ListReversedCreditsRequest(page_size=1000)
    )
    mine = [c for c in listed.credits if c.creator_id == creator]
    assert (sum(c.diamonds for c in mine), sum(c.diamonds_taken for c in mine)) == (0, 10)
    # Later gifts round from the 20 coins kept: floor(21/2) - 10 = 0, then 1.
    assert [(await gift(suite, creator, 1))[1] for _ in range(2)] == [0, 1]
    done = await matured(suite, clock, creator)
    assert (done.available_diamonds, done.debt_diamonds) == (11, 0)  # floor(22 / 2)


async def test_reversing_the_gifts_that_credited_one_makes_available_what_was_not_taken(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """Reversing the 20 one-coin gifts that credited 1 took back 20 (0 diamonds for 20 coins kept);
    now 10. Each pending credit gives up its diamond; of those taken back for 0 it is available
    (the reversal settled what the creator keeps of it), so nothing reversed stays pending."""
    suite, clock = maturing
    creator = new_id("creator")
    gifts = [await gift(suite, creator, 1) for _ in range(40)]
    ones = [gift_id for gift_id, diamonds in gifts if diamonds == 1]
    reversals = await reverse(suite, ones)
    assert sum(r.diamonds for r in reversals) == sum(r.from_pending for r in reversals) == 20
    assert sum(r.diamonds_taken for r in reversals) == sum(r.to_available for r in reversals) == 10
    assert not any(r.from_available or r.to_debt for r in reversals)
    balance = await balance_of(suite, creator)
    assert (balance.pending_diamonds, balance.available_diamonds, balance.debt_diamonds) == (
        0,
        10,
        0,
    )
    # Named again: nothing moves, the answer says what was taken.
    again = await reverse(suite, ones[:3])
    assert all(r.already_reversed for r in again)
    taken = {r.gift_id: r.diamonds_taken for r in reversals}
    assert {r.gift_id: r.diamonds_taken for r in again} == {g: taken[g] for g in ones[:3]}
    done = await matured(suite, clock, creator)
    assert (done.available_diamonds, done.debt_diamonds) == (10, 0)


async def test_any_reversals_leave_floor_of_the_coins_kept(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """A seeded walk: gifts of 1-7 coins, some matured, reversed a few at a time in any order
    between more gifts; after each step the creator holds floor(coins kept / 2), and in the end
    it is all available."""
    suite, clock = maturing
    rng = random.Random(1207)
    creator = new_id("creator")
    standing: dict[str, int] = {}
    for step in range(12):
        for _ in range(rng.randint(3, 9)):
            coins = rng.randint(1, 7)
            gift_id, _ = await gift(suite, creator, coins)
            standing[gift_id] = coins
        if step == 5:  # the gifts so far mature: later reversals take from what is available
            await matured(suite, clock, creator)
        chosen = rng.sample(sorted(standing), k=min(len(standing), rng.randint(1, 4)))
        reversals = await reverse(suite, chosen)
        assert {r.gift_id for r in reversals} == set(chosen)
        for gift_id in chosen:
            del standing[gift_id]
        assert net(await balance_of(suite, creator)) == sum(standing.values()) // 2, step
    done = await matured(suite, clock, creator)
    assert (done.available_diamonds, done.debt_diamonds) == (sum(standing.values()) // 2, 0)


async def test_a_gift_of_an_earlier_rate_rounds_in_the_coins_that_rate_converted(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """Gifts credited at 1/2, then at 1/3 (a new segment from the 1/2 total): each reversal rounds
    in its own gift's segment, before and after the rate changed, so the creator keeps
    floor(kept x 1/2) + floor(kept x 1/3) (review: a gift of the ended segment took back its own
    share, and with those reversed earlier by rounding a diamond was created or lost)."""
    suite, clock = maturing
    creator = new_id("creator")
    old = [await gift(suite, creator, 3) for _ in range(3)]  # 1, 2, 1: 4 diamonds for 9 coins
    assert [d for _, d in old] == [1, 2, 1]
    payouts = suite.services["payout"].runtime.parts["payouts"]
    assert isinstance(payouts, Payouts)
    third = Payouts(
        payouts.settings.model_copy(update={"diamonds_per_coin_denominator": 3}), payouts.ledger
    )

    async def two_coins_at_a_third(to: str = creator) -> str:
        gift_id = new_id("g")
        await third.credit(
            suite.services["payout"].runtime.db.driver,
            [GiftCredit(f"gifting/{gift_id}", gift_id, "fp", to, 2, gift_id)],
            clock.now(),
            lambda creator_id, diamonds, balance: b"",
        )
        return gift_id

    new = [await two_coins_at_a_third() for _ in range(4)]  # 0, 1, 1, 0
    assert net(await balance_of(suite, creator)) == 4 + 2

    async def taken(gift_id: str) -> tuple[int, int]:
        [reversal] = await reverse(suite, [gift_id])
        return reversal.diamonds, reversal.diamonds_taken

    # The second 1/2 gift credited 2; of the 9 coins at 1/2 it takes back floor(9/2) - floor(6/2).
    assert await taken(old[1][0]) == (2, 1)
    # In the 1/3 segment: floor(8/3) - floor(6/3) = 0 for the first, floor(6/3) - floor(4/3) = 1.
    assert await taken(new[0]) == (0, 0)
    assert await taken(new[1]) == (1, 1)
    assert net(await balance_of(suite, creator)) == 3 + 1  # floor(6 / 2) + floor(4 / 3)
    # The 1/3 segment goes on from what it kept: floor(6/3) - floor(4/3) = 1.
    await two_coins_at_a_third()
    assert net(await balance_of(suite, creator)) == 3 + 2
    # The rest at 1/2: floor(6/2) - floor(3/2) = 2, then 1.
    assert [await taken(old[0][0]), await taken(old[2][0])] == [(1, 2), (1, 1)]
    assert net(await balance_of(suite, creator)) == 0 + 2
    # And the reviewer's case: 0, 1, 0 at 1/2, the 1 reversed (takes 0), the rate changes, then
    # the two others reversed: they take 1 between them (by their own shares: 0, a diamond made).
    other = new_id("creator")
    halves = [await gift(suite, other, 1) for _ in range(3)]
    assert [d for _, d in halves] == [0, 1, 0]
    [middle] = await reverse(suite, [halves[1][0]])
    assert middle.diamonds_taken == 0
    await two_coins_at_a_third(other)
    await two_coins_at_a_third(other)  # 0, 1
    pair = await reverse(suite, [halves[0][0], halves[2][0]])
    assert sum(r.diamonds_taken for r in pair) == 1
    assert net(await balance_of(suite, other)) == 0 + 1


async def test_reversals_racing_credits_and_the_sweep_leave_floor_of_the_coins_kept(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """Reversals in parallel batches while more gifts are credited to the same creator and the sweep
    matures the earlier ones: no deadlock (both lock the creator's totals, then the accounts), and
    the creator ends with floor(coins kept / 2)."""
    suite, clock = maturing
    rng = random.Random(4)
    creator = new_id("creator")
    earlier: dict[str, int] = {}
    for coins in [rng.randint(1, 3) for _ in range(48)]:
        gift_id, _ = await gift(suite, creator, coins)
        earlier[gift_id] = coins
    clock.shift += dt.timedelta(days=DAYS, seconds=1)  # the sweep matures them meanwhile
    later: dict[str, int] = {}

    async def credit_more(n: int) -> None:
        for _ in range(n):
            coins = rng.randint(1, 3)
            gift_id, _ = await gift(suite, creator, coins)
            later[gift_id] = coins

    order = rng.sample(sorted(earlier), k=len(earlier))
    batches = [order[i : i + 4] for i in range(0, 36, 4)]
    await asyncio.gather(
        *(credit_more(8) for _ in range(4)), *(reverse(suite, batch) for batch in batches)
    )
    kept = sum(earlier.values()) + sum(later.values()) - sum(earlier[g] for g in order[:36])
    assert net(await balance_of(suite, creator)) == kept // 2
    done = await matured(suite, clock, creator)
    assert (done.available_diamonds, done.debt_diamonds) == (kept // 2, 0)


async def test_the_upgrade_keeps_each_segment_to_one_rule(database: Database) -> None:
    """Credits made before migration 0033 join their creator's current segment only where it holds
    exactly them, none reversed; any other creator starts a new segment at their totals, and their
    earlier credits keep the old rule (review: a gift reversed by its own share before the upgrade
    left its coins in the segment, and the next reversal took its rounding: a debt of a diamond
    for no coin kept)."""
    await upgrade(database, SERVICES / "payout" / "migrations", revision="0032")
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    creators = [  # id, coins received, diamonds credited, rate, segment start
        ("clean", 4, 2, (1, 2), (0, 0)),
        ("reversed", 2, 1, (1, 2), (0, 0)),
        ("no-rate", 3, 1, (None, None), (0, 0)),
        ("changed", 7, 3, (1, 3), (4, 2)),
    ]
    credits = [  # creator, coins, diamonds, rate, reversed
        *[("clean", 1, d, (1, 2), False) for d in (0, 1, 0, 1)],
        ("reversed", 1, 0, (1, 2), False),
        ("reversed", 1, 1, (1, 2), True),
        ("no-rate", 3, 1, (1, 2), False),
        *[("changed", 2, d, (1, 2), False) for d in (1, 1)],
        ("changed", 3, 1, (1, 3), False),
    ]
    async with database.transaction() as conn:
        for creator, received, credited, (num, den), (coins_at, diamonds_at) in creators:
            await conn.execute(
                sa.text(
                    "INSERT INTO creators (creator_id, coins_received, diamonds_credited, "
                    "created_at, rate_numerator, rate_denominator, coins_at_rate, "
                    "diamonds_at_rate) VALUES (:c, :r, :d, :at, :num, :den, :ca, :da)"
                ),
                dict(c=creator, r=received, d=credited, at=at, num=num, den=den)
                | dict(ca=coins_at, da=diamonds_at),
            )
        for i, (creator, coins, diamonds, (num, den), reversed_) in enumerate(credits):
            await conn.execute(
                sa.text(
                    "INSERT INTO gift_credits (credit_key, fingerprint, creator_id, coins, "
                    "diamonds, response, created_at, reversed_at, rate_numerator, "
                    "rate_denominator, coin_value_micros, diamond_value_micros, "
                    "platform_micros) VALUES (:k, 'fp', :c, :coins, :d, :r, :at, :rev, :num, "
                    ":den, 10000, 10000, :p)"
                ),
                dict(k=f"k{i}", c=creator, coins=coins, d=diamonds, r=b"", num=num, den=den)
                | dict(at=at + dt.timedelta(seconds=i), rev=at if reversed_ else None)
                | dict(p=(coins - diamonds) * 10_000),
            )
    await upgrade(database, SERVICES / "payout" / "migrations")
    async with database.read() as conn:
        totals = {
            row[0]: tuple(row[1:])
            for row in await conn.execute(
                sa.text(
                    "SELECT creator_id, rate_segment, coins_at_rate, diamonds_at_rate, "
                    "rate_numerator, rate_denominator FROM creators"
                )
            )
        }
        segments = {
            (row[0], row[1])
            for row in await conn.execute(
                sa.text("SELECT creator_id, rate_segment FROM gift_credits")
            )
        }
        reversed_rows = list(
            await conn.execute(
                sa.text(
                    "SELECT reversed_diamonds, reversed_coins FROM gift_credits "
                    "WHERE reversed_at IS NOT NULL"
                )
            )
        )
    assert totals == {
        "clean": (0, 0, 0, 1, 2),
        "reversed": (1, 2, 1, 1, 2),
        "no-rate": (1, 3, 1, 1, 2),  # the rate of its last credit
        "changed": (1, 7, 3, 1, 3),
    }
    assert segments == {("clean", 0), ("reversed", -1), ("no-rate", -1), ("changed", -1)}
    assert [tuple(r) for r in reversed_rows] == [(1, 0)]  # the old rule: its own share
    # A payout older than the migration, still running in a rolling update, writes nothing: its
    # credit carries no segment, its reversal not what it took (review r17).
    with pytest.raises(sa.exc.IntegrityError):
        async with database.transaction() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO gift_credits (credit_key, fingerprint, creator_id, coins, "
                    "diamonds, response, created_at, rate_numerator, rate_denominator, "
                    "coin_value_micros, diamond_value_micros, platform_micros) VALUES ('old', "
                    "'fp', 'clean', 1, 0, :r, :at, 1, 2, 10000, 10000, 10000)"
                ),
                {"r": b"", "at": at},
            )
    with pytest.raises(sa.exc.IntegrityError):
        async with database.transaction() as conn:
            await conn.execute(
                sa.text("UPDATE gift_credits SET reversed_at = :at WHERE credit_key = 'k0'"),
                {"at": at},
            )
