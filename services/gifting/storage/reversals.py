"""Reversed gifts: the payout ledger's reversals followed, gifts and their counts taken back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from runtime.clock import utc
from runtime.sql import Statement, Tx
from services.gifting.storage.credits import add_to_rankings, period_keys
from services.gifting.storage.live_feed import LOCK_LIVES

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
            await tx.all(LOCK_LIVES, rows=live_ids, live_ids=live_ids)
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
        await add_to_rankings(tx, ranked, gifters)
        creators_ = sorted({c for _, _, c in ranked})
        await tx.run(_DROP_EMPTY_RANKINGS, creators=creators_)
        await tx.run(_DROP_EMPTY_GIFTERS, creators=creators_)
    return len(reversed_)
