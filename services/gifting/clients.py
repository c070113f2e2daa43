"""Adapters from the gifting domain's ports to the wallet and payout gRPC contracts."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from runtime.clients import answer_of
from runtime.errors import DEBIT_VOIDED
from services.gifting.domain import PendingCredit, credit_request_id, debit_request_id
from services.gifting.reversals import ReversedCredit


def debit_request(
    sent_gift_id: str,
    sender_id: str,
    creator_id: str,
    coins: int,
    offered_in: Sequence[str] = (),
) -> wallet_pb2.DebitCoinsRequest:
    """What gifting asks of the wallet for one gift (pinned by contracts/wallet.json); the wallet,
    which knows the sender's country, refuses a gift not offered there (`offered_in`)."""
    return wallet_pb2.DebitCoinsRequest(
        request_id=debit_request_id(sent_gift_id),
        user_id=sender_id,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference=sent_gift_id,
        recipient_id=creator_id,
        offered_in=sorted(offered_in),
    )


def credit_request(
    sent_gift_id: str, creator_id: str, coins: int
) -> payout_pb2.CreditDiamondsRequest:
    """What gifting asks of payout for one gift (pinned by contracts/payout.json)."""
    return payout_pb2.CreditDiamondsRequest(
        request_id=credit_request_id(sent_gift_id),
        creator_id=creator_id,
        coins=coins,
        reference=sent_gift_id,
    )


def reversed_credits_request(after: int | str, limit: int) -> payout_pb2.ListReversedCreditsRequest:
    """What gifting asks of payout to follow its reversals (pinned by contracts/payout.json)."""
    return payout_pb2.ListReversedCreditsRequest(after_sequence=int(after), page_size=limit)


class WalletDebiter:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._wallet = wallet_pb2_grpc.WalletServiceStub(channel)

    async def debit_for_gift(
        self,
        *,
        sent_gift_id: str,
        sender_id: str,
        creator_id: str,
        coins: int,
        offered_in: Sequence[str] = (),
        time_limit: float,
    ) -> tuple[str, int]:
        response = await answer_of(
            self._wallet.DebitCoins(
                debit_request(sent_gift_id, sender_id, creator_id, coins, offered_in),
                timeout=time_limit,
            ),
            "wallet",
        )
        return response.transaction_id, response.balance.coins

    async def resolve_gift_debit(
        self, *, sent_gift_id: str, sender_id: str, time_limit: float
    ) -> tuple[str, int] | str:
        response = await answer_of(
            self._wallet.ResolveDebit(
                wallet_pb2.ResolveDebitRequest(
                    request_id=debit_request_id(sent_gift_id), user_id=sender_id
                ),
                timeout=time_limit,
            ),
            "wallet",
        )
        if response.outcome == wallet_pb2.DEBIT_OUTCOME_DEBITED:
            return response.debit.transaction_id, response.debit.balance.coins
        if response.outcome == wallet_pb2.DEBIT_OUTCOME_VOIDED:
            return DEBIT_VOIDED
        return response.reason


class PayoutCrediter:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._payout = payout_pb2_grpc.PayoutServiceStub(channel)

    async def credit_gifts(
        self, credits: Sequence[PendingCredit], *, time_limit: float
    ) -> dict[str, int]:
        """Credit the gifts' creators; the diamonds each gift earned, by sent gift id."""
        request = payout_pb2.BatchCreditDiamondsRequest(
            requests=[credit_request(c.sent_gift_id, c.creator_id, c.coins) for c in credits]
        )
        answer = await answer_of(
            self._payout.BatchCreditDiamonds(request, timeout=time_limit),
            "payout",
        )
        return {
            c.sent_gift_id: r.diamonds_credited
            for c, r in zip(credits, answer.responses, strict=True)
        }

    async def reversed_credits(
        self, after: int, *, limit: int, time_limit: float
    ) -> list[ReversedCredit]:
        """Payout's gift credits reversed after reversal number `after`, in order."""
        answer = await answer_of(
            self._payout.ListReversedCredits(
                reversed_credits_request(after, limit), timeout=time_limit
            ),
            "payout",
        )
        return [ReversedCredit(c.sequence, c.gift_id, c.diamonds) for c in answer.credits]
