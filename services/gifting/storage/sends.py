"""Sent gifts: started and priced, recorded debited (with the LIVE's leaderboard, feed and
the creator's credit in the outbox), failed; a LIVE's top gifters."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.idempotency import ANSWER_SQL, KeyAnswer, KeyClaim
from runtime.sql import Statement, Tx, as_tx
from services.gifting.storage.catalog import regions_of
from services.gifting.storage.tables import live_gifters, sent_gifts


@dataclass(frozen=True)
class SentGiftRecord:
    sent_gift_id: str
    sender_id: str
    creator_id: str
    gift_id: str
    count: int
    coins: int
    live_id: str | None
    video_id: str | None
    status: str
    wallet_transaction_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    streakable: bool = False
    """The catalog said, when it was priced, that this gift streaks."""
    streak_id: str | None = None
    streak_count: int | None = None
    """Its streak's running count, this send included."""
    streak_ended_at: dt.datetime | None = None
    gift_version: int | None = None
    """The catalog version it was priced at (None: sent before versions were kept)."""
    offered_in: tuple[str, ...] = ()
    """Where that version is offered (empty: everywhere): known when priced, not stored."""


_START_GIFT_COLUMNS = (
    "sent_gift_id, sender_id, creator_id, gift_id, count, coins, live_id, video_id, status, "
    "wallet_transaction_id, created_at, updated_at, streakable, gift_version"
)


async def insert_sent_gift(conn: AsyncConnection | Tx, sent: SentGiftRecord) -> None:
    """A pending gift as priced already (`start_sent_gift` prices it from the catalog)."""
    assert sent.status == "pending" and sent.wallet_transaction_id is None
    await as_tx(conn).run(
        _INSERT_SENT_GIFT,
        sent_gift_id=sent.sent_gift_id,
        sender_id=sent.sender_id,
        creator_id=sent.creator_id,
        gift_id=sent.gift_id,
        count=sent.count,
        coins=sent.coins,
        live_id=sent.live_id,
        video_id=sent.video_id,
        now=sent.created_at,
        streakable=sent.streakable,
        gift_version=sent.gift_version,
    )


def sent_gift_of_row(row: Any) -> SentGiftRecord:
    data = row._asdict()
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    return SentGiftRecord(**data)


_GET_SENT_GIFT = Statement(
    "gifting.get_sent_gift",
    "SELECT s.sent_gift_id, s.sender_id, s.creator_id, s.gift_id, s.count, s.coins, s.live_id, "
    "s.video_id, CASE WHEN s.status = 'debited' AND o.delivered_at IS NOT NULL THEN 'credited' "
    "ELSE s.status END, s.wallet_transaction_id, s.created_at, s.updated_at, s.streakable, "
    "s.streak_id, s.streak_count, st.ended_at, s.gift_version "
    "FROM sent_gifts s LEFT JOIN credit_outbox o ON o.sent_gift_id = s.sent_gift_id "
    "LEFT JOIN streaks st ON st.streak_id = s.streak_id "
    "WHERE s.sent_gift_id = :sent_gift_id",
)
"""A gift reads `credited` once its outbox credit is delivered: the relay marks only the outbox row, so
a delivery never rewrites gift rows (and their index entries) that new gifts of the same LIVE crowd."""


async def get_sent_gift(conn: AsyncConnection | Tx, sent_gift_id: str) -> SentGiftRecord | None:
    row = await as_tx(conn).one(_GET_SENT_GIFT, sent_gift_id=sent_gift_id)
    if row is None:
        return None
    (
        sent_id,
        sender,
        creator,
        gift,
        count,
        coins,
        live,
        video,
        status,
        wallet_tx,
        created,
        updated,
        streakable,
        streak_id,
        streak_count,
        streak_ended,
        gift_version,
    ) = row
    return SentGiftRecord(
        sent_gift_id=sent_id,
        sender_id=sender,
        creator_id=creator,
        gift_id=gift,
        count=int(count),
        coins=int(coins),
        live_id=live,
        video_id=video,
        status=status,
        wallet_transaction_id=wallet_tx,
        created_at=utc(created),
        updated_at=utc(updated),
        streakable=bool(streakable),
        streak_id=streak_id,
        streak_count=None if streak_count is None else int(streak_count),
        streak_ended_at=None if streak_ended is None else utc(streak_ended),
        gift_version=None if gift_version is None else int(gift_version),
    )


async def pending_sent_gifts(
    conn: AsyncConnection, created_before: dt.datetime, *, limit: int
) -> list[SentGiftRecord]:
    rows = await conn.execute(
        select(sent_gifts)
        .where(sent_gifts.c.status == "pending", sent_gifts.c.created_at < created_before)
        .order_by(sent_gifts.c.created_at)
        .limit(limit)
    )
    return [sent_gift_of_row(row) for row in rows]


_MOVE_SENT_GIFT = Statement(
    "gifting.move_sent_gift",
    "UPDATE sent_gifts SET status = :to_status, updated_at = :now, "
    "wallet_transaction_id = COALESCE(:wallet_transaction_id, wallet_transaction_id) "
    "WHERE sent_gift_id = :sent_gift_id AND status = :from_status",
)


async def move_sent_gift(
    conn: AsyncConnection | Tx,
    sent_gift_id: str,
    *,
    from_status: str,
    to_status: str,
    now: dt.datetime,
    wallet_transaction_id: str | None = None,
) -> bool:
    """Move a gift from one status to the next; False if it was not in `from_status` (done already)."""
    moved = await as_tx(conn).run(
        _MOVE_SENT_GIFT,
        sent_gift_id=sent_gift_id,
        from_status=from_status,
        to_status=to_status,
        now=now,
        wallet_transaction_id=wallet_transaction_id,
    )
    return moved == 1


_OPEN_LIVE = (
    "(:live_id{t} IS NULL OR EXISTS (SELECT 1 FROM lives WHERE live_id = :live_id{t} "
    "AND creator_id = :creator_id{t} AND ended_at IS NULL AND gifts_enabled))"
)
"""A gift names no LIVE, or a LIVE of its creator that is live with gifts on."""
_PRICED = (
    "priced AS (SELECT coins * :count::integer AS coins, streakable, version, regions FROM gifts "
    "WHERE gift_id = :gift_id::text AND active AND coins * :count::integer <= :max_coins::bigint "
    f"AND {_OPEN_LIVE.format(t='::text')})"
)
_START_GIFT_PG = Statement(
    "gifting.start_gift",
    "",
    postgres=f"WITH {_PRICED}, {KeyClaim.cte_template('FROM priced')}, "
    f"started AS (INSERT INTO sent_gifts ({_START_GIFT_COLUMNS}) "
    "SELECT :sent_gift_id::text, :sender_id::text, :creator_id::text, :gift_id::text, "
    ":count::integer, priced.coins, :live_id::text, :video_id::text, 'pending', NULL, "
    ":now::timestamptz, :now::timestamptz, priced.streakable, priced.version FROM priced, claim "
    "RETURNING coins, streakable, gift_version) "
    "SELECT started.coins, started.streakable, started.gift_version, priced.regions "
    "FROM started, priced",
)
_PRICE = Statement(
    "gifting.price",
    "SELECT coins * :count, streakable, version, regions FROM gifts "
    f"WHERE gift_id = :gift_id AND active AND coins * :count <= :max_coins AND {_OPEN_LIVE.format(t='')}",
)
_INSERT_SENT_GIFT = Statement(
    "gifting.insert_sent_gift",
    f"INSERT INTO sent_gifts ({_START_GIFT_COLUMNS}) VALUES (:sent_gift_id, :sender_id, "
    ":creator_id, :gift_id, :count, :coins, :live_id, :video_id, 'pending', NULL, :now, :now, "
    ":streakable, :gift_version)",
)


async def start_sent_gift(
    tx: Tx, sent: SentGiftRecord, claim: KeyClaim, max_coins: int
) -> tuple[int, bool, int, tuple[str, ...]] | None:
    """Claim the request id and record the pending gift, priced from the catalog, in one statement
    (PostgreSQL); its coins, or None if nothing was written: the id was claimed before, the gift
    is not in the catalog, inactive, or would cost more than `max_coins`, or the LIVE it names is
    not its creator's open LIVE with gifts on. Answers (coins, whether the gift streaks, the
    catalog version it was priced at, where it is offered)."""
    params = {
        "sent_gift_id": sent.sent_gift_id,
        "sender_id": sent.sender_id,
        "creator_id": sent.creator_id,
        "gift_id": sent.gift_id,
        "count": sent.count,
        "live_id": sent.live_id,
        "video_id": sent.video_id,
        "now": sent.created_at,
        "max_coins": max_coins,
    }
    if tx.dialect == "postgresql":
        row = await tx.one(_START_GIFT_PG, **params, **claim.params)
        if row is None:
            return None
        return int(row[0]), bool(row[1]), int(row[2]), regions_of(row[3])
    priced = await tx.one(_PRICE, **params)
    if priced is None or not await claim.insert(tx):
        return None
    coins, streakable, version = int(priced[0]), bool(priced[1]), int(priced[2])
    await insert_sent_gift(
        tx, replace(sent, coins=coins, streakable=streakable, gift_version=version)
    )
    return coins, streakable, version, regions_of(priced[3])


_ADD_TO_LEADERBOARD = Statement(
    "gifting.add_to_leaderboard",
    "INSERT INTO live_gifters (live_id, sender_id, coins) VALUES (:live_id, :sender_id, :coins) "
    "ON CONFLICT (live_id, sender_id) DO UPDATE SET coins = live_gifters.coins + excluded.coins",
)


async def add_to_leaderboard(
    conn: AsyncConnection | Tx, live_id: str, sender_id: str, coins: int
) -> None:
    await as_tx(conn).run(_ADD_TO_LEADERBOARD, live_id=live_id, sender_id=sender_id, coins=coins)


_ENQUEUE_CREDIT = Statement(
    "gifting.enqueue_credit",
    "INSERT INTO credit_outbox (sent_gift_id, creator_id, coins, traceparent, attempts, "
    "next_attempt_at, delivered_at, dead, last_error, created_at) VALUES (:sent_gift_id, "
    ":creator_id, :coins, :traceparent, 0, :now, NULL, FALSE, '', :now)",
)


async def enqueue_credit(
    conn: AsyncConnection | Tx,
    *,
    sent_gift_id: str,
    creator_id: str,
    coins: int,
    traceparent: str,
    now: dt.datetime,
) -> None:
    await as_tx(conn).run(
        _ENQUEUE_CREDIT,
        sent_gift_id=sent_gift_id,
        creator_id=creator_id,
        coins=coins,
        traceparent=traceparent,
        now=now,
    )


_MOVED = (
    "moved AS (UPDATE sent_gifts SET status = 'debited', "
    "wallet_transaction_id = :wallet_transaction_id, updated_at = :now, "
    "streak_id = :streak_id::text, streak_count = :streak_count::integer "
    "WHERE sent_gift_id = :sent_gift_id AND status = 'pending' RETURNING sent_gift_id)"
)
_RANKED = (
    "ranked AS (INSERT INTO live_gifters (live_id, sender_id, coins) "
    "SELECT :live_id::text, :sender_id::text, :coins::bigint FROM moved "
    "WHERE :live_id::text IS NOT NULL ON CONFLICT (live_id, sender_id) "
    "DO UPDATE SET coins = live_gifters.coins + excluded.coins)"
)
_QUEUED = (
    "queued AS (INSERT INTO credit_outbox (sent_gift_id, creator_id, coins, traceparent, attempts, "
    "next_attempt_at, delivered_at, dead, last_error, created_at) "
    "SELECT sent_gift_id, :creator_id::text, :coins::bigint, :traceparent::text, 0, "
    ":now::timestamptz, NULL, FALSE, '', :now::timestamptz FROM moved)"
)
_FED = (
    "fed AS (UPDATE lives SET last_seq = last_seq + CASE WHEN ended_at IS NULL THEN 1 ELSE 0 END, "
    "coins_received = coins_received + :coins::bigint, gifts_sent = gifts_sent + :count::integer "
    "WHERE live_id = :live_id::text AND EXISTS (SELECT 1 FROM moved) "
    "RETURNING last_seq, ended_at IS NULL AS open, watched_until), "
    "event AS (INSERT INTO live_events (live_id, seq, kind, sent_gift_id, sender_id, gift_id, "
    "count, coins, created_at, streak_id, streak_count) SELECT :live_id::text, last_seq, 'gift', "
    ":sent_gift_id::text, :sender_id::text, :gift_id::text, :count::integer, :coins::bigint, "
    ":now::timestamptz, :streak_id::text, :streak_count::integer FROM fed WHERE open), "
    "notified AS (SELECT pg_notify('live_feed', :live_id::text) FROM fed "
    "WHERE watched_until > :now::timestamptz)"
)
"""A gift in a LIVE is the LIVE's next feed event; if some process watches the LIVE, watchers on
every replica are woken (NOTIFY is delivered at commit). A gift accepted while the LIVE was open but
recorded after it ended counts in the summary, not in the feed (which ends with `ended`)."""
_RECORDED = "SELECT (SELECT count(*) FROM moved) + 0 * (SELECT count(*) FROM notified)"
_RECORD_DEBIT_PG = Statement(
    "gifting.record_debit",
    "",
    postgres=f"WITH {_MOVED}, {_RANKED}, {_QUEUED}, {_FED} {_RECORDED}",
)
_RECORD_DEBIT_ANSWERED_PG = Statement(
    "gifting.record_debit",
    "",
    postgres=f"WITH {_MOVED}, {_RANKED}, {_QUEUED}, {_FED}, "
    f"answered AS ({ANSWER_SQL} AND EXISTS (SELECT 1 FROM moved)) {_RECORDED}",
)


_CLAIMED = (
    "claim AS (SELECT sent_gift_id FROM sent_gifts WHERE sent_gift_id = :sent_gift_id::text "
    "AND status = 'pending' FOR UPDATE)"
)
_JOINED = (
    "streak AS (INSERT INTO streaks (streak_id, live_id, sender_id, gift_id, count, last_at, "
    "ended_at) SELECT :new_streak_id::text, :live_id::text, :sender_id::text, :gift_id::text, "
    ":count::integer, :now::timestamptz, NULL FROM claim "
    "ON CONFLICT (live_id, sender_id, gift_id) WHERE ended_at IS NULL DO UPDATE "
    "SET count = streaks.count + excluded.count, last_at = excluded.last_at "
    "WHERE streaks.last_at >= :cutoff::timestamptz RETURNING streak_id, count)"
)
_IN_STREAK = {
    ":streak_id::text": "(SELECT streak_id FROM streak)",
    ":streak_count::integer": "(SELECT count FROM streak)",
    "WHERE sent_gift_id = :sent_gift_id AND status = 'pending'": (
        "WHERE sent_gift_id IN (SELECT sent_gift_id FROM claim) AND EXISTS (SELECT 1 FROM streak)"
    ),
}


def _in_streak(sql: str) -> str:
    for portable, joined in _IN_STREAK.items():
        sql = sql.replace(portable, joined)
    return sql


_RECORD_IN_STREAK_PG = Statement(
    "gifting.record_debit_in_streak",
    "",
    postgres=f"WITH {_CLAIMED}, {_JOINED}, {_in_streak(_MOVED)}, {_RANKED}, {_QUEUED}, "
    f"{_in_streak(_FED)}, answered AS ({ANSWER_SQL} AND EXISTS (SELECT 1 FROM moved)) "
    "SELECT (SELECT count(*) FROM moved) + 0 * (SELECT count(*) FROM notified), "
    "(SELECT count(*) FROM claim), (SELECT streak_id FROM streak), (SELECT count FROM streak)",
)
"""A streaking gift recorded in one statement (PostgreSQL): the pending gift is locked, joins its
viewer's open streak (or opens one) and is recorded with the streak's id and running count. A
concurrent retry finds the gift no longer pending and changes nothing; an open streak that has
paused changes nothing either (it must end first, with its feed event: the caller does that in a
transaction). The stored answer leaves the streak out (it is known only here): a replay reads it
from the gift's record."""


@dataclass(frozen=True)
class InStreak:
    """What recording a gift in its streak did."""

    recorded: bool
    paused: bool
    """Not recorded: the viewer's open streak of this gift paused and has not been ended yet."""
    streak_id: str | None
    streak_count: int | None


async def record_debited_in_streak(
    tx: Tx,
    sent: SentGiftRecord,
    *,
    wallet_transaction_id: str,
    traceparent: str,
    now: dt.datetime,
    answer: KeyAnswer,
    new_streak_id: str,
    cutoff: dt.datetime,
) -> InStreak:
    """`record_debited` for a streakable gift in a LIVE, joining its streak: one statement on
    PostgreSQL (`_RECORD_IN_STREAK_PG`)."""
    assert tx.dialect == "postgresql" and sent.live_id is not None
    row = await tx.one(
        _RECORD_IN_STREAK_PG,
        sent_gift_id=sent.sent_gift_id,
        wallet_transaction_id=wallet_transaction_id,
        now=now,
        live_id=sent.live_id,
        sender_id=sent.sender_id,
        creator_id=sent.creator_id,
        gift_id=sent.gift_id,
        count=sent.count,
        coins=sent.coins,
        traceparent=traceparent,
        new_streak_id=new_streak_id,
        cutoff=cutoff,
        **answer.params,
    )
    assert row is not None
    moved, claimed, streak_id, streak_count = row
    return InStreak(
        recorded=int(moved) == 1,
        paused=int(moved) == 0 and int(claimed) == 1,
        streak_id=streak_id,
        streak_count=None if streak_count is None else int(streak_count),
    )


async def record_debited(
    conn: AsyncConnection | Tx,
    sent: SentGiftRecord,
    *,
    wallet_transaction_id: str,
    traceparent: str,
    now: dt.datetime,
    answer: KeyAnswer | None,
) -> bool:
    """pending -> debited, the sender ranked on the LIVE's board, the creator's credit queued, and
    the request's answer stored: one statement on PostgreSQL. False if the gift was not pending."""
    tx = as_tx(conn)
    if tx.dialect == "postgresql":
        statement = _RECORD_DEBIT_PG if answer is None else _RECORD_DEBIT_ANSWERED_PG
        row = await tx.one(
            statement,
            sent_gift_id=sent.sent_gift_id,
            wallet_transaction_id=wallet_transaction_id,
            now=now,
            live_id=sent.live_id,
            sender_id=sent.sender_id,
            creator_id=sent.creator_id,
            gift_id=sent.gift_id,
            count=sent.count,
            coins=sent.coins,
            traceparent=traceparent,
            streak_id=sent.streak_id,
            streak_count=sent.streak_count,
            **(answer.params if answer is not None else {}),
        )
        return row is not None and int(row[0]) == 1
    moved = await move_sent_gift(
        tx,
        sent.sent_gift_id,
        from_status="pending",
        to_status="debited",
        now=now,
        wallet_transaction_id=wallet_transaction_id,
    )
    if not moved:
        return False
    if sent.streak_id is not None:
        await tx.run(
            _STREAK_OF_GIFT_SQLITE,
            sent_gift_id=sent.sent_gift_id,
            streak_id=sent.streak_id,
            streak_count=sent.streak_count,
        )
    if sent.live_id:
        await add_to_leaderboard(tx, sent.live_id, sent.sender_id, sent.coins)
        await tx.run(
            _FEED_GIFT_SQLITE,
            live_id=sent.live_id,
            coins=sent.coins,
            count=sent.count,
            sent_gift_id=sent.sent_gift_id,
            sender_id=sent.sender_id,
            gift_id=sent.gift_id,
            now=now,
            streak_id=sent.streak_id,
            streak_count=sent.streak_count,
        )
        await tx.run(_COUNT_FED_SQLITE, live_id=sent.live_id, coins=sent.coins, count=sent.count)
    await enqueue_credit(
        tx,
        sent_gift_id=sent.sent_gift_id,
        creator_id=sent.creator_id,
        coins=sent.coins,
        traceparent=traceparent,
        now=now,
    )
    if answer is not None:
        await answer.store(tx)
    return True


async def top_gifters(
    conn: AsyncConnection, live_id: str, *, limit: int, after: tuple[int, str] | None
) -> list[tuple[str, int]]:
    """(sender, coins), most coins first, ties by sender id; `after` is the last row of the previous page."""
    query = (
        select(live_gifters.c.sender_id, live_gifters.c.coins)
        .where(live_gifters.c.live_id == live_id)
        .order_by(live_gifters.c.coins.desc(), live_gifters.c.sender_id)
        .limit(limit)
    )
    if after is not None:
        coins, sender = after
        query = query.where(
            (live_gifters.c.coins < coins)
            | ((live_gifters.c.coins == coins) & (live_gifters.c.sender_id > sender))
        )
    return [(row.sender_id, int(row.coins)) for row in (await conn.execute(query)).all()]


_FEED_GIFT_SQLITE = Statement(
    "gifting.feed_gift",
    "INSERT INTO live_events (live_id, seq, kind, sent_gift_id, sender_id, gift_id, count, coins, "
    "created_at, streak_id, streak_count) SELECT live_id, last_seq + 1, 'gift', :sent_gift_id, "
    ":sender_id, :gift_id, :count, :coins, :now, :streak_id, :streak_count FROM lives "
    "WHERE live_id = :live_id AND ended_at IS NULL",
)
_STREAK_OF_GIFT_SQLITE = Statement(
    "gifting.streak_of_gift",
    "UPDATE sent_gifts SET streak_id = :streak_id, streak_count = :streak_count "
    "WHERE sent_gift_id = :sent_gift_id",
)
_COUNT_FED_SQLITE = Statement(
    "gifting.count_fed",
    "UPDATE lives SET last_seq = last_seq + CASE WHEN ended_at IS NULL THEN 1 ELSE 0 END, "
    "coins_received = coins_received + :coins, gifts_sent = gifts_sent + :count "
    "WHERE live_id = :live_id",
)
"""SQLite: the gift's feed event, then the LIVE's counter and sums (in the same transaction; writes
are serialized, so no other gift takes the number between)."""
