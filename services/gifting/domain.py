"""Gifting rules and the steps of sending a gift. No gRPC here: other services are reached through ports.

Sending a gift is a small saga (see the README, "The money flow"):
1. `start`: refuse self-gifting, claim the request id and record the gift as `pending`, priced from the
   catalog (one statement on PostgreSQL; an unknown, inactive or oversized gift writes nothing and
   `refusal` says why);
2. the sender's coins are debited in the wallet, with a request id derived from the gift's id: the pivot;
3. `record_debit`: the gift becomes `debited`, the LIVE leaderboard grows, the creator's diamond credit
   is written to the outbox and the request's answer is stored, all in one statement;
4. the outbox relay delivers credits to the payout service in batches until acknowledged; a gift reads
   `credited` once its outbox row is delivered.
Any retry of any step repeats nothing: each step is keyed by the gift id.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from opentelemetry import propagate
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime import countries
from runtime.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from runtime.idempotency import KeyAnswer, KeyClaim
from runtime.ids import time_ordered_id
from runtime.metrics import after_commit
from runtime.sql import Tx, as_tx
from services.gifting import storage


class CoinDebiter(Protocol):
    """The wallet, as the gifting service needs it."""

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
        """Debit the sender, only if the creator may receive and the sender's country is one the
        gift is `offered_in` (empty: everywhere); returns (wallet transaction id, sender's balance
        after)."""
        ...

    async def resolve_gift_debit(
        self, *, sent_gift_id: str, sender_id: str, time_limit: float
    ) -> tuple[str, int] | str:
        """What became of a gift's debit whose answer was lost: (transaction id, balance after) if
        the coins moved, else the refusal's reason (a debit never received is voided: DEBIT_VOIDED)."""
        ...


@dataclass(frozen=True)
class PendingCredit:
    """A gift's diamond credit on its way to the payout service."""

    sent_gift_id: str
    creator_id: str
    coins: int


@dataclass(frozen=True)
class GiftChange:
    """A catalog gift as an admin sets it (SetGift)."""

    gift_id: str
    name: str
    coins: int
    active: bool
    regions: Sequence[str] = ()
    streakable: bool | None = None
    animation_ms: int | None = None


class DiamondCrediter(Protocol):
    """The payout service, as the gifting service needs it."""

    async def credit_gifts(
        self, credits: Sequence[PendingCredit], *, time_limit: float
    ) -> dict[str, int]:
        """Credit many gifts in one call and one transaction, each exactly once by its gift id;
        answers the diamonds each gift earned (by sent gift id)."""
        ...


@dataclass(frozen=True)
class Target:
    """Where a gift is sent: exactly one of a LIVE or a video."""

    live_id: str | None = None
    video_id: str | None = None


@dataclass(frozen=True)
class GiftOrder:
    """What a sender asks for: `count` of a catalog gift to a creator, on a LIVE or a video."""

    sender_id: str
    creator_id: str
    gift_id: str
    count: int
    target: Target


def debit_request_id(sent_gift_id: str) -> str:
    """The wallet request id of a gift's debit: retries of the gift reuse it, so it debits once."""
    return f"gift:{sent_gift_id}"


def credit_request_id(sent_gift_id: str) -> str:
    """The payout request id of a gift's credit: redeliveries reuse it, so it credits once."""
    return f"gift:{sent_gift_id}"


MAX_COINS_PER_SEND = 1_000_000_000
"""The most coins one SendGift may move: the wallet's DebitCoins bound."""


class Gifting:
    on_sent: Callable[[storage.SentGiftRecord], None] | None = None
    """Told of every gift once its debit is recorded and committed (the gift metrics)."""

    def _count(self, sent: storage.SentGiftRecord) -> None:
        if self.on_sent is not None:
            after_commit(functools.partial(self.on_sent, sent))

    async def set_gift(
        self,
        conn: AsyncConnection,
        change: GiftChange,
        *,
        now: dt.datetime,
        changed_by: str,
        reason: str,
    ) -> storage.GiftRecord:
        """Add, reprice, change or retire (active false) a catalog gift: every change is the gift's
        next version, kept with who made it and why; gifts already sent keep the version they
        were priced at. Unsaid, whether it streaks and its animation length stay as they are (a
        new gift: no streak, 1 s)."""
        for index, region in enumerate(change.regions):
            countries.check_assigned(f"regions[{index}]", region)
        current = await storage.get_gift(conn, change.gift_id)
        streakable = change.streakable
        if streakable is None:
            streakable = current.streakable if current is not None else False
        animation_ms = change.animation_ms
        if animation_ms is None:
            animation_ms = current.animation_ms if current is not None else 1000
        gift = storage.GiftRecord(
            gift_id=change.gift_id,
            name=change.name.strip() or change.gift_id,
            coins=change.coins,
            streakable=streakable,
            active=change.active,
            regions=tuple(sorted(set(change.regions))),
            animation_ms=animation_ms,
        )
        return await storage.save_gift(conn, gift, now=now, changed_by=changed_by, reason=reason)

    async def gift_versions(
        self, conn: AsyncConnection, gift_id: str, *, limit: int, before: int | None
    ) -> list[storage.GiftVersionRecord]:
        """At most `limit` of a catalog gift's versions, newest first, older than `before` if
        given; NOT_FOUND GIFT_NOT_FOUND for no such gift."""
        versions = await storage.gift_versions_of(conn, gift_id, limit=limit, before=before)
        if not versions and before is None:
            raise NotFound("GIFT_NOT_FOUND", f"no gift {gift_id!r} in the catalog", gift_id=gift_id)
        return versions

    async def catalog(
        self,
        conn: AsyncConnection,
        *,
        limit: int,
        after: tuple[int, str] | None,
        region: str = "",
    ) -> list[storage.GiftRecord]:
        """A page of the active catalog, cheapest first (with `region`: the gifts offered there)."""
        if region:
            countries.check_assigned("region", region)
        return await storage.list_gifts(conn, limit=limit, after=after, region=region)

    async def top_gifters(
        self, conn: AsyncConnection, live_id: str, *, limit: int, after: tuple[int, str] | None
    ) -> list[tuple[str, int]]:
        """A page of a LIVE's gifters (sender, coins), most coins first."""
        return await storage.top_gifters(conn, live_id, limit=limit, after=after)

    async def creator_rankings(
        self,
        conn: AsyncConnection,
        period: str,
        key: str,
        *,
        limit: int,
        after: tuple[int, str] | None,
    ) -> list[tuple[str, int]]:
        """A page of a period's creators (creator, coins), most coins first: credited gifts only."""
        return await storage.creator_rankings_page(conn, period, key, limit=limit, after=after)

    async def creator_gifters(
        self, conn: AsyncConnection, creator_id: str, *, limit: int, after: tuple[int, str] | None
    ) -> list[tuple[str, int]]:
        """A page of a creator's gifters (sender, coins), most coins first: credited gifts only."""
        return await storage.creator_gifters_page(conn, creator_id, limit=limit, after=after)

    async def parked_credits(
        self, conn: AsyncConnection, *, limit: int, after_outbox_id: int | None
    ) -> list[storage.ParkedCreditRecord]:
        """Credits the payout service refused for good, waiting for an operator, oldest first."""
        return await storage.parked_credits(conn, limit=limit, after_outbox_id=after_outbox_id)

    async def redeliver(
        self, conn: AsyncConnection, sent_gift_ids: Sequence[str], now: dt.datetime
    ) -> tuple[list[str], list[str]]:
        """Put parked credits back on the outbox (their cause fixed); delivered credits and credits
        still on their way are left alone. Payout credits each gift once, whatever happened before.
        Returns (the gifts redelivered, the others asked for: unknown, delivered or on their way),
        each in the order asked, so an operator sees a mistyped id rather than a short count."""
        unparked = await storage.unpark_credits(conn, sent_gift_ids, now)
        return (
            [g for g in sent_gift_ids if g in unparked],
            [g for g in sent_gift_ids if g not in unparked],
        )

    def new_sent_gift_id(self) -> str:
        return time_ordered_id()

    async def start(
        self,
        tx: Tx,
        claim: KeyClaim,
        sent_gift_id: str,
        order: GiftOrder,
        now: dt.datetime,
    ) -> storage.SentGiftRecord | None:
        """Claim the request and record the gift as `pending`, priced from the catalog (one statement
        on PostgreSQL). None if nothing was written: see `refusal` (or the request was claimed before).
        Whether the creator may receive is the wallet's to say, with the debit (it keeps the accounts)."""
        if order.sender_id == order.creator_id:
            raise InvalidArgument(
                "SELF_GIFTING",
                "users cannot send gifts to themselves",
                violations=(FieldViolation("creator_id", "must not be the sender"),),
                user_id=order.sender_id,
            )
        pending = storage.SentGiftRecord(
            sent_gift_id=sent_gift_id,
            sender_id=order.sender_id,
            creator_id=order.creator_id,
            gift_id=order.gift_id,
            count=order.count,
            coins=0,
            live_id=order.target.live_id,
            video_id=order.target.video_id,
            status="pending",
            wallet_transaction_id=None,
            created_at=now,
            updated_at=now,
        )
        priced = await storage.start_sent_gift(tx, pending, claim, MAX_COINS_PER_SEND)
        if priced is None:
            return None
        coins, streakable, version, regions = priced
        return replace(
            pending, coins=coins, streakable=streakable, gift_version=version, offered_in=regions
        )

    async def offered_in(self, tx: Tx, sent: storage.SentGiftRecord) -> tuple[str, ...]:
        """Where the version a resumed gift was priced at is offered (empty: everywhere)."""
        if sent.gift_version is None:
            return ()
        return await storage.version_regions(tx, sent.gift_id, sent.gift_version)

    async def refusal(self, tx: Tx, gift_id: str, count: int) -> DomainError:
        """Why a gift could not be started: not in the catalog, retired, or too large."""
        price = await storage.gift_price(tx, gift_id)
        if price is None:
            return NotFound(
                "GIFT_NOT_FOUND", f"no gift {gift_id!r} in the catalog", gift_id=gift_id
            )
        if not price[1]:
            return FailedPrecondition(
                "GIFT_RETIRED",
                f"gift {gift_id!r} is retired: no longer on sale (ListGifts shows what is)",
                gift_id=gift_id,
            )
        unit = price[0]
        return InvalidArgument(
            "GIFT_TOO_LARGE",
            f"{count} x {gift_id} is {unit * count} coins; one send may move at most "
            f"{MAX_COINS_PER_SEND}",
            violations=(
                FieldViolation("count", f"at most {MAX_COINS_PER_SEND // unit} of this gift"),
            ),
            max_count=MAX_COINS_PER_SEND // unit,
        )

    async def sent_gift(self, tx: Tx, sent_gift_id: str) -> storage.SentGiftRecord:
        """A gift that was sent (its coins debited); one still pending or refused was never sent."""
        sent = await storage.get_sent_gift(tx, sent_gift_id)
        if sent is None or sent.status in ("pending", "failed"):
            raise NotFound(
                "SENT_GIFT_NOT_FOUND", f"no sent gift {sent_gift_id!r}", sent_gift_id=sent_gift_id
            )
        return sent

    async def record_debit(
        self,
        conn: AsyncConnection | Tx,
        sent: storage.SentGiftRecord,
        wallet_transaction_id: str,
        now: dt.datetime,
        answer: KeyAnswer | None = None,
    ) -> bool:
        """The coins are gone: rank the sender, queue the creator's credit (carrying this trace), and
        store the request's answer, all at once. False if done already."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        recorded = await storage.record_debited(
            conn,
            sent,
            wallet_transaction_id=wallet_transaction_id,
            traceparent=carrier.get("traceparent", ""),
            now=now,
            answer=answer,
        )
        if recorded:
            self._count(sent)
        return recorded

    async def record_debit_in_streak(
        self,
        tx: Tx,
        sent: storage.SentGiftRecord,
        wallet_transaction_id: str,
        now: dt.datetime,
        answer: KeyAnswer,
        *,
        new_streak_id: str,
        cutoff: dt.datetime,
    ) -> storage.InStreak:
        """`record_debit` for a streaking gift that joins its streak in the same statement
        (PostgreSQL)."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        joined = await storage.record_debited_in_streak(
            tx,
            sent,
            wallet_transaction_id=wallet_transaction_id,
            traceparent=carrier.get("traceparent", ""),
            now=now,
            answer=answer,
            new_streak_id=new_streak_id,
            cutoff=cutoff,
        )
        if joined.recorded:
            self._count(sent)
        return joined

    async def record_failure(
        self,
        conn: AsyncConnection | Tx,
        sent_gift_id: str,
        now: dt.datetime,
        answer: KeyAnswer | None = None,
    ) -> None:
        """The debit was refused (not enough coins, no account): the gift never happened."""
        await storage.move_sent_gift(
            conn, sent_gift_id, from_status="pending", to_status="failed", now=now
        )
        if answer is not None:
            await answer.store(as_tx(conn))
