"""The gifting tables in SQLAlchemy Core, as the migrations make them."""

from __future__ import annotations

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
    Text,
)

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
    Column("summary", Text),
)
"""A LIVE's feed, numbered by the LIVE's counter: "gift" and "streak_ended" events, then one
"ended", which carries the LIVE's summary as EndLive answered it (JSON, `summary`): an event reads
the same whenever and however often it is read."""

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
