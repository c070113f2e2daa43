"""Gifting records as protobuf messages: shared by the gRPC layer and the saga steps that store answers."""

from __future__ import annotations

from coins.gifting.v1 import gifting_pb2
from runtime.protos import timestamp
from services.gifting import storage
from services.gifting.lives import LiveSummary

_CREDIT_STATUS = {
    "debited": gifting_pb2.CREDIT_STATUS_PENDING,
    "credited": gifting_pb2.CREDIT_STATUS_CREDITED,
    "reversed": gifting_pb2.CREDIT_STATUS_REVERSED,
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
    if sent.gift_version is not None:
        message.gift_version = sent.gift_version
    if sent.streak_id:
        message.streak.CopyFrom(
            gifting_pb2.Streak(streak_id=sent.streak_id, count=sent.streak_count or 0)
        )
        if sent.streak_ended_at is not None:
            message.streak.end_time.CopyFrom(timestamp(sent.streak_ended_at))
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
        gift_id=gift.gift_id,
        name=gift.name,
        coins=gift.coins,
        streakable=gift.streakable,
        version=gift.version,
        regions=gift.regions,
        animation_ms=gift.animation_ms,
    )


def gift_version_pb(version: storage.GiftVersionRecord) -> gifting_pb2.GiftVersion:
    return gifting_pb2.GiftVersion(
        gift=gift_pb(version.gift),
        active=version.gift.active,
        create_time=timestamp(version.created_at),
        changed_by=version.changed_by,
        reason=version.reason,
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


def live_pb(live: storage.LiveRecord) -> gifting_pb2.Live:
    message = gifting_pb2.Live(
        live_id=live.live_id,
        creator_id=live.creator_id,
        title=live.title,
        gifts_enabled=live.gifts_enabled and live.ended_at is None,
        start_time=timestamp(live.started_at),
    )
    if live.ended_at is not None:
        message.end_time.CopyFrom(timestamp(live.ended_at))
    return message


def live_summary_pb(summary: LiveSummary) -> gifting_pb2.LiveSummary:
    return gifting_pb2.LiveSummary(
        coins_received=summary.coins_received,
        gifts_sent=summary.gifts_sent,
        unique_gifters=summary.unique_gifters,
        top_gifters=[
            gifting_pb2.Gifter(user_id=user, coins=coins, rank=rank)
            for rank, (user, coins) in enumerate(summary.top_gifters, start=1)
        ],
        last_cursor=summary.last_cursor,
        diamonds_earned=summary.diamonds_earned,
    )


def live_event_pb(
    event: storage.LiveEventRecord, summary: LiveSummary | None = None
) -> gifting_pb2.WatchLiveResponse:
    message = gifting_pb2.WatchLiveResponse(cursor=event.seq, time=timestamp(event.created_at))
    if event.kind == "gift":
        message.gift.CopyFrom(
            gifting_pb2.LiveGift(
                sent_gift_id=event.sent_gift_id or "",
                sender_id=event.sender_id or "",
                gift_id=event.gift_id or "",
                count=event.count or 0,
                coins=event.coins or 0,
                streak_id=event.streak_id or "",
                streak_count=event.streak_count or 0,
            )
        )
    elif event.kind == "streak_ended":
        message.streak_ended.CopyFrom(
            gifting_pb2.LiveStreakEnded(
                streak_id=event.streak_id or "",
                sender_id=event.sender_id or "",
                gift_id=event.gift_id or "",
                count=event.count or 0,
            )
        )
    else:
        message.ended.CopyFrom(
            gifting_pb2.LiveEnded(summary=live_summary_pb(summary) if summary else None)
        )
    return message
