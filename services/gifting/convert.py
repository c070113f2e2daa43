"""Gifting records as protobuf messages: shared by the gRPC layer and the saga steps that store answers."""

from __future__ import annotations

from coins.gifting.v1 import gifting_pb2
from runtime.protos import timestamp
from services.gifting import storage

_CREDIT_STATUS = {
    "debited": gifting_pb2.CREDIT_STATUS_PENDING,
    "credited": gifting_pb2.CREDIT_STATUS_CREDITED,
}


def sent_gift_pb(sent: storage.SentGiftRecord) -> gifting_pb2.SentGift:
    message = gifting_pb2.SentGift(
        sent_gift_id=sent.sent_gift_id,
        sender_id=sent.sender_id,
        creator_id=sent.creator_id,
        gift_id=sent.gift_id,
        count=sent.count,
        coins=sent.coins,
        credit_status=_CREDIT_STATUS.get(sent.status, gifting_pb2.CREDIT_STATUS_UNSPECIFIED),
        create_time=timestamp(sent.created_at),
    )
    if sent.live_id:
        message.live_id = sent.live_id
    if sent.video_id:
        message.video_id = sent.video_id
    return message


def send_gift_response(
    sent: storage.SentGiftRecord, sender_balance: int
) -> gifting_pb2.SendGiftResponse:
    """SendGift's answer: the gift as sent, and what the sender has left."""
    return gifting_pb2.SendGiftResponse(
        sent_gift=sent_gift_pb(sent), sender_balance_coins=sender_balance
    )


def gift_pb(gift: storage.GiftRecord) -> gifting_pb2.Gift:
    return gifting_pb2.Gift(
        gift_id=gift.gift_id, name=gift.name, coins=gift.coins, streakable=gift.streakable
    )


def parked_credit_pb(credit: storage.ParkedCreditRecord) -> gifting_pb2.ParkedCredit:
    return gifting_pb2.ParkedCredit(
        sent_gift_id=credit.sent_gift_id,
        creator_id=credit.creator_id,
        coins=credit.coins,
        attempts=credit.attempts,
        last_error=credit.last_error,
        create_time=timestamp(credit.created_at),
    )
