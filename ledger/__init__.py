"""A double-entry ledger, reusable by any service that keeps balances (wallet: coins; payout: diamonds).

Every movement is one transaction whose postings sum to zero across accounts. Entries are only ever
inserted. Balances of user-owned accounts are kept on the account row for speed and are updated with a
conditional UPDATE in the same transaction as the entries (no read-then-write, so no lost updates and no
overdraft under any concurrency). Platform ("system") accounts keep no running balance: every gift would
otherwise queue on one hot row; their balance is the sum of their entries.

The books are tamper-evident (`ledger.chain`): every transaction carries a digest of itself and all its
entries, every entry of a balance-keeping account carries the hash of that account's previous entry, and
the audit (`ledger.audit`, run as a job of its own by `ledger.auditor`) verifies both.

Holds (`ledger.holds`) reserve part of an account's balance for a later capture or release; debits
spend only the available balance (balance - held). History at any depth: `ledger.history`.

The holds table is `ledger.schema.holds` (`ledger.holds` is the module). The names below are imported
when first used, so that the audit job, which needs only `ledger.audit`,
does not load the posting side (SQLAlchemy, Alembic, the auth stack) into its memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledger.audit import AuditReport
    from ledger.book import Ledger, Posted, Posting
    from ledger.chain import GENESIS
    from ledger.holds import Hold, Holds
    from ledger.schema import (
        accounts,
        create_ledger_tables_v1,
        downgrade_ledger_tables_v3,
        downgrade_ledger_tables_v4,
        downgrade_ledger_tables_v5,
        downgrade_ledger_tables_v6,
        downgrade_ledger_tables_v7,
        downgrade_ledger_tables_v8,
        downgrade_ledger_tables_v9,
        downgrade_ledger_tables_v10,
        entries,
        metadata,
        transactions,
        upgrade_ledger_tables_v2,
        upgrade_ledger_tables_v3,
        upgrade_ledger_tables_v4,
        upgrade_ledger_tables_v5,
        upgrade_ledger_tables_v6,
        upgrade_ledger_tables_v7,
        upgrade_ledger_tables_v8,
        upgrade_ledger_tables_v9,
        upgrade_ledger_tables_v10,
    )

_WHERE = {
    "AuditReport": "ledger.audit",
    "GENESIS": "ledger.chain",
    "Hold": "ledger.holds",
    "Holds": "ledger.holds",
    "Ledger": "ledger.book",
    "Posted": "ledger.book",
    "Posting": "ledger.book",
    **{
        name: "ledger.schema"
        for name in (
            "accounts",
            "create_ledger_tables_v1",
            "downgrade_ledger_tables_v3",
            "downgrade_ledger_tables_v4",
            "downgrade_ledger_tables_v5",
            "downgrade_ledger_tables_v6",
            "downgrade_ledger_tables_v7",
            "downgrade_ledger_tables_v8",
            "downgrade_ledger_tables_v9",
            "downgrade_ledger_tables_v10",
            "entries",
            "metadata",
            "transactions",
            "upgrade_ledger_tables_v2",
            "upgrade_ledger_tables_v3",
            "upgrade_ledger_tables_v4",
            "upgrade_ledger_tables_v5",
            "upgrade_ledger_tables_v6",
            "upgrade_ledger_tables_v7",
            "upgrade_ledger_tables_v8",
            "upgrade_ledger_tables_v9",
            "upgrade_ledger_tables_v10",
        )
    },
}

__all__ = [
    "GENESIS",
    "AuditReport",
    "Hold",
    "Holds",
    "Ledger",
    "Posted",
    "Posting",
    "accounts",
    "create_ledger_tables_v1",
    "downgrade_ledger_tables_v3",
    "downgrade_ledger_tables_v4",
    "downgrade_ledger_tables_v5",
    "downgrade_ledger_tables_v6",
    "downgrade_ledger_tables_v7",
    "downgrade_ledger_tables_v8",
    "downgrade_ledger_tables_v9",
    "downgrade_ledger_tables_v10",
    "entries",
    "metadata",
    "transactions",
    "upgrade_ledger_tables_v2",
    "upgrade_ledger_tables_v3",
    "upgrade_ledger_tables_v4",
    "upgrade_ledger_tables_v5",
    "upgrade_ledger_tables_v6",
    "upgrade_ledger_tables_v7",
    "upgrade_ledger_tables_v8",
    "upgrade_ledger_tables_v9",
    "upgrade_ledger_tables_v10",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
