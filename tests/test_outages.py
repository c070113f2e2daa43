"""Outages answer as outages: while a service's PostgreSQL cannot be reached, its calls are refused
UNAVAILABLE DATABASE_UNAVAILABLE with a RetryInfo (which clients and gRPC retry policies retry), with
no stack trace logged; a caller of that service sees UNAVAILABLE too; once the database is back, the
same request ids complete, once."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime import deadlines
from runtime.backoff import backoff
from runtime.db import Database
from runtime.errors import DeadlineExceeded, ErrorKind, Unavailable
from runtime.health import LIVENESS
from runtime.outages import (
    DatabaseRefused,
    connection_dropped,
    log_failure,
    outage_cause,
    outage_of,
)
from runtime.shedding import Admitted
from runtime.sql import Statement
from runtime.status import from_rpc_error, retry_info
from tests.faults import TcpProxy
from tests.helpers import (
    eventually,
    expect_error,
    funded_user,
    live_gift,
    live_of,
    new_creator,
    new_id,
    rpc_error,
)
from tests.suite import PG_ADMIN_URL, Suite, create_pg_database, drop_pg_database


async def test_a_database_outage_is_unavailable_and_heals(
    wallet_behind_proxy: tuple[Suite, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    suite, proxy = wallet_behind_proxy
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    gift = gifting_pb2.SendGiftRequest(
        request_id=new_id("gift"),
        sender_id=sender,
        creator_id=creator,
        gift_id="rose",
        count=2,
        live_id=live_of(creator),
    )
    caplog.set_level(logging.WARNING)
    proxy.cut()
    error = await expect_error(
        suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender)),
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
    )
    delay = retry_info(error)
    assert delay is not None and delay.retry_delay.ToMilliseconds() > 0
    relayed = await expect_error(  # gifting's caller learns the wallet is out, and when to retry
        suite.gifting.SendGift(gift), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
    )
    hint = retry_info(relayed)
    assert hint is not None and hint.retry_delay.ToMilliseconds() == 1_000
    assert not [r for r in caplog.records if r.exc_info], "an outage logged a stack trace"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Its health says so, and a readiness probe takes it out of rotation.
    probe = health_pb2_grpc.HealthStub(suite.health_channel("wallet"))

    async def health_is(status: int) -> bool:
        answer = await probe.Check(health_pb2.HealthCheckRequest())
        return bool(answer.status == status)

    await eventually(
        lambda: health_is(health_pb2.HealthCheckResponse.NOT_SERVING), "wallet NOT_SERVING"
    )
    # A liveness probe never restarts it for the database (review r16: the manifests' liveness
    # probe asked what readiness asks, and a restarted wallet exits while the database is out).
    alive = await probe.Check(health_pb2.HealthCheckRequest(service=LIVENESS))
    assert alive.status == health_pb2.HealthCheckResponse.SERVING

    proxy.heal()
    await eventually(lambda: health_is(health_pb2.HealthCheckResponse.SERVING), "SERVING again")

    async def healed() -> bool:
        try:
            await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(healed, "the wallet serving again")
    sent = await suite.gifting.SendGift(gift)  # the same request id completes, once
    assert sent.sender_balance_coins == coins - 2
    again = await suite.gifting.SendGift(gift)
    assert again == sent
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 2


async def test_a_database_that_refuses_connections_is_an_outage_not_a_bug(
    wallet_behind_proxy: tuple[Suite, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """A server that is up but refuses the service a connection (`ALLOW_CONNECTIONS false`,
    SQLSTATE 55000; the same for a database starting, dropped, or a login revoked) cannot serve
    the service's data: UNAVAILABLE DATABASE_UNAVAILABLE on the hot paths (the driver's pool) and
    the slow ones (SQLAlchemy's), relayed as UNAVAILABLE by a caller, no stack trace. Review A4
    saw INTERNAL INTERNAL_ERROR and a traceback per call."""
    suite, _proxy = wallet_behind_proxy
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    gift = live_gift(sender, creator, "rose")
    name = sa.make_url(suite.services["wallet"].runtime.db.url).database
    admin = await asyncpg.connect(PG_ADMIN_URL)
    caplog.set_level(logging.WARNING)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        for call in (
            suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender)),  # the driver
            suite.wallet.ListCoinPackages(
                wallet_pb2.ListCoinPackagesRequest(user_id=sender, channel=wallet_pb2.CHANNEL_WEB)
            ),
            suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender)),
        ):
            error = await expect_error(call, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert retry_info(error) is not None
        await expect_error(
            suite.gifting.SendGift(gift), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
        )
        assert not [r for r in caplog.records if r.exc_info], "an outage logged a stack trace"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("not currently accepting connections" in r.getMessage() for r in caplog.records)
        # A LISTEN's own connection too (review r24: the feed's listener logged it as a crash).
        with pytest.raises(Exception) as listening:
            await suite.services["wallet"].runtime.db.driver.listen("coins_test", lambda _: None)
        assert outage_of(listening.value) is not None, listening.value
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()

    async def healed() -> bool:
        try:
            await suite.gifting.SendGift(gift)  # the same request id, applied once
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(healed, "the gift sent once the database lets the wallet in")
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 1


async def test_a_hung_database_turns_health_not_serving_and_back(
    wallet_behind_proxy: tuple[Suite, TcpProxy],
) -> None:
    """A database that stops answering without refusing (packets held) is an outage for the
    readiness probe too, not only one that refuses connections (an operator review saw SERVING
    for half a minute of a hang: the ping waited for the hung driver)."""
    suite, proxy = wallet_behind_proxy
    probe = health_pb2_grpc.HealthStub(suite.health_channel("wallet"))

    async def health_is(status: int) -> bool:
        answer = await probe.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(answer.status == status)

    assert await health_is(health_pb2.HealthCheckResponse.SERVING)
    proxy.hold()
    try:
        await eventually(
            lambda: health_is(health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING in a hang"
        )
    finally:
        proxy.heal()
    await eventually(lambda: health_is(health_pb2.HealthCheckResponse.SERVING), "SERVING again")


def test_a_connection_broken_mid_operation_is_an_outage_not_a_bug() -> None:
    """asyncpg's state error on a pooled connection whose server process was terminated (a
    PostgreSQL restart under load, as a fault-injection review saw) is UNAVAILABLE with a retry
    delay, not INTERNAL; a state error of another kind is still a bug."""
    broken = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    assert outage_of(RuntimeError("the gift's write failed")) is None
    wrapped = RuntimeError("the gift's write failed")
    wrapped.__cause__ = broken
    outage = outage_of(wrapped)
    assert outage is not None and outage.reason == "DATABASE_UNAVAILABLE"
    assert outage.retry_after is not None
    assert outage_of(asyncpg.exceptions.InternalClientError("unexpected state")) is None


def test_backoff_doubles_is_capped_and_never_overflows() -> None:
    assert [backoff(n, first=0.1, cap=5) for n in range(5)] == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert backoff(30, first=0.1, cap=5) == 5
    assert backoff(100_000, first=0.1, cap=5) == 5  # 0.1 * 2**100000 would overflow


async def test_work_whose_caller_gave_up_is_never_applied(
    wallet_behind_proxy: tuple[Suite, TcpProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A debit held up (its database stalled) past the caller's 1 s deadline is abandoned before it
    commits: the caller was told it failed, so it must not happen behind its back."""
    suite, proxy = wallet_behind_proxy
    user, coins = await funded_user(suite)
    suite.spans.clear()
    loop = asyncio.get_running_loop()
    shedder = suite.services["wallet"].shedder
    admit = shedder.admit
    server_deadlines: list[float] = []

    def admit_and_note_the_deadline(
        time_remaining: float | None, *, read: bool = False
    ) -> Admitted:
        # Called by the wallet's request guard once it has taken the caller's deadline on.
        left = deadlines.remaining()
        if left is not None:
            server_deadlines.append(loop.time() + left)
        return admit(time_remaining, read=read)

    monkeypatch.setattr(shedder, "admit", admit_and_note_the_deadline)
    proxy.hold()
    error = await rpc_error(
        suite.as_caller("gifting").wallet.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=new_id("gift:"),
                user_id=user,
                coins=5,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="late",
            ),
            timeout=1.0,
        )
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    monkeypatch.undo()
    assert len(server_deadlines) == 1, server_deadlines  # the debit's, and only it

    # Release the database once the wallet's own copy of the deadline (it started counting a moment
    # after the client) has passed too: then the stalled debit resumes, too late.
    async def past_the_wallets_deadline() -> bool:
        return loop.time() > server_deadlines[0]

    await eventually(past_the_wallets_deadline, "the wallet's deadline for the debit to pass")
    proxy.heal()

    def handled() -> list[ReadableSpan]:
        return [
            s
            for s in suite.spans.get_finished_spans()
            if s.name == "/coins.wallet.v1.WalletService/DebitCoins" and s.kind == SpanKind.SERVER
        ]

    async def finished() -> bool:
        return bool(handled())

    await eventually(finished, "the wallet to finish the stalled debit")
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == coins  # abandoned before commit: nothing moved


async def test_a_transaction_past_its_deadline_is_rolled_back(suite: Suite) -> None:
    """The last line of defence: a write whose caller's deadline has passed by the time it would
    commit is rolled back (DEADLINE_EXCEEDED), whichever path the service took to get there."""
    db = suite.services["wallet"].runtime.db
    user, coins = await funded_user(suite)
    account = f"user:{user}"

    async def late_write() -> None:
        deadlines.set_deadline(0.05)

        async def deadline_passed() -> bool:
            left = deadlines.remaining()
            return left is not None and left <= 0

        async with db.driver.transaction() as tx:
            await tx.run(_SPEND, account=account)
            # The work outlasts its caller's deadline.
            await eventually(deadline_passed, "the caller's deadline to pass")

    with pytest.raises(DeadlineExceeded):
        await asyncio.create_task(late_write())
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == coins


_SPEND = Statement(
    "test.spend",
    "UPDATE ledger_accounts SET balance = balance - 1 WHERE account_id = :account",
)


async def test_a_failed_statement_never_carries_its_values_into_logs(
    backend: str, tmp_path: Path
) -> None:
    """A statement's bound values (payment tokens, payout e-mail addresses) never reach an error's
    text, which the logs and spans carry: a fault-injection review found `tok_visa_…` in WARNING
    lines while PostgreSQL connections were being terminated. The outage's log line names only
    the driver's cause."""
    secret = "tok_visa_SECRET_p07"
    name = f"coins_hidden_{uuid.uuid4().hex[:12]}"
    url = (
        await create_pg_database(name)
        if backend == "postgres"
        else f"sqlite+aiosqlite:///{tmp_path / 'hidden.db'}"
    )
    db = Database(url)
    try:
        async with db.read() as conn:
            with pytest.raises(sa.exc.DBAPIError) as failed:
                await conn.execute(
                    sa.text("SELECT token FROM no_such_table WHERE token = :t"), {"t": secret}
                )
        assert secret not in str(failed.value)
        assert "no_such_table" in str(failed.value)  # the statement is still named
    finally:
        await db.close()
        if backend == "postgres":
            await drop_pg_database(name)
    cut = sa.exc.OperationalError(
        "INSERT INTO purchases (payment_token) VALUES (:t)",
        {"t": secret},
        ConnectionResetError("connection reset by peer"),
    )
    assert outage_of(cut) is not None
    assert outage_cause(cut) == "ConnectionResetError: connection reset by peer"


async def test_a_read_whose_pooled_connection_was_dropped_is_served_on_a_fresh_one(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that meets a dropped connection (the server terminated it mid-call) runs once more
    and is answered; a write is not run again by the guard (its retry is the caller's, by request
    id). A fault-injection review saw every pg_terminate_backend fail a few reads."""
    from services.wallet.domain import Wallet

    user, coins = await funded_user(suite)
    real = Wallet.coins
    failures = 0

    async def dropped_once(self: Wallet, *args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Wallet, "coins", dropped_once)
    answer = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert answer.balance.coins == coins and failures == 1

    async def always_dropped(self: Wallet, *args: Any, **kwargs: Any) -> Any:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("the database is down")

    monkeypatch.setattr(Wallet, "coins", always_dropped)  # a real outage: still UNAVAILABLE
    await expect_error(
        suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user)),
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
    )


def test_only_a_dropped_connection_is_worth_a_second_read_at_once() -> None:
    """A timeout (no pooled connection in time, a slow statement) is an outage too, but trying
    again at once would only double the wait and the load: reads are tried again only when the
    connection was dropped (review)."""
    dropped = asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of operation")
    assert connection_dropped(dropped)
    assert connection_dropped(ConnectionResetError("reset by peer"))
    assert not connection_dropped(sa.exc.TimeoutError("QueuePool limit reached"))
    assert not connection_dropped(TimeoutError())
    assert not connection_dropped(RuntimeError("a bug"))
    refused = DatabaseRefused('database "x" is not currently accepting connections (55000)')
    assert not connection_dropped(refused) and outage_of(refused) is not None
    assert outage_of(sa.exc.TimeoutError("QueuePool limit reached")) is not None


async def test_row_values_postgresql_quotes_never_reach_a_log_line(tmp_path: Path) -> None:
    """PostgreSQL's DETAIL quotes the key or row a statement failed on ("Key (t)=(tok_...)
    already exists"): an INTERNAL incident's log line and span would carry a payment token
    (review). The log handler and the incident span cut DETAIL lines."""
    import io

    from runtime.telemetry import _NoRowValues, without_row_values

    secret = "tok_visa_SECRET_d01"
    name = f"coins_detail_{uuid.uuid4().hex[:12]}"
    db = Database(await create_pg_database(name))
    try:
        async with db.transaction() as conn:
            await conn.execute(sa.text("CREATE TABLE t (token text PRIMARY KEY)"))
            await conn.execute(sa.text("INSERT INTO t VALUES (:v)"), {"v": secret})
        with pytest.raises(sa.exc.IntegrityError) as failed:
            async with db.transaction() as conn:
                await conn.execute(sa.text("INSERT INTO t VALUES (:v)"), {"v": secret})
    finally:
        await db.close()
        await drop_pg_database(name)
    assert secret in str(failed.value)  # PostgreSQL's own words quote it...
    assert secret not in without_row_values(str(failed.value))  # ... cut
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_NoRowValues(handler.formatter))  # type: ignore[arg-type]
    log = logging.getLogger("coins.test.detail")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise RuntimeError("the write failed") from failed.value
        except RuntimeError:
            log.exception("incident x")
    finally:
        log.removeHandler(handler)
    assert "IntegrityError" in out.getvalue() and "DETAIL: [row values withheld]" in out.getvalue()
    assert secret not in out.getvalue()


def test_background_work_logs_an_outage_in_one_line_and_a_bug_with_its_trace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """R5: reconcilers logged every attempt during an outage (a full disk, a held lock) as an ERROR
    with its stack trace: 11,499 lines in 4 minutes."""
    caplog.set_level(logging.WARNING)
    log = logging.getLogger("coins.test.background")
    for outage in (
        sqlite3.OperationalError("database or disk is full"),
        sqlite3.OperationalError("database is locked"),
    ):
        log_failure(log, outage, "cannot settle gift %s yet", "g1")
    # Another service unavailable (review r20: the abandoned-end sweep logged a wallet outage as an
    # ERROR with its traceback every pass).
    down = Unavailable("DEPENDENCY_UNAVAILABLE", "the wallet service is unavailable")
    log_failure(log, down, "cannot finish ending promotion %s yet", "p1")
    log_failure(log, KeyError("a bug"), "cannot settle gift %s yet", "g2")
    outages, bug = caplog.records[:3], caplog.records[3]
    assert [(r.levelno, r.exc_info) for r in outages] == [(logging.WARNING, None)] * 3
    assert outages[0].getMessage() == (
        "cannot settle gift g1 yet: database unavailable (OperationalError: database or disk is full)"
    )
    assert outages[2].getMessage() == (
        "cannot finish ending promotion p1 yet: the wallet service is unavailable "
        "(DEPENDENCY_UNAVAILABLE)"
    )
    assert bug.levelno == logging.ERROR and bug.exc_info is not None


def test_a_call_the_other_service_cancelled_is_unavailable_not_internal() -> None:
    """A service stopping gracefully cancels the calls it had not started: its caller was told
    INTERNAL DEPENDENCY_FAILED, with no log line, and the gift was voided later (review r9).
    Nothing was done there: UNAVAILABLE DEPENDENCY_UNAVAILABLE, worth sending again."""
    cancelled = grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Cancelled"
    )
    error = from_rpc_error(cancelled, dependency="wallet")
    assert (error.kind, error.reason, error.retryable) == (
        ErrorKind.UNAVAILABLE,
        "DEPENDENCY_UNAVAILABLE",
        True,
    )
    assert "wallet service stopped the call" in error.message


async def test_a_replica_frozen_inside_a_transaction_lets_its_row_locks_go(backend: str) -> None:
    """A replica frozen (or cut off) mid-transaction held its row locks until TCP gave up, and
    the other replica's calls queued behind them until its pool and health failed too (a review's
    SIGSTOP). The server now ends a session idle in its transaction after
    DATABASE_IDLE_TRANSACTION_TIMEOUT_SECONDS, and the frozen one's next statement is an outage."""
    if backend != "postgres":
        return  # one process, one writer: nothing to wait behind
    name = f"coins_test_idle_{uuid.uuid4().hex[:8]}"
    db = Database(await create_pg_database(name), idle_transaction_timeout=0.2)
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        with pytest.raises(Exception) as caught:  # the next statement, or the commit
            async with db.driver.transaction() as tx:
                row = await tx.one(Statement("test.pid", "SELECT pg_backend_pid()"))
                assert row is not None
                pid = row[0]

                async def session_ended() -> bool:
                    return not await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                    )

                await eventually(session_ended, "the server ending the idle transaction's session")
                await tx.one(Statement("test.after", "SELECT 1"))
        assert outage_of(caught.value) is not None, repr(caught.value)
    finally:
        await admin.close()
        await db.close()
        await drop_pg_database(name)
