"""A double-entry ledger, reusable by any service that keeps balances (wallet: coins; payout: diamonds).

Every movement is one transaction whose postings sum to zero across accounts. Entries are only ever
inserted. Balances of user-owned accounts are kept on the account row for speed and are updated with a
conditional UPDATE in the same transaction as the entries (no read-then-write, so no lost updates and no
overdraft under any concurrency). Platform ("system") accounts keep no running balance: every gift would
otherwise queue on one hot row; their balance is the sum of their entries.
"""

from ledger.book import Ledger, Posted, Posting
from ledger.schema import accounts, create_ledger_tables_v1, entries, metadata, transactions

__all__ = [
    "Ledger",
    "Posted",
    "Posting",
    "accounts",
    "create_ledger_tables_v1",
    "entries",
    "metadata",
    "transactions",
]
