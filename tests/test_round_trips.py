"""The money path's database work per RPC, read from its spans: the statements each hot RPC runs, so
that a change that adds a round trip (or a read-back, or a transaction) shows here first."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from tests.helpers import funded_user, live_of, new_creator, new_id
from tests.suite import Suite


def units_under(suite: Suite, service: str, method: str) -> list[tuple[str, tuple[str, ...]]]:
    """(span name, statements) of every driver unit of work under the last `method` server span."""
    spans: list[ReadableSpan] = list(suite.spans.get_finished_spans())
    server = [
        s
        for s in spans
        if s.kind == SpanKind.SERVER
        and s.name.endswith(method)
        and s.resource.attributes["service.name"] == f"coins-{service}"
    ][-1]
    return [
        (s.name, tuple(s.attributes["db.statements"]))  # type: ignore[index, arg-type]
        for s in spans
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "coins.db"
        and s.parent is not None
        and s.parent.span_id == server.context.span_id
    ]


async def test_a_gift_costs_gifting_two_statements_and_the_wallet_two(suite: Suite) -> None:
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)

    async def gift(gift_id: str = "rose") -> None:
        await suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id("gift"),
                sender_id=sender,
                creator_id=creator,
                gift_id=gift_id,
                count=1,
                live_id=live_of(creator),
            )
        )

    await gift()  # the wallet learns that system:gift_spend keeps no balance
    suite.spans.clear()
    await gift("rainbow-puke")  # 100 coins: does not streak

    gifting = units_under(suite, "gifting", "/SendGift")
    wallet = units_under(suite, "wallet", "/DebitCoins")
    if suite.backend == "postgres":
        assert gifting == [
            ("db.statement", ("gifting.start_gift",)),
            ("db.statement", ("gifting.record_debit",)),
        ]
        # A gift that streaks (rose) joins its streak in the statement that records it: its
        # running count is in the answer.
        suite.spans.clear()
        await gift("panda")  # a new streak of panda
        assert units_under(suite, "gifting", "/SendGift") == [
            ("db.statement", ("gifting.start_gift",)),
            ("db.statement", ("gifting.record_debit_in_streak",)),
        ]
        # One read, then the debit, its rows and the request's answer as one statement.
        assert wallet == [
            ("db.query", ("ledger.read_account",)),
            ("db.statement", ("ledger.post_at_once",)),
        ]
    else:  # in-process statements: one transaction per step, no round trips to save
        assert [name for name, _ in gifting] == ["db.transaction", "db.transaction"]
        assert [name for name, _ in wallet] == ["db.transaction"]


async def test_a_balance_is_one_read(suite: Suite) -> None:
    user, _ = await funded_user(suite)
    suite.spans.clear()
    await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert units_under(suite, "wallet", "/GetBalance") == [("db.query", ("wallet.coin_state",))]
