"""Small helpers that keep the tests reading like the specification."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.type import date_pb2
from hypothesis import HealthCheck, settings
from sqlalchemy import text

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.clock import SystemClock
from runtime.db import Database
from runtime.migrations import upgrade
from runtime.status import bad_request, error_info
from tests.suite import Suite, create_pg_database, drop_pg_database

SERVICES = Path(__file__).resolve().parents[1] / "services"


def new_id(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def adult_birth_date() -> date_pb2.Date:
    return date_pb2.Date(year=1990, month=5, day=17)


async def open_account(suite: Suite, user_id: str, country: str = "US") -> wallet_pb2.Account:
    response = await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=new_id("open"),
            user_id=user_id,
            country_code=country,
            birth_date=adult_birth_date(),
        )
    )
    return response.account


async def new_creator(suite: Suite, *, live: bool = True) -> str:
    """A new adult creator with a wallet account (gifts go only to users who have one), live now in
    the LIVE `live_of(creator)` (gifts to a LIVE go only to its creator's open LIVE); with
    `live=False` not live yet (a creator runs one LIVE at a time)."""
    creator_id = new_id("creator")
    await open_account(suite, creator_id)
    if live:
        await start_live(suite, creator_id, live_of(creator_id))
    return creator_id


def live_of(creator_id: str) -> str:
    """The LIVE `new_creator` started for the creator."""
    return f"live-{creator_id}"


def live_gift(
    sender: str, creator: str, gift_id: str, *, request_id: str = "", count: int = 1
) -> gifting_pb2.SendGiftRequest:
    """A SendGift of `count` x `gift_id` to the creator's LIVE (`live_of`), under `request_id`
    (default: a new one)."""
    return gifting_pb2.SendGiftRequest(
        request_id=request_id or new_id("g"),
        sender_id=sender,
        creator_id=creator,
        gift_id=gift_id,
        count=count,
        live_id=live_of(creator),
    )


async def start_live(suite: Suite, creator_id: str, live_id: str = "") -> str:
    """The creator starts a LIVE (with this id, or a new one); returns its id."""
    from coins.gifting.v1 import gifting_pb2

    started = await suite.gifting.StartLive(
        gifting_pb2.StartLiveRequest(
            request_id=new_id("live"), creator_id=creator_id, title="test LIVE", live_id=live_id
        )
    )
    return started.live.live_id


async def funded_user(suite: Suite, package_id: str = "us-web-700") -> tuple[str, int]:
    """A new adult US user who bought one package; returns (user id, coins)."""
    user_id = new_id("viewer")
    await open_account(suite, user_id)
    bought = await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id("buy"),
            user_id=user_id,
            package_id=package_id,
            payment_token=f"tok_visa_{user_id}",  # each user's own card: cards have daily limits
        )
    )
    return user_id, bought.balance.coins


async def rewrite_history(url: str, statement: Any, params: dict[str, Any] | None = None) -> int:
    """Run `statement` as an intruder who owns the database would: as the login user, with the
    append-only triggers out of the way (PostgreSQL: replica mode, superuser only; SQLite: dropped
    and re-created around it). The audits must still notice. Returns the rows it touched."""
    db = Database(url)
    try:
        async with db.transaction() as conn:
            if db.is_sqlite:
                triggers = (
                    await conn.execute(
                        text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
                    )
                ).all()
                for name, _ in triggers:
                    await conn.execute(text(f"DROP TRIGGER {name}"))
            else:
                await conn.execute(text("SET LOCAL session_replication_role = replica"))
            statement = text(statement) if isinstance(statement, str) else statement
            touched = (await conn.execute(statement, params or {})).rowcount
            if db.is_sqlite:
                for _, sql in triggers:
                    await conn.execute(text(sql))
            return int(touched)
    finally:
        await db.close()


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str
) -> grpc.aio.AioRpcError:
    """Assert the call fails with `code` and exactly this ErrorInfo reason; returns the error."""
    error = await rpc_error(call)
    assert error.code() == code, f"{error.code()} {error.details()}"
    info = error_info(error)
    assert info is not None, "no ErrorInfo in the status details"
    assert info.reason == reason, f"reason {info.reason}: {error.details()}"
    return error


def error_metadata(error: grpc.RpcError) -> dict[str, str]:
    """The ErrorInfo metadata of a refusal (which must carry an ErrorInfo)."""
    info = error_info(error)
    assert info is not None, "no ErrorInfo in the status details"
    return dict(info.metadata)


def field_violations(error: grpc.RpcError) -> set[str]:
    found = bad_request(error)
    return {v.field for v in found.field_violations} if found else set()


async def migrated(db: Database, service: str = "wallet", revision: str = "head") -> Database:
    """`db` migrated with `service`'s own Alembic history up to `revision`."""
    await upgrade(db, SERVICES / service / "migrations", revision)
    return db


def run_state_machine(
    machine: type[Any],
    backend: str,
    tmp_path: Path,
    *,
    max_examples: int,
    steps: int,
    migrations: str = "wallet",
) -> None:
    """Run a hypothesis RuleBasedStateMachine against a fresh database of `backend`, migrated with
    a service's migrations. The machine class gets `db` and `run` (runs a coroutine to completion on
    an event loop of its own: hypothesis drives synchronous steps, outside the tests' loop)."""
    loop = asyncio.new_event_loop()
    name = f"coins_machine_{uuid.uuid4().hex[:12]}"
    try:
        url = (
            loop.run_until_complete(create_pg_database(name))
            if backend == "postgres"
            else f"sqlite+aiosqlite:///{tmp_path / 'machine.db'}"
        )
        database = Database(url)
        loop.run_until_complete(migrated(database, migrations))
        machine.db = database
        machine.run = staticmethod(loop.run_until_complete)
        runner = machine.TestCase
        runner.settings = settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        )
        runner().runTest()
        loop.run_until_complete(database.close())
    finally:
        if backend == "postgres":
            loop.run_until_complete(drop_pg_database(name))
        loop.close()


async def first_message(stream: Any, wait: float = 0.5) -> Any:
    """A server stream's first message, None if it has sent none within `wait` (admitted, and
    waiting for events) or ended without one; the stream is cancelled either way. Its refusal
    raises, as a unary call's would."""
    try:
        first = await asyncio.wait_for(stream.read(), wait)
    except TimeoutError:
        return None
    finally:
        stream.cancel()
    return None if first is grpc.aio.EOF else first


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, *, seconds: float = 5.0
) -> None:
    """Wait (bounded) for background work (a relay, a reconciler, a sweeper) to make `check` true."""
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


class ShiftedClock(SystemClock):
    """The system clock, moved forward on demand: days pass in an instant for the wallet and the
    promotion service alike (tokens are still checked against the real time)."""

    def __init__(self) -> None:
        self.shift = dt.timedelta()

    def now(self) -> dt.datetime:
        return super().now() + self.shift


async def verify_creator(
    suite: Any, creator_id: str, *, rejected: bool = False, reason: str = "documents checked (test)"
) -> None:
    """An admin (never the creator) marks the creator verified (KYC), as withdrawals require; or,
    `rejected`, rejects their verification."""
    from coins.payout.v1 import payout_pb2

    await suite.payout.SetCreatorVerification(
        payout_pb2.SetCreatorVerificationRequest(
            request_id=new_id("kyc"),
            creator_id=creator_id,
            status=payout_pb2.KYC_STATUS_REJECTED if rejected else payout_pb2.KYC_STATUS_VERIFIED,
            reason=reason,
        ),
        metadata=suite.token(new_id("ops"), admin=True),
    )
