"""Gifting tables and their SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import insert_new
from runtime.idempotency import ANSWER_SQL, KeyAnswer, KeyClaim
from runtime.sql import Statement, Tx, as_tx

metadata = MetaData()

gifts = Table(
    "gifts",
    metadata,
    Column("gift_id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("streakable", Boolean, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("version", Integer, nullable=False),
    Column("regions", String(1024), nullable=False),
    Column("animation_ms", Integer, nullable=False),
)
"""The catalog as it is now; every version of each gift is in `gift_versions` (migration 0011).
`regions` is ",US,GB," (empty: offered everywhere)."""

gift_versions = Table(
    "gift_versions",
    metadata,
    Column("gift_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("streakable", Boolean, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("regions", String(1024), nullable=False),
    Column("animation_ms", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("changed_by", String(64), nullable=False),
    Column("reason", String(500), nullable=False),
)

sent_gifts = Table(
    "sent_gifts",
    metadata,
    Column("sent_gift_id", String(40), primary_key=True),
    Column("sender_id", String(64), nullable=False),
    Column("creator_id", String(64), nullable=False),
    Column("gift_id", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("live_id", String(64)),
    Column("video_id", String(64)),
    Column("status", String(16), nullable=False),
    Column("wallet_transaction_id", String(40)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("streakable", Boolean, nullable=False),
    Column("streak_id", String(40)),
    Column("streak_count", Integer),
    Column("gift_version", Integer),
)

live_gifters = Table(
    "live_gifters",
    metadata,
    Column("live_id", String(64), primary_key=True),
    Column("sender_id", String(64), primary_key=True),
    Column("coins", BigInteger, nullable=False),
)

lives = Table(
    "lives",
    metadata,
    Column("live_id", String(64), primary_key=True),
    Column("creator_id", String(64), nullable=False),
    Column("title", String(128), nullable=False),
    Column("gifts_enabled", Boolean, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("last_seq", BigInteger, nullable=False),
    Column("coins_received", BigInteger, nullable=False),
    Column("gifts_sent", BigInteger, nullable=False),
    Column("watched_until", DateTime(timezone=True)),
    Column("diamonds_earned", BigInteger, nullable=False, server_default="0"),
)
"""A creator's LIVE (migration 0007): its feed counter and summary sums are kept on the row;
`watched_until` (0010): some process has watchers of its feed until then (NOTIFY only then);
`diamonds_earned` (0010): what payout credited for its gifts, added as the credits are delivered."""
Index(  # one running LIVE per creator (migration 0013)
    "ix_lives_running_creator",
    lives.c.creator_id,
    unique=True,
    postgresql_where=lives.c.ended_at.is_(None),
    sqlite_where=lives.c.ended_at.is_(None),
)

live_events = Table(
    "live_events",
    metadata,
    Column("live_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("sent_gift_id", String(40)),
    Column("sender_id", String(64)),
    Column("gift_id", String(64)),
    Column("count", Integer),
    Column("coins", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("streak_id", String(40)),
    Column("streak_count", Integer),
)
"""A LIVE's feed, numbered by the LIVE's counter: "gift" and "streak_ended" events, then one
"ended"."""

creator_rankings = Table(
    "creator_rankings",
    metadata,
    Column("period", String(8), primary_key=True),
    Column("period_key", String(16), primary_key=True),
    Column("creator_id", String(64), primary_key=True),
    Column("coins", BigInteger, nullable=False),
)
"""Coins of each creator's credited gifts per period ("day", "week", "all"; migration 0009)."""

creator_gifters = Table(
    "creator_gifters",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("sender_id", String(64), primary_key=True),
    Column("coins", BigInteger, nullable=False),
)
"""Coins each viewer's credited gifts gave each creator, all time."""

streaks = Table(
    "streaks",
    metadata,
    Column("streak_id", String(40), primary_key=True),
    Column("live_id", String(64), nullable=False),
    Column("sender_id", String(64), nullable=False),
    Column("gift_id", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
)
"""Streaks (migration 0008): at most one open per (LIVE, viewer, gift)."""

followed_positions = Table(
    "followed_positions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
)
"""Where gifting is in a feed it follows (migration 0014): "reversed credits", payout's."""

credit_outbox = Table(
    "credit_outbox",
    metadata,
    Column("outbox_id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("sent_gift_id", String(40), nullable=False, unique=True),
    Column("creator_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("traceparent", String(128), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    Column("dead", Boolean, nullable=False),
    Column("last_error", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class GiftRecord:
    gift_id: str
    name: str
    coins: int
    streakable: bool
    active: bool
    version: int = 0
    """0 until saved (`save_gift` numbers it)."""
    regions: tuple[str, ...] = ()
    """Where it is offered; empty: everywhere."""
    animation_ms: int = 1000

    def same_as(self, other: GiftRecord) -> bool:
        """The same catalog entry, whatever the version numbers."""
        return replace(self, version=0) == replace(other, version=0)


@dataclass(frozen=True)
class GiftVersionRecord:
    gift: GiftRecord
    created_at: dt.datetime
    changed_by: str
    reason: str


def _regions_text(regions: Sequence[str]) -> str:
    return f",{','.join(sorted(regions))}," if regions else ""


def _gift(row: Any) -> GiftRecord:
    return GiftRecord(
        gift_id=row.gift_id,
        name=row.name,
        coins=int(row.coins),
        streakable=bool(row.streakable),
        active=bool(row.active),
        version=int(row.version),
        regions=tuple(r for r in str(row.regions).split(",") if r),
        animation_ms=int(row.animation_ms),
    )


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


@dataclass(frozen=True)
class OutboxRecord:
    outbox_id: int
    sent_gift_id: str
    creator_id: str
    coins: int
    traceparent: str
    attempts: int


_START_GIFT_COLUMNS = (
    "sent_gift_id, sender_id, creator_id, gift_id, count, coins, live_id, video_id, status, "
    "wallet_transaction_id, created_at, updated_at, streakable, gift_version"
)


async def list_gifts(
    conn: AsyncConnection, *, limit: int, after: tuple[int, str] | None, region: str = ""
) -> list[GiftRecord]:
    """Active gifts, cheapest first; with `region`, only those offered there."""
    query = (
        select(gifts).where(gifts.c.active).order_by(gifts.c.coins, gifts.c.gift_id).limit(limit)
    )
    if region:
        query = query.where((gifts.c.regions == "") | gifts.c.regions.contains(f",{region},"))
    if after is not None:
        query = query.where(tuple_(gifts.c.coins, gifts.c.gift_id) > after)
    return [_gift(row) for row in (await conn.execute(query)).all()]


async def get_gift(conn: AsyncConnection, gift_id: str, *, lock: bool = False) -> GiftRecord | None:
    """A catalog gift as it is now (`lock`: held until the transaction ends, for a change)."""
    query = select(gifts).where(gifts.c.gift_id == gift_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    return None if row is None else _gift(row)


async def save_gift(
    conn: AsyncConnection, gift: GiftRecord, *, now: dt.datetime, changed_by: str, reason: str
) -> GiftRecord:
    """Add a gift (version 1) or change it (its next version); every version is kept. The same
    values again change nothing. Concurrent changes of one gift are serialised by its row lock."""
    values = {
        "name": gift.name,
        "coins": gift.coins,
        "streakable": gift.streakable,
        "active": gift.active,
        "regions": _regions_text(gift.regions),
        "animation_ms": gift.animation_ms,
    }
    current = await get_gift(conn, gift.gift_id, lock=True)
    if current is None and await insert_new(
        conn, gifts, {"gift_id": gift.gift_id, "version": 1, **values}
    ):
        saved = replace(gift, version=1)
    else:
        current = current or await get_gift(conn, gift.gift_id, lock=True)
        assert current is not None
        if current.same_as(gift):
            return current
        saved = replace(gift, version=current.version + 1)
        await conn.execute(
            update(gifts)
            .where(gifts.c.gift_id == gift.gift_id)
            .values(version=saved.version, **values)
        )
    await conn.execute(
        gift_versions.insert().values(
            gift_id=saved.gift_id,
            version=saved.version,
            created_at=now,
            changed_by=changed_by[:64],
            reason=reason[:500],
            **values,
        )
    )
    return saved


async def gift_versions_of(conn: AsyncConnection, gift_id: str) -> list[GiftVersionRecord]:
    """Every version of a gift, newest first."""
    rows = await conn.execute(
        select(gift_versions)
        .where(gift_versions.c.gift_id == gift_id)
        .order_by(gift_versions.c.version.desc())
    )
    return [
        GiftVersionRecord(_gift(row), utc(row.created_at), row.changed_by, row.reason)
        for row in rows.all()
    ]


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


def _sent_gift(row: Any) -> SentGiftRecord:
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
    return [_sent_gift(row) for row in rows]


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
_GIFT_PRICE = Statement(
    "gifting.gift_price", "SELECT coins, active FROM gifts WHERE gift_id = :gift_id"
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
        return int(row[0]), bool(row[1]), int(row[2]), _regions(row[3])
    priced = await tx.one(_PRICE, **params)
    if priced is None or not await claim.insert(tx):
        return None
    coins, streakable, version = int(priced[0]), bool(priced[1]), int(priced[2])
    await insert_sent_gift(
        tx, replace(sent, coins=coins, streakable=streakable, gift_version=version)
    )
    return coins, streakable, version, _regions(priced[3])


def _regions(text: str) -> tuple[str, ...]:
    return tuple(r for r in str(text).split(",") if r)


_VERSION_REGIONS = Statement(
    "gifting.version_regions",
    "SELECT regions FROM gift_versions WHERE gift_id = :gift_id AND version = :version",
)


async def version_regions(tx: Tx, gift_id: str, version: int) -> tuple[str, ...]:
    row = await tx.one(_VERSION_REGIONS, gift_id=gift_id, version=version)
    return () if row is None else _regions(row[0])


async def gift_price(tx: Tx, gift_id: str) -> tuple[int, bool] | None:
    """(coins, active) of a catalog gift, None if there is no such gift."""
    row = await tx.one(_GIFT_PRICE, gift_id=gift_id)
    return None if row is None else (int(row[0]), bool(row[1]))


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


_CLAIM_DUE_CREDITS = Statement(
    "gifting.claim_due_credits",
    "UPDATE credit_outbox SET next_attempt_at = :lease_until WHERE outbox_id IN ("
    "SELECT outbox_id FROM credit_outbox WHERE delivered_at IS NULL AND NOT dead "
    "AND next_attempt_at <= :now ORDER BY outbox_id LIMIT :limit) "
    "RETURNING outbox_id, sent_gift_id, creator_id, coins, traceparent, attempts",
    postgres="UPDATE credit_outbox SET next_attempt_at = :lease_until WHERE outbox_id IN ("
    "SELECT outbox_id FROM credit_outbox WHERE delivered_at IS NULL AND NOT dead "
    "AND next_attempt_at <= :now ORDER BY outbox_id LIMIT :limit FOR UPDATE SKIP LOCKED) "
    "RETURNING outbox_id, sent_gift_id, creator_id, coins, traceparent, attempts",
)
"""Claim a batch of due credits for one relay until `lease_until` (pushing their next attempt
there): with several gifting replicas each takes rows the others have not (SKIP LOCKED), and a
relay that dies mid-delivery leaves its batch to be retried after the lease."""
_MARK_DELIVERED = Statement(
    "gifting.mark_delivered",
    "UPDATE credit_outbox SET delivered_at = :now, attempts = attempts + 1 "
    "WHERE outbox_id IN (SELECT value FROM json_each(:outbox_ids)) AND delivered_at IS NULL "
    "RETURNING sent_gift_id",
    postgres="UPDATE credit_outbox SET delivered_at = :now, attempts = attempts + 1 "
    "WHERE outbox_id = ANY(:outbox_ids::bigint[]) AND delivered_at IS NULL RETURNING sent_gift_id",
)
_CREDITED_GIFTS = Statement(
    "gifting.credited_gifts",
    "SELECT creator_id, sender_id, coins, created_at, live_id, sent_gift_id FROM sent_gifts "
    "WHERE sent_gift_id IN (SELECT value FROM json_each(:sent_gift_ids)) AND status <> 'reversed'",
    postgres="SELECT creator_id, sender_id, coins, created_at, live_id, sent_gift_id "
    "FROM sent_gifts WHERE sent_gift_id = ANY(:sent_gift_ids::text[]) AND status <> 'reversed'",
)
"""A gift reversed before its credit's delivery was acknowledged never joins the rankings."""
_LOCK_LIVES = Statement(
    "gifting.lock_lives",
    "SELECT live_id FROM lives WHERE live_id IN (SELECT value FROM json_each(:rows)) "
    "ORDER BY live_id",
    postgres="SELECT live_id FROM lives WHERE live_id = ANY(:live_ids::text[]) "
    "ORDER BY live_id FOR UPDATE",
)
"""Several LIVEs' rows, locked in id order: every transaction that changes more than one LIVE
(a delivery, the streak sweep) takes them in that order, so two such can never deadlock."""
_ADD_DIAMONDS_EARNED = Statement(
    "gifting.add_diamonds_earned",
    "UPDATE lives SET diamonds_earned = diamonds_earned + json_extract(value, '$[1]') "
    "FROM json_each(:rows) WHERE lives.live_id = json_extract(value, '$[0]')",
    postgres="UPDATE lives SET diamonds_earned = diamonds_earned + d.diamonds "
    "FROM unnest(:live_ids::text[], :amounts::bigint[]) AS d(live_id, diamonds) "
    "WHERE lives.live_id = d.live_id",
)
_ADD_TO_RANKINGS = Statement(
    "gifting.add_to_rankings",
    "INSERT INTO creator_rankings (period, period_key, creator_id, coins) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]') FROM json_each(:rows) WHERE true "
    "ON CONFLICT (period, period_key, creator_id) "
    "DO UPDATE SET coins = creator_rankings.coins + excluded.coins",
    postgres="INSERT INTO creator_rankings (period, period_key, creator_id, coins) "
    "SELECT * FROM unnest(:periods::text[], :keys::text[], :creators::text[], :amounts::bigint[]) "
    "ON CONFLICT (period, period_key, creator_id) "
    "DO UPDATE SET coins = creator_rankings.coins + excluded.coins",
)
_ADD_TO_GIFTERS = Statement(
    "gifting.add_to_creator_gifters",
    "INSERT INTO creator_gifters (creator_id, sender_id, coins) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') "
    "FROM json_each(:rows) WHERE true ON CONFLICT (creator_id, sender_id) "
    "DO UPDATE SET coins = creator_gifters.coins + excluded.coins",
    postgres="INSERT INTO creator_gifters (creator_id, sender_id, coins) "
    "SELECT * FROM unnest(:creators::text[], :senders::text[], :amounts::bigint[]) "
    "ON CONFLICT (creator_id, sender_id) "
    "DO UPDATE SET coins = creator_gifters.coins + excluded.coins",
)


def period_keys(at: dt.datetime) -> dict[str, str]:
    """The ranking periods a moment belongs to: its UTC day, its ISO week, all time."""
    day = at.astimezone(dt.UTC).date()
    year, week, _ = day.isocalendar()
    return {"day": day.isoformat(), "week": f"{year}-W{week:02d}", "all": "all"}


async def claim_due_credits(
    tx: Tx, now: dt.datetime, limit: int, lease_until: dt.datetime
) -> list[OutboxRecord]:
    """Undelivered credits whose next attempt is due, oldest first (the outbox's partial index),
    claimed by this relay until `lease_until` (`_CLAIM_DUE_CREDITS`)."""
    rows = await tx.all(_CLAIM_DUE_CREDITS, now=now, limit=limit, lease_until=lease_until)
    records = [
        OutboxRecord(int(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), int(r[5])) for r in rows
    ]
    return sorted(records, key=lambda r: r.outbox_id)


async def mark_delivered(
    tx: Tx,
    credits: Sequence[OutboxRecord],
    now: dt.datetime,
    diamonds: Mapping[str, int] | None = None,
) -> int:
    """Payout acknowledged these credits: their outbox rows are done, so their gifts read `credited`,
    their coins join the rankings and the `diamonds` payout credited for each (by sent gift id) join
    its LIVE's, each credit once (one marked by another delivery is skipped). A batch adds one row
    per (period, creator), per (creator, gifter) and per LIVE. Returns how many it marked."""
    marked = await tx.all(_MARK_DELIVERED, outbox_ids=[c.outbox_id for c in credits], now=now)
    if not marked:
        return 0
    gifts = await tx.all(_CREDITED_GIFTS, sent_gift_ids=[str(row[0]) for row in marked])
    ranked: dict[tuple[str, str, str], int] = {}
    gifters: dict[tuple[str, str], int] = {}
    earned: dict[str, int] = {}
    for *_, live_id, sent_gift_id in gifts:
        if live_id and diamonds and diamonds.get(sent_gift_id):
            earned[live_id] = earned.get(live_id, 0) + diamonds[sent_gift_id]
    if earned:
        earned = dict(sorted(earned.items()))
        if len(earned) > 1 and tx.dialect == "postgresql":
            await tx.all(_LOCK_LIVES, rows=list(earned), live_ids=list(earned))
        await tx.run(
            _ADD_DIAMONDS_EARNED,
            rows=[[live, n] for live, n in earned.items()],
            live_ids=list(earned),
            amounts=list(earned.values()),
        )
    for creator, sender, coins, created, *_ in gifts:
        for period, key in period_keys(utc(created)).items():
            ranked[period, key, creator] = ranked.get((period, key, creator), 0) + int(coins)
        gifters[creator, sender] = gifters.get((creator, sender), 0) + int(coins)
    await _add_to_rankings(tx, ranked, gifters)
    return len(marked)


async def _add_to_rankings(
    tx: Tx, ranked: Mapping[tuple[str, str, str], int], gifters: Mapping[tuple[str, str], int]
) -> None:
    """Add coins (negative: take them off) to the rankings, by (period, period key, creator), and
    to the creators' top gifters, by (creator, sender): one statement each, upserted in key order,
    so that two transactions (two replicas) lock shared rows alike."""
    rows = [[p, k, c, n] for (p, k, c), n in sorted(ranked.items())]
    await tx.run(
        _ADD_TO_RANKINGS,
        rows=rows,
        periods=[r[0] for r in rows],
        keys=[r[1] for r in rows],
        creators=[r[2] for r in rows],
        amounts=[r[3] for r in rows],
    )
    pairs = [[c, s, n] for (c, s), n in sorted(gifters.items())]
    await tx.run(
        _ADD_TO_GIFTERS,
        rows=pairs,
        creators=[r[0] for r in pairs],
        senders=[r[1] for r in pairs],
        amounts=[r[2] for r in pairs],
    )


async def creator_rankings_page(
    conn: AsyncConnection,
    period: str,
    key: str,
    *,
    limit: int,
    after: tuple[int, str] | None,
) -> list[tuple[str, int]]:
    """(creator, coins) of a period, most coins first, ties by creator id."""
    t = creator_rankings
    query = (
        select(t.c.creator_id, t.c.coins)
        .where(t.c.period == period, t.c.period_key == key)
        .order_by(t.c.coins.desc(), t.c.creator_id)
        .limit(limit)
    )
    if after is not None:
        coins, creator = after
        query = query.where(
            (t.c.coins < coins) | ((t.c.coins == coins) & (t.c.creator_id > creator))
        )
    return [(row.creator_id, int(row.coins)) for row in (await conn.execute(query)).all()]


async def creator_gifters_page(
    conn: AsyncConnection, creator_id: str, *, limit: int, after: tuple[int, str] | None
) -> list[tuple[str, int]]:
    """(sender, coins) of a creator's gifters, most coins first, ties by sender id."""
    t = creator_gifters
    query = (
        select(t.c.sender_id, t.c.coins)
        .where(t.c.creator_id == creator_id)
        .order_by(t.c.coins.desc(), t.c.sender_id)
        .limit(limit)
    )
    if after is not None:
        coins, sender = after
        query = query.where((t.c.coins < coins) | ((t.c.coins == coins) & (t.c.sender_id > sender)))
    return [(row.sender_id, int(row.coins)) for row in (await conn.execute(query)).all()]


async def mark_failed_attempt(
    conn: AsyncConnection, outbox_id: int, *, retry_at: dt.datetime, error: str, dead: bool
) -> None:
    await conn.execute(
        update(credit_outbox)
        .where(credit_outbox.c.outbox_id == outbox_id)
        .values(
            attempts=credit_outbox.c.attempts + 1,
            next_attempt_at=retry_at,
            last_error=error[:256],
            dead=dead,
        )
    )


@dataclass(frozen=True)
class ParkedCreditRecord:
    outbox_id: int
    sent_gift_id: str
    creator_id: str
    coins: int
    attempts: int
    last_error: str
    created_at: dt.datetime


async def parked_credits(
    conn: AsyncConnection, *, limit: int, after_outbox_id: int | None
) -> list[ParkedCreditRecord]:
    """Credits parked for an operator, oldest first (partial index ix_credit_outbox_parked)."""
    query = (
        select(
            credit_outbox.c.outbox_id,
            credit_outbox.c.sent_gift_id,
            credit_outbox.c.creator_id,
            credit_outbox.c.coins,
            credit_outbox.c.attempts,
            credit_outbox.c.last_error,
            credit_outbox.c.created_at,
        )
        .where(credit_outbox.c.dead, credit_outbox.c.delivered_at.is_(None))
        .order_by(credit_outbox.c.outbox_id)
        .limit(limit)
    )
    if after_outbox_id is not None:
        query = query.where(credit_outbox.c.outbox_id > after_outbox_id)
    return [
        ParkedCreditRecord(
            int(r.outbox_id),
            r.sent_gift_id,
            r.creator_id,
            int(r.coins),
            int(r.attempts),
            r.last_error,
            utc(r.created_at),
        )
        for r in await conn.execute(query)
    ]


async def unpark_credits(
    conn: AsyncConnection, sent_gift_ids: Sequence[str], now: dt.datetime
) -> set[str]:
    """Put these gifts' parked credits back on the outbox, due now; returns the gifts whose credits
    were parked."""
    result = await conn.execute(
        update(credit_outbox)
        .where(
            credit_outbox.c.sent_gift_id.in_(sent_gift_ids),
            credit_outbox.c.dead,
            credit_outbox.c.delivered_at.is_(None),
        )
        .values(dead=False, next_attempt_at=now)
        .returning(credit_outbox.c.sent_gift_id)
    )
    return {str(row[0]) for row in result}


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


@dataclass(frozen=True)
class LiveRecord:
    live_id: str
    creator_id: str
    title: str
    gifts_enabled: bool
    started_at: dt.datetime
    ended_at: dt.datetime | None
    last_seq: int
    coins_received: int
    gifts_sent: int
    diamonds_earned: int = 0


async def insert_live(conn: AsyncConnection, live: LiveRecord) -> bool:
    """A new LIVE; False if its id is taken or its creator has a LIVE running (by a concurrent
    StartLive too: the partial unique index of migration 0013)."""
    return await insert_new(conn, lives, live.__dict__)


_RUNNING_LIVE = Statement(
    "gifting.running_live",
    "SELECT live_id FROM lives WHERE creator_id = :creator_id AND ended_at IS NULL",
)


async def running_live_of(conn: AsyncConnection, creator_id: str) -> str | None:
    """The creator's LIVE that has not ended, if any (at most one)."""
    row = await as_tx(conn).one(_RUNNING_LIVE, creator_id=creator_id)
    return None if row is None else str(row[0])


_GET_LIVE = Statement(
    "gifting.get_live",
    "SELECT live_id, creator_id, title, gifts_enabled, started_at, ended_at, last_seq, "
    "coins_received, gifts_sent, diamonds_earned FROM lives WHERE live_id = :live_id",
)


async def get_live(conn: AsyncConnection | Tx, live_id: str) -> LiveRecord | None:
    row = await as_tx(conn).one(_GET_LIVE, live_id=live_id)
    if row is None:
        return None
    live, creator, title, enabled, started, ended, seq, coins, gifts, diamonds = row
    return LiveRecord(
        live_id=live,
        creator_id=creator,
        title=title,
        gifts_enabled=bool(enabled),
        started_at=utc(started),
        ended_at=None if ended is None else utc(ended),
        last_seq=int(seq),
        coins_received=int(coins),
        gifts_sent=int(gifts),
        diamonds_earned=int(diamonds),
    )


async def end_live(conn: AsyncConnection, live_id: str, now: dt.datetime) -> bool:
    """End a LIVE (its open streaks first, each with its event) and write its feed's last event;
    False if it had ended already."""
    tx = as_tx(conn)
    await feed_streak_ends(tx, await end_live_streaks(tx, live_id, now), now)
    ended = await conn.execute(
        update(lives)
        .where(lives.c.live_id == live_id, lives.c.ended_at.is_(None))
        .values(ended_at=now, last_seq=lives.c.last_seq + 1)
        .returning(lives.c.last_seq)
    )
    seq = ended.scalar()
    if seq is None:
        return False
    await conn.execute(
        live_events.insert().values(live_id=live_id, seq=seq, kind="ended", created_at=now)
    )
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_notify("live_feed", live_id)))
    return True


async def pending_gifts_in_live(conn: AsyncConnection, live_id: str, since: dt.datetime) -> int:
    """Gifts to the LIVE started since `since` and not yet recorded or failed
    (ix_sent_gifts_live_created: a range of the LIVE's newest gifts)."""
    found = await conn.scalar(
        select(func.count())
        .select_from(sent_gifts)
        .where(
            sent_gifts.c.live_id == live_id,
            sent_gifts.c.created_at >= since,
            sent_gifts.c.status == "pending",
        )
    )
    return int(found or 0)


async def pending_gifts_of_live(
    conn: AsyncConnection, live_id: str, *, limit: int
) -> list[SentGiftRecord]:
    """The LIVE's gifts not yet recorded or failed, oldest first (ix_sent_gifts_status_created:
    pending gifts are few)."""
    rows = await conn.execute(
        select(sent_gifts)
        .where(sent_gifts.c.status == "pending", sent_gifts.c.live_id == live_id)
        .order_by(sent_gifts.c.created_at)
        .limit(limit)
    )
    return [_sent_gift(row) for row in rows]


async def set_live_gifts(conn: AsyncConnection, live_id: str, enabled: bool) -> None:
    await conn.execute(
        update(lives).where(lives.c.live_id == live_id).values(gifts_enabled=enabled)
    )


async def unique_gifters(conn: AsyncConnection, live_id: str) -> int:
    found = await conn.scalar(
        select(func.count()).select_from(live_gifters).where(live_gifters.c.live_id == live_id)
    )
    return int(found or 0)


@dataclass(frozen=True)
class LiveEventRecord:
    seq: int
    kind: str
    sent_gift_id: str | None
    sender_id: str | None
    gift_id: str | None
    count: int | None
    coins: int | None
    created_at: dt.datetime
    streak_id: str | None = None
    streak_count: int | None = None


_MARK_WATCHED = Statement(
    "gifting.mark_watched",
    "UPDATE lives SET watched_until = :until WHERE live_id = :live_id AND ended_at IS NULL "
    "AND (watched_until IS NULL OR watched_until < :until)",
)


async def mark_watched(tx: Tx, live_id: str, until: dt.datetime) -> None:
    """Some process has watchers of the LIVE's feed until `until` (gifts NOTIFY until then)."""
    await tx.run(_MARK_WATCHED, live_id=live_id, until=until)


async def live_events_after(
    conn: AsyncConnection, live_id: str, after: int, limit: int
) -> list[LiveEventRecord]:
    """A LIVE's feed events after cursor `after`, in order (its primary key's order)."""
    rows = await conn.execute(
        select(
            live_events.c.seq,
            live_events.c.kind,
            live_events.c.sent_gift_id,
            live_events.c.sender_id,
            live_events.c.gift_id,
            live_events.c.count,
            live_events.c.coins,
            live_events.c.created_at,
            live_events.c.streak_id,
            live_events.c.streak_count,
        )
        .where(live_events.c.live_id == live_id, live_events.c.seq > after)
        .order_by(live_events.c.seq)
        .limit(limit)
    )
    return [
        LiveEventRecord(
            int(seq), kind, gift, sender, gift_id, count, coins, utc(at), streak, streak_count
        )
        for seq, kind, gift, sender, gift_id, count, coins, at, streak, streak_count in rows
    ]


@dataclass(frozen=True)
class StreakEnd:
    streak_id: str
    live_id: str
    sender_id: str
    gift_id: str
    count: int


_STREAK_COLUMNS = "streak_id, live_id, sender_id, gift_id, count"
_JOIN_STREAK = Statement(
    "gifting.join_streak",
    "INSERT INTO streaks (streak_id, live_id, sender_id, gift_id, count, last_at, ended_at) "
    "VALUES (:streak_id, :live_id, :sender_id, :gift_id, :count, :now, NULL) "
    "ON CONFLICT (live_id, sender_id, gift_id) WHERE ended_at IS NULL DO UPDATE "
    "SET count = streaks.count + excluded.count, last_at = excluded.last_at "
    "WHERE streaks.last_at >= :cutoff RETURNING streak_id, count",
)
"""Open a streak, or join the open one if its last send was within the pause (a concurrent send of
the same viewer and gift waits on the open-streak index and then joins); nothing if the open one
has paused (it must end first)."""
_END_OPEN_STREAK = Statement(
    "gifting.end_open_streak",
    "UPDATE streaks SET ended_at = :now WHERE live_id = :live_id AND sender_id = :sender_id "
    f"AND gift_id = :gift_id AND ended_at IS NULL RETURNING {_STREAK_COLUMNS}",
)
_END_DUE_STREAKS = Statement(
    "gifting.end_due_streaks",
    "UPDATE streaks SET ended_at = :now WHERE streak_id IN (SELECT streak_id FROM streaks "
    "WHERE ended_at IS NULL AND last_at < :cutoff ORDER BY last_at LIMIT :limit) "
    f"RETURNING {_STREAK_COLUMNS}",
    postgres="UPDATE streaks SET ended_at = :now WHERE streak_id IN (SELECT streak_id FROM streaks "
    "WHERE ended_at IS NULL AND last_at < :cutoff ORDER BY last_at LIMIT :limit "
    "FOR UPDATE SKIP LOCKED) "
    f"RETURNING {_STREAK_COLUMNS}",
)
_END_LIVE_STREAKS = Statement(
    "gifting.end_live_streaks",
    "UPDATE streaks SET ended_at = :now WHERE live_id = :live_id AND ended_at IS NULL "
    f"RETURNING {_STREAK_COLUMNS}",
)
_BUMP_SEQS = Statement(
    "gifting.bump_seqs",
    "UPDATE lives SET last_seq = last_seq + json_extract(value, '$[1]') FROM json_each(:rows) "
    "WHERE lives.live_id = json_extract(value, '$[0]') AND lives.ended_at IS NULL "
    "RETURNING live_id, last_seq",
    postgres="UPDATE lives SET last_seq = lives.last_seq + d.n "
    "FROM unnest(:live_ids::text[], :counts::bigint[]) AS d(live_id, n) "
    "WHERE lives.live_id = d.live_id AND lives.ended_at IS NULL "
    "RETURNING lives.live_id, lives.last_seq",
)
"""Take the next `n` feed numbers of each LIVE still on air (its last one returned)."""
_STREAK_ENDED_EVENTS = Statement(
    "gifting.streak_ended_events",
    "INSERT INTO live_events (live_id, seq, kind, sender_id, gift_id, count, created_at, "
    "streak_id, streak_count) SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "'streak_ended', json_extract(value, '$[2]'), json_extract(value, '$[3]'), "
    "json_extract(value, '$[4]'), :now, json_extract(value, '$[5]'), json_extract(value, '$[4]') "
    "FROM json_each(:rows) WHERE true",
    postgres="INSERT INTO live_events (live_id, seq, kind, sender_id, gift_id, count, created_at, "
    "streak_id, streak_count) SELECT e.live_id, e.seq, 'streak_ended', e.sender_id, e.gift_id, "
    "e.count, :now, e.streak_id, e.count FROM unnest(:live_ids::text[], :seqs::bigint[], "
    ":sender_ids::text[], :gift_ids::text[], :counts::bigint[], :streak_ids::text[]) "
    "AS e(live_id, seq, sender_id, gift_id, count, streak_id)",
)
_NOTIFY = Statement(
    "gifting.notify",
    "",
    postgres="SELECT pg_notify('live_feed', live_id) FROM lives "
    "WHERE live_id = ANY(:live_ids::text[]) AND watched_until > :now",
)


def _streak_ends(rows: Sequence[Sequence[Any]]) -> list[StreakEnd]:
    return [StreakEnd(str(i), str(lv), str(s), str(g), int(c)) for i, lv, s, g, c in rows]


async def extend_streak(
    tx: Tx,
    *,
    live_id: str,
    sender_id: str,
    gift_id: str,
    count: int,
    now: dt.datetime,
    cutoff: dt.datetime,
    new_streak_id: str,
) -> tuple[str, int, list[StreakEnd]]:
    """Add a send to the open streak of (LIVE, viewer, gift) if its last send was at `cutoff` or
    later; else end that streak (if the sweep has not yet) and open a new one. Returns (streak id,
    running count, the streaks it ended)."""
    keys = {"live_id": live_id, "sender_id": sender_id, "gift_id": gift_id}
    ended: list[StreakEnd] = []
    for _ in range(3):
        row = await tx.one(
            _JOIN_STREAK, streak_id=new_streak_id, count=count, now=now, cutoff=cutoff, **keys
        )
        if row is not None:
            return str(row[0]), int(row[1]), ended
        ended += _streak_ends(await tx.all(_END_OPEN_STREAK, now=now, **keys))
    raise RuntimeError(f"could not open a streak for {keys}")  # pragma: no cover - needs 3 races


async def end_due_streaks(
    tx: Tx, now: dt.datetime, cutoff: dt.datetime, limit: int
) -> list[StreakEnd]:
    """End up to `limit` streaks whose last send was before `cutoff` (with several replicas each
    takes rows the others skip)."""
    return _streak_ends(await tx.all(_END_DUE_STREAKS, now=now, cutoff=cutoff, limit=limit))


async def end_live_streaks(tx: Tx, live_id: str, now: dt.datetime) -> list[StreakEnd]:
    return _streak_ends(await tx.all(_END_LIVE_STREAKS, live_id=live_id, now=now))


async def feed_streak_ends(tx: Tx, ended: Sequence[StreakEnd], now: dt.datetime) -> set[str]:
    """Each ended streak's event in its LIVE's feed (none once the LIVE has ended); the LIVEs
    whose watchers are to be woken (on PostgreSQL, every replica's, at commit). A sweep ends
    hundreds at once: a few statements for all of them, not two round trips per streak."""
    if not ended:
        return set()
    by_live: dict[str, list[StreakEnd]] = {}
    for streak in sorted(ended, key=lambda s: (s.live_id, s.streak_id)):
        by_live.setdefault(streak.live_id, []).append(streak)
    lives_ = list(by_live)  # in id order
    if len(lives_) > 1 and tx.dialect == "postgresql":
        # Several LIVEs' rows, locked in id order as a delivery locks them (`_LOCK_LIVES`).
        await tx.all(_LOCK_LIVES, rows=lives_, live_ids=lives_)
    counts = [len(by_live[live]) for live in lives_]
    bumped = await tx.all(
        _BUMP_SEQS,
        rows=[[live, n] for live, n in zip(lives_, counts, strict=True)],
        live_ids=lives_,
        counts=counts,
    )
    rows: list[list[Any]] = []
    for live_id, last_seq in sorted((str(r[0]), int(r[1])) for r in bumped):
        streaks = by_live[live_id]
        first = last_seq - len(streaks) + 1
        for seq, streak in enumerate(streaks, start=first):
            rows.append(
                [live_id, seq, streak.sender_id, streak.gift_id, streak.count, streak.streak_id]
            )
    if not rows:
        return set()
    await tx.run(
        _STREAK_ENDED_EVENTS,
        rows=rows,
        now=now,
        live_ids=[r[0] for r in rows],
        seqs=[r[1] for r in rows],
        sender_ids=[r[2] for r in rows],
        gift_ids=[r[3] for r in rows],
        counts=[r[4] for r in rows],
        streak_ids=[r[5] for r in rows],
    )
    fed = {str(r[0]) for r in bumped}
    if tx.dialect == "postgresql":
        await tx.all(_NOTIFY, live_ids=sorted(fed), now=now)
    return fed


_GAUGE_OUTBOX = Statement(
    "gifting.gauge_outbox",
    "SELECT COUNT(*), MIN(created_at) FROM credit_outbox "
    "WHERE delivered_at IS NULL AND NOT dead",  # ix_credit_outbox_pending
)
_GAUGE_PARKED = Statement(
    "gifting.gauge_parked",
    "SELECT COUNT(*) FROM credit_outbox WHERE dead AND delivered_at IS NULL",  # ..._parked
)
_GAUGE_PENDING_GIFTS = Statement(
    "gifting.gauge_pending_gifts",
    "SELECT COUNT(*) FROM sent_gifts WHERE status = 'pending'",  # ix_sent_gifts_status_created
)


@dataclass(frozen=True)
class OutboxGauges:
    backlog: int
    oldest: dt.datetime | None
    parked: int
    pending_gifts: int


async def outbox_gauges(tx: Tx) -> OutboxGauges:
    """Credits waiting for delivery (and since when), parked credits, gifts not yet settled."""
    backlog = await tx.one(_GAUGE_OUTBOX)
    parked = await tx.one(_GAUGE_PARKED)
    pending = await tx.one(_GAUGE_PENDING_GIFTS)
    assert backlog is not None and parked is not None and pending is not None
    return OutboxGauges(
        int(backlog[0]),
        utc(backlog[1]) if backlog[1] is not None else None,
        int(parked[0]),
        int(pending[0]),
    )


# ------------------------------------------------------------------------------ reversed gifts

_POSITION = Statement(
    "gifting.followed_position", "SELECT position FROM followed_positions WHERE name = :name"
)
_MOVE_POSITION = Statement(
    "gifting.move_followed_position",
    "INSERT INTO followed_positions (name, position) VALUES (:name, :to) "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position "
    "WHERE followed_positions.position = :expected",
)
_REVERSE_GIFTS = Statement(
    "gifting.reverse_gifts",
    "UPDATE sent_gifts SET status = 'reversed', updated_at = :now "
    "WHERE sent_gift_id IN (SELECT value FROM json_each(:sent_gift_ids)) AND status = 'debited' "
    "RETURNING sent_gift_id, creator_id, sender_id, coins, count, live_id, created_at",
    postgres="UPDATE sent_gifts SET status = 'reversed', updated_at = :now "
    "WHERE sent_gift_id = ANY(:sent_gift_ids::text[]) AND status = 'debited' "
    "RETURNING sent_gift_id, creator_id, sender_id, coins, count, live_id, created_at",
)
_DELIVERED_OF = Statement(
    "gifting.delivered_of",
    "SELECT sent_gift_id, delivered_at IS NOT NULL FROM credit_outbox "
    "WHERE sent_gift_id IN (SELECT value FROM json_each(:sent_gift_ids))",
    postgres="SELECT sent_gift_id, delivered_at IS NOT NULL FROM credit_outbox "
    "WHERE sent_gift_id = ANY(:sent_gift_ids::text[]) ORDER BY outbox_id FOR UPDATE",
)
"""Locked on PostgreSQL: a delivery that marks one of them waits for the reversal (and then skips
the reversed gift), or the reversal waits for it (and then sees it delivered)."""
_UNCOUNT_LIVES = Statement(
    "gifting.uncount_lives",
    "UPDATE lives SET coins_received = coins_received - json_extract(value, '$[1]'), "
    "gifts_sent = gifts_sent - json_extract(value, '$[2]'), "
    "diamonds_earned = diamonds_earned - json_extract(value, '$[3]') "
    "FROM json_each(:rows) WHERE lives.live_id = json_extract(value, '$[0]')",
    postgres="UPDATE lives SET coins_received = coins_received - d.coins, "
    "gifts_sent = gifts_sent - d.gifts, diamonds_earned = diamonds_earned - d.diamonds "
    "FROM unnest(:live_ids::text[], :coins::bigint[], :gifts::bigint[], :diamonds::bigint[]) "
    "AS d(live_id, coins, gifts, diamonds) WHERE lives.live_id = d.live_id",
)
_UNCOUNT_LIVE_GIFTERS = Statement(
    "gifting.uncount_live_gifters",
    "UPDATE live_gifters SET coins = coins - json_extract(value, '$[2]') FROM json_each(:rows) "
    "WHERE live_gifters.live_id = json_extract(value, '$[0]') "
    "AND live_gifters.sender_id = json_extract(value, '$[1]')",
    postgres="UPDATE live_gifters SET coins = live_gifters.coins - d.coins "
    "FROM unnest(:live_ids::text[], :senders::text[], :coins::bigint[]) "
    "AS d(live_id, sender_id, coins) "
    "WHERE live_gifters.live_id = d.live_id AND live_gifters.sender_id = d.sender_id",
)
_DROP_EMPTY_LIVE_GIFTERS = Statement(
    "gifting.drop_empty_live_gifters",
    "DELETE FROM live_gifters WHERE live_id IN (SELECT value FROM json_each(:live_ids)) "
    "AND coins <= 0",
    postgres="DELETE FROM live_gifters WHERE live_id = ANY(:live_ids::text[]) AND coins <= 0",
)
_DROP_EMPTY_RANKINGS = Statement(
    "gifting.drop_empty_rankings",
    "DELETE FROM creator_rankings WHERE creator_id IN (SELECT value FROM json_each(:creators)) "
    "AND coins <= 0",
    postgres="DELETE FROM creator_rankings WHERE creator_id = ANY(:creators::text[]) "
    "AND coins <= 0",
)
_DROP_EMPTY_GIFTERS = Statement(
    "gifting.drop_empty_creator_gifters",
    "DELETE FROM creator_gifters WHERE creator_id IN (SELECT value FROM json_each(:creators)) "
    "AND coins <= 0",
    postgres="DELETE FROM creator_gifters WHERE creator_id = ANY(:creators::text[]) AND coins <= 0",
)


async def followed_position(tx: Tx, name: str) -> int:
    """Where gifting is in the feed `name` (0: at its start)."""
    row = await tx.one(_POSITION, name=name)
    return 0 if row is None else int(row[0])


async def move_followed_position(tx: Tx, name: str, expected: int, to: int) -> bool:
    """Move the position from `expected` to `to`; False if it was not at `expected` any more (another
    replica applied that page)."""
    return await tx.run(_MOVE_POSITION, name=name, to=to, expected=expected) == 1


async def reverse_gifts(tx: Tx, diamonds: Mapping[str, int], now: dt.datetime) -> int:
    """Take these gifts (sent gift id -> the diamonds payout took back) out of everything that
    counted them: their LIVE's sums and top gifters (counted when sent), and, for those whose credit
    was delivered, the rankings, the creators' top gifters and the LIVE's diamonds (counted then).
    Each gift once (it reads `reversed` after); gifts gifting did not send, or failed, are skipped.
    Returns how many were reversed here."""
    ids = sorted(diamonds)
    if not ids:
        return 0
    delivered_rows = await tx.all(_DELIVERED_OF, sent_gift_ids=ids)
    delivered = {str(gift_id) for gift_id, done in delivered_rows if done}
    reversed_ = await tx.all(_REVERSE_GIFTS, sent_gift_ids=ids, now=now)
    if not reversed_:
        return 0
    lives_: dict[str, list[int]] = {}  # live -> [coins, gifts, diamonds]
    live_gifters_: dict[tuple[str, str], int] = {}
    ranked: dict[tuple[str, str, str], int] = {}
    gifters: dict[tuple[str, str], int] = {}
    for gift_id, creator, sender, coins, count, live_id, created in reversed_:
        counted = str(gift_id) in delivered
        if live_id:
            sums = lives_.setdefault(str(live_id), [0, 0, 0])
            sums[0] += int(coins)
            sums[1] += int(count)
            sums[2] += diamonds[str(gift_id)] if counted else 0
            key = (str(live_id), str(sender))
            live_gifters_[key] = live_gifters_.get(key, 0) + int(coins)
        if counted:
            for period, period_key in period_keys(utc(created)).items():
                k = (period, period_key, str(creator))
                ranked[k] = ranked.get(k, 0) - int(coins)
            g = (str(creator), str(sender))
            gifters[g] = gifters.get(g, 0) - int(coins)
    if lives_:
        live_ids = sorted(lives_)
        if len(live_ids) > 1 and tx.dialect == "postgresql":
            await tx.all(_LOCK_LIVES, rows=live_ids, live_ids=live_ids)
        rows = [[live, *lives_[live]] for live in live_ids]
        await tx.run(
            _UNCOUNT_LIVES,
            rows=rows,
            live_ids=live_ids,
            coins=[r[1] for r in rows],
            gifts=[r[2] for r in rows],
            diamonds=[r[3] for r in rows],
        )
        pairs = [[live, sender, n] for (live, sender), n in sorted(live_gifters_.items())]
        await tx.run(
            _UNCOUNT_LIVE_GIFTERS,
            rows=pairs,
            live_ids=[p[0] for p in pairs],
            senders=[p[1] for p in pairs],
            coins=[p[2] for p in pairs],
        )
        await tx.run(_DROP_EMPTY_LIVE_GIFTERS, live_ids=live_ids)
    if ranked:
        await _add_to_rankings(tx, ranked, gifters)
        creators_ = sorted({c for _, _, c in ranked})
        await tx.run(_DROP_EMPTY_RANKINGS, creators=creators_)
        await tx.run(_DROP_EMPTY_GIFTERS, creators=creators_)
    return len(reversed_)
