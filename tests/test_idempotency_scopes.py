"""Request ids belong to the calling service (and name the user they act for), and are remembered
for the retention period (at least 24 hours), answered ones only ever forgotten after it."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.clock import FixedClock
from runtime.config import ServiceSettings
from runtime.db import Database
from runtime.errors import InvalidArgument
from runtime.idempotency import Idempotency, idempotency_keys
from runtime.migrations import upgrade
from tests.helpers import funded_user, migrated, new_creator, new_id
from tests.suite import Suite

SERVICES = Path(__file__).resolve().parents[1] / "services"


async def test_two_services_may_use_the_same_request_id(suite: Suite) -> None:
    user, coins = await funded_user(suite)

    def debit(reason: wallet_pb2.DebitReason.ValueType) -> wallet_pb2.DebitCoinsRequest:
        return wallet_pb2.DebitCoinsRequest(
            request_id="shared-id-1", user_id=user, coins=10, reason=reason, reference="r"
        )

    first = await suite.as_caller("gifting").wallet.DebitCoins(debit(wallet_pb2.DEBIT_REASON_GIFT))
    second = await suite.as_caller("promotion").wallet.DebitCoins(
        debit(wallet_pb2.DEBIT_REASON_PROMOTION)
    )
    assert first.transaction_id != second.transaction_id
    assert second.balance.coins == coins - 20


async def test_a_users_request_is_one_request_whichever_edge_carries_it(suite: Suite) -> None:
    """The gateway and the admin console both carry users' own requests: the same request id
    through either is one request (review R7: a purchase retried through the console charged the
    card twice, a gift debited twice)."""
    user, coins = await funded_user(suite)
    creator = await new_creator(suite)
    console = suite.as_caller("admin-console")
    purchase = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id("buy"),
        user_id=user,
        package_id="us-web-70",
        payment_token=f"tok_visa_{user}",
    )
    bought = await suite.wallet.PurchaseCoins(purchase)
    assert await console.wallet.PurchaseCoins(purchase) == bought
    gift = gifting_pb2.SendGiftRequest(
        request_id=new_id("gift"),
        sender_id=user,
        creator_id=creator,
        gift_id="rose",
        count=5,
        video_id="video-1",
    )
    sent = await console.gifting.SendGift(gift)
    assert await suite.gifting.SendGift(gift) == sent
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == coins + 70 - 5


async def test_the_migration_moves_the_consoles_request_ids_to_the_gateways(
    tmp_path: Path,
) -> None:
    """A request sent through the console before the upgrade is still answered after it."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    await upgrade(db, SERVICES / "wallet" / "migrations", revision="0013")
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    rows = [
        ("admin-console|PurchaseCoins:ava", "r1", "p1"),  # the console's alone: moves
        ("admin-console|PurchaseCoins:ava", "r2", "p2"),  # recorded by both edges: stays
        ("gateway|PurchaseCoins:ava", "r2", "p3"),
        ("promotion|PlaceHold:ava", "r1", "p4"),  # a service's own: untouched
    ]
    async with db.transaction() as conn:
        for scope, request_id, print_ in rows:
            await conn.execute(
                idempotency_keys.insert().values(
                    scope=scope, request_id=request_id, fingerprint=print_, created_at=now
                )
            )
    await upgrade(db, SERVICES / "wallet" / "migrations")
    async with db.read() as conn:
        found = (
            await conn.execute(
                sa.select(
                    idempotency_keys.c.scope,
                    idempotency_keys.c.request_id,
                    idempotency_keys.c.fingerprint,
                ).order_by(idempotency_keys.c.fingerprint)
            )
        ).all()
    await db.close()
    assert [tuple(r) for r in found] == [
        ("gateway|PurchaseCoins:ava", "r1", "p1"),
        ("admin-console|PurchaseCoins:ava", "r2", "p2"),
        ("gateway|PurchaseCoins:ava", "r2", "p3"),
        ("promotion|PlaceHold:ava", "r1", "p4"),
    ]


def test_retention_is_at_least_a_day() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 24"):
        ServiceSettings(idempotency_retention_hours=12)


async def test_answered_ids_are_forgotten_after_the_retention_unfinished_ones_never(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    await upgrade(db, SERVICES / "wallet" / "migrations")
    clock = FixedClock(dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    keys = Idempotency(db, clock)
    answered = wallet_pb2.GetBalanceRequest()  # any message with a request_id will do:
    done = wallet_pb2.DebitCoinsRequest(request_id=uuid.uuid4().hex, user_id="a", coins=1)
    open_ = wallet_pb2.DebitCoinsRequest(request_id=uuid.uuid4().hex, user_id="b", coins=1)
    async with db.transaction() as conn:
        await keys.claim(conn, "DebitCoins:a", done)
        await keys.complete(conn, "DebitCoins:a", done, response=answered)
        await keys.claim(conn, "PurchaseCoins:b", open_, resource_id="purchase-1")
    clock.advance(dt.timedelta(hours=47))
    assert await keys.purge(dt.timedelta(hours=48)) == 0
    clock.advance(dt.timedelta(hours=2))
    assert await keys.purge(dt.timedelta(hours=48)) == 1
    async with db.read() as conn:
        left = (await conn.execute(sa.select(idempotency_keys.c.scope))).scalars().all()
    assert left == ["PurchaseCoins:b"]
    await db.close()


async def test_the_purge_forgets_a_batch_per_statement_and_only_old_answered_ids(
    database: Database,
) -> None:
    """Each purge forgets at most its batch, in one statement (id by id it forgot ~1,600 ids a
    second on PostgreSQL, slower than a busy service makes them); open and young ids stay."""
    db = await migrated(database, "wallet")
    clock = FixedClock(dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    keys = Idempotency(db, clock)

    async def claimed(scope: str, answered: bool) -> None:
        request = wallet_pb2.DebitCoinsRequest(request_id=uuid.uuid4().hex, user_id="a", coins=1)
        async with db.transaction() as conn:
            await keys.claim(conn, scope, request, resource_id=scope)
            if answered:
                await keys.complete(conn, scope, request, response=wallet_pb2.GetBalanceRequest())

    for n in range(7):
        await claimed(f"old-answered-{n}", answered=True)
    await claimed("old-open", answered=False)
    clock.advance(dt.timedelta(hours=30))
    for n in range(2):
        await claimed(f"young-answered-{n}", answered=True)
    clock.advance(dt.timedelta(hours=20))
    statements: list[str] = []
    sa.event.listen(db.engine.sync_engine, "before_cursor_execute", _record(statements))
    assert [await keys.purge(dt.timedelta(hours=48), limit=3) for _ in range(4)] == [3, 3, 1, 0]
    assert sum(s.lstrip().upper().startswith("DELETE") for s in statements) == 4
    async with db.read() as conn:
        left = (await conn.execute(sa.select(idempotency_keys.c.scope))).scalars().all()
    assert sorted(left) == ["old-open", "young-answered-0", "young-answered-1"]


def _record(statements: list[str]) -> Any:
    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    return before


async def test_invalid_input_answers_a_claimed_id_and_leaves_an_unclaimed_one_free(
    database: Database,
) -> None:
    """Invalid input is not stored as a request id's answer (the corrected request may use it),
    but a saga that had claimed the id before finding it invalid answers its claim: else the key
    stayed in progress for good (a review's)."""
    db = await migrated(database, "wallet")
    keys = Idempotency(db, FixedClock(dt.datetime(2026, 11, 1, tzinfo=dt.UTC)))
    invalid = InvalidArgument("SOMETHING_WRONG", "the input is wrong")
    fresh = wallet_pb2.DebitCoinsRequest(request_id=uuid.uuid4().hex, user_id="a", coins=1)
    assert await keys.record_error("DebitCoins:a", fresh, invalid) is None
    claimed = wallet_pb2.DebitCoinsRequest(request_id=uuid.uuid4().hex, user_id="a", coins=2)
    async with db.transaction() as conn:
        await keys.claim(conn, "DebitCoins:a", claimed, resource_id="debit-1")
    assert await keys.record_error("DebitCoins:a", claimed, invalid) is None
    async with db.read() as conn:
        found = await conn.execute(
            sa.select(idempotency_keys.c.request_id, idempotency_keys.c.error)
        )
        rows: dict[str, str | None] = {str(r[0]): r[1] for r in found.all()}
    assert fresh.request_id not in rows
    assert "SOMETHING_WRONG" in (rows[claimed.request_id] or "")
