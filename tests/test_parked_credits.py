"""Parked credits: a gift's diamond credit the payout service refused for good waits for an operator,
who lists it (ListParkedCredits, admin) and, once the cause is fixed, redelivers it
(RedeliverParkedCredits, admin, audited): it is credited exactly once."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from services.gifting import storage
from tests.helpers import eventually, expect_error, funded_user, new_creator, new_id
from tests.suite import Suite
from tests.test_cross_audit import urls
from tools.cross_audit import cross_audit


async def park(suite: Suite, sender: str, creator: str, coins: int) -> str:
    """A gift whose credit was refused for good (as the relay leaves it)."""
    sent_gift_id = uuid.uuid4().hex
    now = dt.datetime.now(dt.UTC)
    async with suite.services["gifting"].runtime.db.transaction() as conn:
        await conn.execute(
            storage.sent_gifts.insert().values(
                sent_gift_id=sent_gift_id,
                sender_id=sender,
                creator_id=creator,
                gift_id="rose",
                count=coins,
                coins=coins,
                live_id="live-parked",
                video_id=None,
                status="debited",
                wallet_transaction_id="tx-parked",
                created_at=now,
                updated_at=now,
            )
        )
        await conn.execute(
            storage.credit_outbox.insert().values(
                sent_gift_id=sent_gift_id,
                creator_id=creator,
                coins=coins,
                traceparent="",
                attempts=1,
                next_attempt_at=now,
                delivered_at=None,
                dead=True,
                last_error="INVALID_ARGUMENT: refused",
                created_at=now,
            )
        )
    return sent_gift_id


async def test_a_parked_credit_is_listed_redelivered_and_credited_once(suite: Suite) -> None:
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    parked = await park(suite, sender, creator, 40)
    admin = suite.token(new_id("ops"), admin=True)

    async def listed() -> set[str]:
        found: set[str] = set()
        token = ""
        while True:
            page = await suite.gifting.ListParkedCredits(
                gifting_pb2.ListParkedCreditsRequest(page_size=2, page_token=token), metadata=admin
            )
            found |= {c.sent_gift_id for c in page.credits}
            token = page.next_page_token
            if not token:
                return found

    assert parked in await listed()
    assert parked in (await cross_audit(urls(suite))).parked  # the operators' audit names it
    await expect_error(  # not for a plain user
        suite.gifting.ListParkedCredits(
            gifting_pb2.ListParkedCreditsRequest(), metadata=suite.token(creator)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )
    redeliver = gifting_pb2.RedeliverParkedCreditsRequest(
        request_id=new_id("redeliver"),
        sent_gift_ids=["no-such-gift", parked],
        reason="payout fixed",
    )
    answer = await suite.gifting.RedeliverParkedCredits(redeliver, metadata=admin)
    assert (answer.redelivered, list(answer.not_parked_ids)) == (1, ["no-such-gift"])

    async def credited() -> bool:
        balance = await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
        return balance.balance.diamonds == 20  # 40 coins -> 20 diamonds

    await eventually(credited, "the redelivered credit")
    assert parked not in await listed()
    assert parked not in (await cross_audit(urls(suite))).parked
    again = await suite.gifting.RedeliverParkedCredits(redeliver, metadata=admin)
    assert again == answer  # the same request: the same answer
    fresh = gifting_pb2.RedeliverParkedCreditsRequest(
        request_id=new_id("redeliver"), sent_gift_ids=[parked], reason="payout fixed"
    )
    delivered = await suite.gifting.RedeliverParkedCredits(fresh, metadata=admin)
    assert (delivered.redelivered, list(delivered.not_parked_ids)) == (0, [parked])
