"""Request ids belong to the calling service (and name the user they act for), and are remembered
for the retention period (at least 24 hours), answered ones only ever forgotten after it."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from coins.wallet.v1 import wallet_pb2
from runtime.clock import FixedClock
from runtime.config import ServiceSettings
from runtime.db import Database
from runtime.idempotency import Idempotency, idempotency_keys
from runtime.migrations import upgrade
from tests.helpers import funded_user
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
