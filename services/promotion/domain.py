"""Promotion rules. A promotion is recorded `pending`, its budget is debited in the wallet with a request
id derived from the promotion's id (so retries debit once), and it becomes `active`, or `rejected` when the
wallet refuses (nothing charged)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from services.promotion import storage


class BudgetPayer(Protocol):
    """The wallet, as the promotion service needs it."""

    async def pay_budget(
        self, *, promotion_id: str, user_id: str, coins: int, time_limit: float
    ) -> tuple[str, int]:
        """Debit the budget; returns (wallet transaction id, payer's balance after)."""
        ...


def debit_request_id(promotion_id: str) -> str:
    return f"promotion:{promotion_id}"


class Promotions:
    async def create(
        self,
        conn: AsyncConnection,
        *,
        user_id: str,
        video_id: str,
        goal: str,
        budget_coins: int,
        duration_days: int,
        now: dt.datetime,
    ) -> str:
        promotion_id = uuid.uuid4().hex
        await storage.insert_promotion(
            conn,
            storage.PromotionRecord(
                promotion_id=promotion_id,
                user_id=user_id,
                video_id=video_id,
                goal=goal,
                budget_coins=budget_coins,
                spent_coins=0,
                duration_days=duration_days,
                status="pending",
                wallet_transaction_id=None,
                created_at=now,
                updated_at=now,
            ),
        )
        return promotion_id

    async def activate(
        self, conn: AsyncConnection, promotion_id: str, wallet_transaction_id: str, now: dt.datetime
    ) -> bool:
        return await storage.move_promotion(
            conn,
            promotion_id,
            from_status="pending",
            to_status="active",
            now=now,
            wallet_transaction_id=wallet_transaction_id,
        )

    async def reject(self, conn: AsyncConnection, promotion_id: str, now: dt.datetime) -> None:
        await storage.move_promotion(
            conn, promotion_id, from_status="pending", to_status="rejected", now=now
        )
