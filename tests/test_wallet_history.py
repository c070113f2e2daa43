"""Ledger history: newest first, each entry with the balance after it, filterable by kind and time,
paged with tokens that only continue the listing they came from."""

from __future__ import annotations

import base64
import datetime as dt
import re

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from coins.wallet.v1 import wallet_pb2
from ledger import entries
from ledger.entry_ids import load_entry_ids
from runtime.db import Database
from tests.helpers import expect_error, funded_user, new_id
from tests.suite import Suite


async def debit(
    suite: Suite, user: str, coins: int, reason: wallet_pb2.DebitReason.ValueType
) -> None:
    await suite.as_caller("gifting").wallet.DebitCoins(
        wallet_pb2.DebitCoinsRequest(
            request_id=new_id("d"), user_id=user, coins=coins, reason=reason, reference=new_id()
        )
    )


def at(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_history_filters_by_kind_and_time_and_pages(suite: Suite) -> None:
    user, coins = await funded_user(suite)  # a purchase
    for n in range(1, 6):
        await debit(suite, user, n, wallet_pb2.DEBIT_REASON_GIFT)
    await debit(suite, user, 50, wallet_pb2.DEBIT_REASON_PROMOTION)

    everything = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in everything.entries] == [-50, -5, -4, -3, -2, -1, coins]
    assert [e.balance_after for e in everything.entries][:2] == [coins - 65, coins - 15]

    gifts = wallet_pb2.ListLedgerEntriesRequest(
        user_id=user, kinds=[wallet_pb2.ENTRY_KIND_GIFT], page_size=2
    )
    first = await suite.wallet.ListLedgerEntries(gifts)
    assert [e.amount for e in first.entries] == [-5, -4]
    gifts.page_token = first.next_page_token
    second = await suite.wallet.ListLedgerEntries(gifts)
    assert [e.amount for e in second.entries] == [-3, -2]
    assert {e.kind for e in first.entries} == {wallet_pb2.ENTRY_KIND_GIFT}

    # A token continues only the listing it came from.
    await expect_error(
        suite.wallet.ListLedgerEntries(
            wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_token=first.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )

    now = dt.datetime.now(dt.UTC)
    later = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(
            user_id=user, start_time=at(now + dt.timedelta(minutes=1))
        )
    )
    assert list(later.entries) == []
    window = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(
            user_id=user,
            start_time=at(now - dt.timedelta(minutes=5)),
            end_time=at(now + dt.timedelta(minutes=1)),
            kinds=[wallet_pb2.ENTRY_KIND_PURCHASE, wallet_pb2.ENTRY_KIND_PROMOTION],
        )
    )
    assert [e.amount for e in window.entries] == [-50, coins]


async def test_unknown_or_repeated_kinds_are_refused(suite: Suite) -> None:
    user, _ = await funded_user(suite)
    await expect_error(
        suite.wallet.ListLedgerEntries(
            wallet_pb2.ListLedgerEntriesRequest(
                user_id=user, kinds=[wallet_pb2.ENTRY_KIND_GIFT, wallet_pb2.ENTRY_KIND_GIFT]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )


async def test_a_statements_lines_come_in_kind_order(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    await debit(suite, user, 30, wallet_pb2.DEBIT_REASON_GIFT)
    await debit(suite, user, 20, wallet_pb2.DEBIT_REASON_PROMOTION)
    statement = await suite.wallet.GetCoinStatement(
        wallet_pb2.GetCoinStatementRequest(user_id=user)
    )
    assert [(line.kind, line.credited, line.debited) for line in statement.lines] == [
        (wallet_pb2.ENTRY_KIND_PURCHASE, coins, 0),  # enum order, not the kinds' names
        (wallet_pb2.ENTRY_KIND_GIFT, 0, 30),
        (wallet_pb2.ENTRY_KIND_PROMOTION, 0, 20),
    ]


async def test_a_bound_between_microseconds_keeps_entries_on_their_side(suite: Suite) -> None:
    """Entries are dated to the microsecond; a bound a nanosecond after an entry's time has the
    entry before it: outside a period starting there, inside one ending there."""
    user, coins = await funded_user(suite)
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    (bought,) = history.entries
    after = Timestamp(seconds=bought.create_time.seconds, nanos=bought.create_time.nanos + 1)
    since = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user, start_time=after)
    )
    assert list(since.entries) == []
    until = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user, end_time=after)
    )
    assert [e.entry_id for e in until.entries] == [bought.entry_id]
    statement = await suite.wallet.GetCoinStatement(
        wallet_pb2.GetCoinStatementRequest(user_id=user, end_time=after)
    )
    assert statement.closing_balance == coins
    ends = await suite.wallet.GetCoinStatement(
        wallet_pb2.GetCoinStatementRequest(user_id=user, start_time=after)
    )
    assert (ends.opening_balance, list(ends.lines)) == (coins, [])


async def test_entry_ids_are_opaque_and_stable(suite: Suite) -> None:
    """An entry's id and the page tokens do not show the ledger's sequence, which counts every
    entry of every account: two of a user's own entries told them the platform's volume in
    between. Ids are 32 hex digits, the same on every read and from every process (the key is in
    the database), and still page."""
    user, _ = await funded_user(suite)
    for n in range(1, 4):
        await debit(suite, user, n, wallet_pb2.DEBIT_REASON_GIFT)
    listing = wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_size=1)
    shown, tokens = [], []
    while True:
        page = await suite.wallet.ListLedgerEntries(listing)
        shown += [e.entry_id for e in page.entries]
        if not page.next_page_token:
            break
        tokens.append(page.next_page_token)
        listing.page_token = page.next_page_token
    assert len(shown) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in shown), shown
    everything = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.entry_id for e in everything.entries] == shown  # the same ids page by page

    db = Database(suite.services["wallet"].runtime.db.url)
    try:
        async with db.read() as conn:
            rows = await conn.execute(
                sa.select(entries.c.entry_id)
                .where(entries.c.account_id == f"user:{user}")
                .order_by(entries.c.entry_id.desc())
            )
            sequence = [int(r[0]) for r in rows]
        again = await load_entry_ids(db)  # what another replica, or a restart, loads
    finally:
        await db.close()
    assert [again.public(n) for n in sequence] == shown
    readable = " ".join(base64.urlsafe_b64decode(t.split(".")[0] + "==").decode() for t in tokens)
    for n in sequence:
        assert str(n) not in shown and f",{n}]" not in readable, (n, readable)
    with pytest.raises(ValueError):
        again.internal("0" * 32)  # not an id this ledger made
