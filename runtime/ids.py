"""Identifiers the services mint for what they create (gifts, purchases, holds, withdrawals,
promotions, ledger transactions)."""

from __future__ import annotations

import secrets
import time


def time_ordered_id() -> str:
    """32 hex digits, the shape of a UUID's hex: the microsecond first, then 72 random bits. Ids in
    time order keep a table's primary key, and every index on them (a gift's debit and credit are
    keyed `gift:<id>` in the wallet and payout), appending at their right edge, where random ids
    would touch a random page of a large index on every insert: more pages written per commit, more
    of the index needed in memory. 72 random bits keep them unguessable, and ownership is checked
    on every read anyway; the time they give away is the record's own create time."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(9)}"
