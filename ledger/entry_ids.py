"""Entry ids as callers see them: opaque, not the table's sequence.

`ledger_entries.entry_id` counts every entry the ledger ever wrote, across all accounts: shown as
it is, two of a user's own entries told them how many movements the whole platform made in between
(its volume, day by day), and so did the page tokens that carry it. Callers get the id encrypted
instead: one AES block under a random key the ledger's migration stores in the database (so every
replica, and every restart, names an entry the same way), 32 hex digits like every other id of
the suite. It decrypts back for a page token; a made-up id does not decrypt to an entry id.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from runtime.db import Database
from runtime.sql import Statement

KEY_NAME = "entry_ids"
_KEY = Statement("ledger.entry_ids_key", "SELECT value FROM ledger_secrets WHERE name = :name")


class EntryIds:
    """A keyed permutation of entry ids (AES on one 16-byte block: the id, zero-padded, encrypted
    alone, so ECB is the right mode: each block is its own message)."""

    def __init__(self, key: bytes) -> None:
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        # One of each, kept: ECB carries nothing from block to block, and making a context costs
        # ten times what a block does (a 1,000-entry page names 1,000 ids).
        self._encrypt = cipher.encryptor().update
        self._decrypt = cipher.decryptor().update

    def public(self, entry_id: int) -> str:
        return self._encrypt(entry_id.to_bytes(16, "big")).hex()

    def internal(self, public: Any) -> int:
        """The entry id behind a public one; ValueError for anything else (a page token's
        converter: runtime.pagination)."""
        if not isinstance(public, str) or len(public) != 32:
            raise ValueError(public)
        block = self._decrypt(bytes.fromhex(public))
        if block[:8] != bytes(8):  # not an id this ledger made (ids fit in 63 bits)
            raise ValueError(public)
        return int.from_bytes(block, "big")


async def load_entry_ids(db: Database) -> EntryIds:
    """The ledger's entry id key, from its database (written by the ledger's v8 migration)."""
    async with db.driver.read() as tx:
        row = await tx.one(_KEY, name=KEY_NAME)
    if row is None:
        raise RuntimeError("the ledger has no entry id key: is its database migrated?")
    return EntryIds(bytes(row[0]))
