"""Payout rules: crediting diamonds from gifts, withdrawal limits, and settling with the processor."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from ledger import Ledger, Posting
from runtime.errors import FailedPrecondition, NotFound
from services.payout import policy, storage
from services.payout.settings import PayoutSettings

ISSUANCE = "system:diamond_issuance"
IN_FLIGHT = "system:withdrawals_in_flight"
PAID_OUT = "system:paid_out"


def creator_account(creator_id: str) -> str:
    """The ledger account that holds a creator's diamonds."""
    return f"creator:{creator_id}"


@dataclass(frozen=True)
class Credit:
    diamonds_credited: int
    balance: int


class Payouts:
    def __init__(self, settings: PayoutSettings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger

    async def credit(
        self,
        conn: AsyncConnection,
        *,
        creator_id: str,
        coins: int,
        reference: str,
        request_id: str,
        now: dt.datetime,
    ) -> Credit:
        """Turn a gift's coins into diamonds: the creator is owed floor(all coins received x rate)."""
        total_coins, credited = await storage.accrue_coins(conn, creator_id, coins, now)
        account = creator_account(creator_id)
        if credited == 0:
            await self.ledger.open_account(conn, account)
        owed = policy.diamonds_owed(total_coins, self.settings)
        delta = owed - credited
        if delta == 0:
            return Credit(0, await self.ledger.balance(conn, account) or 0)
        await storage.set_diamonds_credited(conn, creator_id, owed)
        posted = await self.ledger.post(
            conn,
            [Posting(ISSUANCE, -delta), Posting(account, delta)],
            kind="gift",
            reference=reference,
            request_id=request_id,
            caller="internal",
            policy_version=self.settings.policy_version,
        )
        return Credit(delta, posted.balances[account])

    async def balance(self, conn: AsyncConnection, creator_id: str) -> int:
        return await self.ledger.balance(conn, creator_account(creator_id)) or 0

    async def request_withdrawal(
        self,
        conn: AsyncConnection,
        *,
        creator_id: str,
        diamonds: int,
        method: str,
        destination_token: str,
        request_id: str,
        now: dt.datetime,
    ) -> tuple[storage.WithdrawalRecord, int]:
        """Take the diamonds into the in-flight account and record a pending withdrawal."""
        if not await storage.creator_exists(conn, creator_id):
            raise NotFound(
                "CREATOR_NOT_FOUND",
                f"creator {creator_id} has never received diamonds",
                creator_id=creator_id,
            )
        quote = policy.quote(diamonds, self.settings)
        minimum = self.settings.min_withdrawal_minor
        if quote.gross_minor < minimum or quote.net_minor <= 0:
            raise FailedPrecondition(
                "BELOW_MINIMUM",
                f"{diamonds} diamonds are worth {quote.gross_minor} minor units; the minimum "
                f"withdrawal is {minimum} ({minimum * self.settings.diamonds_per_minor_unit} diamonds)",
                minimum_minor=minimum,
                requested_minor=quote.gross_minor,
            )
        withdrawal_id = uuid.uuid4().hex
        # Taking the diamonds first locks the creator's balance row, so the daily-cap sum below sees
        # every concurrent withdrawal of this creator that committed before us.
        posted = await self.ledger.post(
            conn,
            [
                Posting(creator_account(creator_id), -quote.diamonds),
                Posting(IN_FLIGHT, quote.diamonds),
            ],
            kind="withdrawal",
            reference=withdrawal_id,
            request_id=request_id,
            caller="payout",
            policy_version=self.settings.policy_version,
        )
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        today = await storage.withdrawn_since(conn, creator_id, day_start)
        cap = self.settings.daily_withdrawal_cap_minor
        if today + quote.gross_minor > cap:
            raise FailedPrecondition(
                "DAILY_LIMIT_EXCEEDED",
                f"withdrawals are capped at {cap} minor units a day; {max(0, cap - today)} remain today",
                cap_minor=cap,
                remaining_minor=max(0, cap - today),
            )
        withdrawal = storage.WithdrawalRecord(
            withdrawal_id=withdrawal_id,
            creator_id=creator_id,
            diamonds=quote.diamonds,
            gross_minor=quote.gross_minor,
            fee_minor=quote.fee_minor,
            currency_code=self.settings.currency_code,
            method=method,
            destination_token=destination_token,
            status="pending",
            failure_reason="",
            processor_reference=None,
            created_at=now,
            updated_at=now,
        )
        await storage.insert_withdrawal(conn, withdrawal)
        return withdrawal, posted.balances[creator_account(creator_id)]

    async def settle(
        self,
        conn: AsyncConnection,
        withdrawal: storage.WithdrawalRecord,
        *,
        paid: bool,
        processor_reference: str,
        failure_reason: str,
        now: dt.datetime,
    ) -> bool:
        """Record the processor's outcome once: paid diamonds leave the books, failed ones go back."""
        moved = await storage.move_withdrawal(
            conn,
            withdrawal.withdrawal_id,
            from_status="processing",
            to_status="paid" if paid else "failed",
            now=now,
            failure_reason=failure_reason,
            processor_reference=processor_reference,
        )
        if not moved:
            return False
        destination = PAID_OUT if paid else creator_account(withdrawal.creator_id)
        await self.ledger.post(
            conn,
            [Posting(IN_FLIGHT, -withdrawal.diamonds), Posting(destination, withdrawal.diamonds)],
            kind="withdrawal_paid" if paid else "withdrawal_returned",
            reference=withdrawal.withdrawal_id,
            request_id=f"settle:{withdrawal.withdrawal_id}",
            caller="payout",
            policy_version=self.settings.policy_version,
        )
        return True
