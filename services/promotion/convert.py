"""Promotion records as protobuf messages: shared by the gRPC layer and the saga steps that store
answers (the requests' idempotency records keep serialized responses)."""

from __future__ import annotations

import datetime as dt

from coins.promotion.v1 import promotion_pb2
from runtime.protos import timestamp
from services.promotion import storage
from services.promotion.domain import status_at

GOALS = {
    promotion_pb2.GOAL_VIDEO_VIEWS: "video_views",
    promotion_pb2.GOAL_PROFILE_VISITS: "profile_visits",
    promotion_pb2.GOAL_FOLLOWERS: "followers",
    promotion_pb2.GOAL_WEBSITE_VISITS: "website_visits",
}
GOAL_ENUM = {name: value for value, name in GOALS.items()}
_STATUS = {
    "pending": promotion_pb2.PROMOTION_STATUS_PENDING,
    "active": promotion_pb2.PROMOTION_STATUS_ACTIVE,
    "rejected": promotion_pb2.PROMOTION_STATUS_REJECTED,
    "completed": promotion_pb2.PROMOTION_STATUS_COMPLETED,
}
STATUSES = {value: name for name, value in _STATUS.items()}
"""A status filter's stored name (PROMOTION_STATUS_UNSPECIFIED: none)."""


def promotion_pb(p: storage.PromotionRecord, now: dt.datetime) -> promotion_pb2.Promotion:
    return promotion_pb2.Promotion(
        promotion_id=p.promotion_id,
        user_id=p.user_id,
        video_id=p.video_id,
        goal=GOAL_ENUM[p.goal],
        budget_coins=p.budget_coins,
        spent_coins=p.spent_coins,
        duration_days=p.duration_days,
        status=_STATUS[status_at(p, now)],
        create_time=timestamp(p.created_at),
        end_time=timestamp(p.ends_at),
    )
