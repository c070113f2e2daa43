"""The audit of a ledger as a streaming pass: bounded memory, bounded queries, full or incremental.

Two passes over one snapshot of the database, each in pages of a few thousand rows:

- Transactions: every transaction's digest is recomputed from its row and all its entries (its legs,
  fetched per page by the entries' transaction index); its legs must sum to zero and carry its kind.
- Chains: every balance-keeping account's entries are walked by seq (seq 1..n, each prev_hash the
  previous hash, each hash recomputed over the entry and its transaction's digest, each running balance
  the previous plus the amount), up to the head on the account row, whose balance must be the last
  running balance. Small accounts are walked many per query; a large one is paged by seq.

Nothing is kept per transaction or per entry beyond the page at hand: an audit of ten million entries
holds what an audit of ten thousand holds.

A *full* audit verifies everything. An *incremental* one starts each chain at the head a previous
clean audit verified (`ledger_audit_checkpoints`: seq, hash, balance), and verifies the transactions of
every entry appended since (by entry id, re-reading `MARGIN` ids before the previous run's newest, so
a posting that committed just after that run's snapshot is not skipped). A clean run moves the
checkpoints to the heads it verified. A full audit remains the backstop for rewrites of old history
that leave the heads alone (and the anchors outside the database catch rewrites of anchored heads).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger.anchors import Anchor
from ledger.chain import GENESIS, entry_hash, transaction_digest
from runtime.sql import Statement, Tx

PAGE = 5000
"""Rows per query: transactions per page, entries per chain page."""
MARGIN = 100_000
"""Entry ids an incremental audit re-reads before the previous run's newest (late commits)."""

_TX_COLUMNS = (
    "transaction_id, kind, reference, request_id, caller, policy_version, trace_id, created_at, "
    "digest, acting_user"
)
_TRANSACTIONS_AFTER = Statement(
    "audit.transactions",
    f"SELECT {_TX_COLUMNS} FROM ledger_transactions WHERE transaction_id > :after "
    "ORDER BY transaction_id LIMIT :limit",
)
_TRANSACTIONS_BY_ID = Statement(
    "audit.transactions_by_id",
    f"SELECT {_TX_COLUMNS} FROM ledger_transactions "
    "WHERE transaction_id IN (SELECT value FROM json_each(:ids)) ORDER BY transaction_id",
    postgres=f"SELECT {_TX_COLUMNS} FROM ledger_transactions "
    "WHERE transaction_id = ANY(:ids::text[]) ORDER BY transaction_id",
)
_LEGS = Statement(
    "audit.legs",
    "SELECT transaction_id, entry_id, account_id, amount, balance_after, created_at, seq, kind "
    "FROM ledger_entries WHERE transaction_id IN (SELECT value FROM json_each(:ids)) "
    "ORDER BY transaction_id, entry_id",
    postgres="SELECT transaction_id, entry_id, account_id, amount, balance_after, created_at, seq, "
    "kind FROM ledger_entries WHERE transaction_id = ANY(:ids::text[]) "
    "ORDER BY transaction_id, entry_id",
)
_NEW_ENTRIES = Statement(
    "audit.new_entries",
    "SELECT entry_id, transaction_id FROM ledger_entries WHERE entry_id > :after "
    "ORDER BY entry_id LIMIT :limit",
)
_COUNTS = Statement(
    "audit.counts",
    "SELECT count(*), coalesce(sum(amount), 0), coalesce(max(entry_id), 0) FROM ledger_entries",
)
_WATERMARK = Statement("audit.watermark", "SELECT coalesce(max(entry_id), 0) FROM ledger_entries")
_ORPHANS = Statement(
    "audit.orphans",
    "SELECT DISTINCT e.transaction_id FROM ledger_entries AS e WHERE NOT EXISTS "
    "(SELECT 1 FROM ledger_transactions AS t WHERE t.transaction_id = e.transaction_id) LIMIT 100",
)
_ACCOUNTS_AFTER = Statement(
    "audit.accounts",
    "SELECT a.account_id, a.balance, a.seq, a.head_hash, a.held, a.allow_negative, "
    "c.seq, c.hash, c.balance FROM ledger_accounts AS a "
    "LEFT JOIN ledger_audit_checkpoints AS c ON c.account_id = a.account_id "
    "WHERE a.keeps_balance AND a.account_id > :after ORDER BY a.account_id LIMIT :limit",
)
_RESERVED = Statement(
    "audit.reserved",
    "SELECT account_id, sum(amount - captured) FROM ledger_holds WHERE status = 'active' "
    "AND account_id IN (SELECT value FROM json_each(:ids)) GROUP BY account_id",
    postgres="SELECT account_id, sum(amount - captured) FROM ledger_holds WHERE status = 'active' "
    "AND account_id = ANY(:ids::text[]) GROUP BY account_id",
)
_CHAIN_COLUMNS = (
    "e.account_id, e.entry_id, e.seq, e.prev_hash, e.hash, e.amount, e.balance_after, "
    "e.transaction_id, t.digest"
)
_CHAIN_OF_ONE = Statement(
    "audit.chain",
    f"SELECT {_CHAIN_COLUMNS} FROM ledger_entries AS e "
    "LEFT JOIN ledger_transactions AS t ON t.transaction_id = e.transaction_id "
    "WHERE e.account_id = :account_id AND e.seq >= :from_seq AND e.seq <= :to_seq "
    "ORDER BY e.seq LIMIT :limit",
)
_CHAINS_OF_MANY = Statement(
    "audit.chains",
    f"SELECT {_CHAIN_COLUMNS} FROM json_each(:ranges) AS r "
    "JOIN ledger_entries AS e ON e.account_id = json_extract(r.value, '$[0]') "
    "AND e.seq >= json_extract(r.value, '$[1]') AND e.seq <= json_extract(r.value, '$[2]') "
    "LEFT JOIN ledger_transactions AS t ON t.transaction_id = e.transaction_id "
    "ORDER BY e.account_id, e.seq",
    postgres=f"SELECT {_CHAIN_COLUMNS} "
    "FROM unnest(:accounts::text[], :froms::bigint[], :tos::bigint[]) AS r(account_id, f, u) "
    "JOIN ledger_entries AS e ON e.account_id = r.account_id AND e.seq >= r.f AND e.seq <= r.u "
    "LEFT JOIN ledger_transactions AS t ON t.transaction_id = e.transaction_id "
    "ORDER BY e.account_id, e.seq",
)


def _moment(value: Any) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))


@dataclass
class AuditReport:
    """What an audit verified and everything it found wrong."""

    accounts_checked: int = 0
    mismatches: dict[str, tuple[int, int]] = field(default_factory=dict)
    """account id -> (kept balance, balance recomputed from its entries), where they differ."""
    total: int = 0
    """Sum of the entries verified (all of them in a full audit); zero in a correct book."""
    transactions_checked: int = 0
    chains_checked: int = 0
    entries_checked: int = 0
    """Chain links verified."""
    bad_transactions: dict[str, str] = field(default_factory=dict)
    """transaction id -> what is wrong with it (its digest, its legs)."""
    broken_chains: dict[str, str] = field(default_factory=dict)
    """account id -> the first thing wrong with its chain (a gap, a broken link, a hash, the head)."""
    held_mismatches: dict[str, tuple[int, int]] = field(default_factory=dict)
    """account id -> (held on the account, sum of what its active holds reserve), where they differ."""
    negative: dict[str, int] = field(default_factory=dict)
    """account id -> balance, for accounts below zero that may not be."""
    mode: str = "full"
    entry_watermark: int = 0
    """The newest entry id in the snapshot audited."""
    carried_from: str = ""
    """An incremental run's: the full run whose findings it keeps, as no clean full audit has
    cleared them since (their ids are in the fields above)."""

    @property
    def findings(self) -> int:
        """How many things this audit found wrong (0 in a correct book)."""
        return (
            len(self.mismatches)
            + (self.total != 0)
            + len(self.bad_transactions)
            + len(self.broken_chains)
            + len(self.held_mismatches)
            + len(self.negative)
        )

    @property
    def ok(self) -> bool:
        return (
            not self.mismatches
            and self.total == 0
            and not self.bad_transactions
            and not self.broken_chains
            and not self.held_mismatches
            and not self.negative
        )


class _Auditor:
    def __init__(
        self, tx: Tx, report: AuditReport, anchor: Anchor | None, duty_cycle: float
    ) -> None:
        self.tx, self.report = tx, report
        self.duty_cycle = min(1.0, max(0.05, duty_cycle))
        self._since = time.monotonic()
        self.anchored = anchor.heads if anchor is not None else {}
        self.anchor_time = anchor.written_at.isoformat() if anchor is not None else ""
        self.legs_seen = 0

    async def pace(self) -> None:
        """After a page: rest so that the audit (here and in its database backend) is busy only
        `duty_cycle` of the time, leaving the rest to the serving processes it shares hosts with."""
        if self.duty_cycle < 1.0:
            busy = time.monotonic() - self._since
            await asyncio.sleep(busy * (1.0 / self.duty_cycle - 1.0))
        self._since = time.monotonic()

    # -- transactions ---------------------------------------------------------------------------

    async def verify_transactions(self, rows: Sequence[Sequence[Any]]) -> None:
        """Recompute the digests of a page of transaction rows from their legs."""
        if not rows:
            return
        ids = [str(r[0]) for r in rows]
        legs: dict[str, list[Sequence[Any]]] = {}
        for leg in await self.tx.all(_LEGS, ids=ids):
            legs.setdefault(str(leg[0]), []).append(leg)
        report = self.report
        for row in rows:
            tid, kind = str(row[0]), str(row[1])
            mine = legs.get(tid, [])
            self.legs_seen += len(mine)
            report.transactions_checked += 1
            digest = transaction_digest(
                transaction_id=tid,
                kind=kind,
                reference=row[2],
                request_id=row[3],
                caller=row[4],
                policy_version=row[5],
                trace_id=row[6],
                created_at=_moment(row[7]),
                acting_user=row[9],
                entries=[
                    (
                        str(leg[2]),
                        int(leg[3]),
                        None if leg[4] is None else int(leg[4]),
                        _moment(leg[5]),
                    )
                    for leg in mine
                ],
            )
            imbalance = sum(int(leg[3]) for leg in mine)
            report.total += imbalance
            if not row[8]:
                report.bad_transactions[tid] = "no digest"
            elif digest != row[8]:
                report.bad_transactions[tid] = (
                    "digest does not recompute: the transaction or one of its entries was altered, "
                    "added or removed"
                    if mine
                    else "digest does not recompute: the transaction has no entries left"
                )
            elif imbalance:
                report.bad_transactions[tid] = f"its entries sum to {imbalance}, not zero"
            elif any(leg[7] != kind for leg in mine):  # NULL too: migration 6 set every one
                report.bad_transactions[tid] = "an entry's kind is not its transaction's"
            for leg in mine:
                if leg[4] is not None and leg[6] is None:  # a keeping account's entry, unchained
                    report.broken_chains.setdefault(
                        str(leg[2]), f"entry {leg[1]} has no place in the chain (no seq)"
                    )

    async def all_transactions(self) -> None:
        after = ""
        while True:
            rows = await self.tx.all(_TRANSACTIONS_AFTER, after=after, limit=PAGE)
            await self.verify_transactions(rows)
            await self.pace()
            if len(rows) < PAGE:
                return
            after = str(rows[-1][0])

    async def transactions_of_entries_after(self, after: int, watermark: int) -> None:
        """The transactions of every entry with an id in (after, watermark]."""
        while after < watermark:
            rows = await self.tx.all(_NEW_ENTRIES, after=after, limit=PAGE)
            if not rows:
                return
            ids = sorted({str(r[1]) for r in rows if int(r[0]) <= watermark})
            found = await self.tx.all(_TRANSACTIONS_BY_ID, ids=ids)
            for missing in set(ids) - {str(r[0]) for r in found}:
                self.report.bad_transactions[missing] = (
                    "missing: entries refer to a transaction that is not there"
                )
            await self.verify_transactions(found)
            await self.pace()
            after = int(rows[-1][0])

    # -- chains ---------------------------------------------------------------------------------

    async def chains(self, incremental: bool) -> None:
        after = ""
        while True:
            accounts = await self.tx.all(_ACCOUNTS_AFTER, after=after, limit=1000)
            await self._held(accounts)
            batch: list[tuple[Sequence[Any], int]] = []
            size = 0
            for account in accounts:
                self.report.accounts_checked += 1
                if int(account[1]) < 0 and not account[5]:
                    self.report.negative[str(account[0])] = int(account[1])
                start = int(account[6]) if incremental and account[6] is not None else 0
                length = int(account[2]) - start + 1
                if length > PAGE:
                    await self._walk([(account, start)])
                    continue
                if size + length > PAGE:
                    await self._walk(batch)
                    batch, size = [], 0
                batch.append((account, start))
                size += length
            await self._walk(batch)
            if len(accounts) < 1000:
                return
            after = str(accounts[-1][0])

    async def _held(self, accounts: Sequence[Sequence[Any]]) -> None:
        reserved = {
            str(a): int(r)
            for a, r in await self.tx.all(_RESERVED, ids=[str(a[0]) for a in accounts])
        }
        for account in accounts:
            account_id, held = str(account[0]), int(account[4])
            if held != reserved.get(account_id, 0):
                self.report.held_mismatches[account_id] = (held, reserved.get(account_id, 0))

    async def _walk(self, batch: Sequence[tuple[Sequence[Any], int]]) -> None:
        """Walk the chains of a batch of accounts from their start seq (0: from the beginning;
        a checkpoint's seq: from that verified entry, whose hash and balance must be unchanged)."""
        if not batch:
            return
        states: dict[str, _Chain] = {}
        for account, start in batch:
            state = _Chain(account, start)
            states[state.account_id] = state
        if len(batch) == 1:
            ((account, start),) = batch
            state = states[str(account[0])]
            from_seq = max(start, 1)
            while from_seq <= state.head_seq:
                rows = await self.tx.all(
                    _CHAIN_OF_ONE,
                    account_id=state.account_id,
                    from_seq=from_seq,
                    to_seq=state.head_seq,
                    limit=PAGE,
                )
                for row in rows:
                    self._link(state, row)
                await self.pace()
                if len(rows) < PAGE:
                    break
                from_seq = int(rows[-1][2]) + 1
        else:
            ranges = [(s.account_id, max(s.start, 1), s.head_seq) for s in states.values()]
            if self.tx.dialect == "postgresql":
                params: dict[str, Any] = {
                    "accounts": [r[0] for r in ranges],
                    "froms": [r[1] for r in ranges],
                    "tos": [r[2] for r in ranges],
                }
            else:
                params = {"ranges": [list(r) for r in ranges]}
            for row in await self.tx.all(_CHAINS_OF_MANY, **params):
                self._link(states[str(row[0])], row)
            await self.pace()
        for state in states.values():
            self._finish(state)

    def _link(self, state: _Chain, row: Sequence[Any]) -> None:
        _, _entry_id, seq, prev_hash, hash_, amount, after, transaction_id, digest = row
        seq, amount = int(seq), int(amount)
        if state.problem:  # keep the sum, for the balance difference
            state.balance += amount
            return
        if seq == state.start and state.start:  # the checkpointed entry: still as verified?
            # Its stored hash, and the hash its stored fields give (an amount rewritten with
            # the hash left alone: a review's, behind 100k newer entries).
            same = digest is not None and hash_ == entry_hash(
                prev_hash=prev_hash,
                account_id=state.account_id,
                seq=seq,
                amount=amount,
                balance_after=None if after is None else int(after),
                transaction_id=transaction_id,
                digest=digest,
            )
            if (
                not same
                or hash_ != state.checkpoint_hash
                or after is None
                or int(after) != state.balance
            ):
                state.problem = (
                    f"seq {seq}, verified by an earlier audit, has changed: history was rewritten"
                )
            state.seq, state.hash = seq, str(hash_)
            return
        if seq != state.seq + 1:
            state.balance += amount
            state.problem = (
                f"seq {state.seq + 1} is missing (next entry found is seq {seq})"
                if seq > state.seq + 1
                else f"seq {seq} appears twice"
            )
            return
        state.balance += amount
        if prev_hash != state.hash:
            state.problem = f"seq {seq}: prev_hash does not link to seq {state.seq}"
            return
        if digest is None:
            state.problem = f"seq {seq}: transaction {transaction_id} is missing"
            return
        recomputed = entry_hash(
            prev_hash=state.hash,
            account_id=state.account_id,
            seq=seq,
            amount=amount,
            balance_after=None if after is None else int(after),
            transaction_id=transaction_id,
            digest=digest,
        )
        # The link is computed over the stored digest; a transaction whose digest did not recompute
        # (found by the transactions pass, which runs first) breaks every chain it is in.
        if recomputed != hash_ or transaction_id in self.report.bad_transactions:
            state.problem = (
                f"seq {seq}: hash does not match the entry or its transaction {transaction_id}"
            )
            return
        if after is None or int(after) != state.balance:
            state.problem = (
                f"seq {seq}: its balance after is not the running balance {state.balance}"
            )
            return
        state.seq, state.hash = seq, recomputed
        self.report.entries_checked += 1
        anchored = self.anchored.get(state.account_id)
        if anchored is not None and anchored[0] == seq and anchored[1] != recomputed:
            state.problem = (
                f"seq {seq} differs from its hash anchored outside the database at "
                f"{self.anchor_time}: history was rewritten"
            )

    def _finish(self, state: _Chain) -> None:
        report = self.report
        report.chains_checked += 1
        if not state.problem:
            if state.start and state.seq < state.start:
                state.problem = (
                    f"seq {state.start}, verified by an earlier audit, is gone: history was erased"
                )
            elif state.seq != state.head_seq:
                state.problem = (
                    f"the chain ends at seq {state.seq} but the account's head is seq "
                    f"{state.head_seq}"
                )
            elif state.hash != state.head_hash:
                state.problem = "the account's head hash is not its last entry's hash"
        anchored = self.anchored.get(state.account_id)
        if not state.problem and anchored is not None and anchored[0] > state.seq:
            state.problem = (
                f"seq {anchored[0]}, anchored outside the database at {self.anchor_time}, is "
                "gone: history was erased"
            )
        if state.problem:
            report.broken_chains.setdefault(state.account_id, state.problem)
        if state.kept_balance != state.balance:
            report.mismatches[state.account_id] = (state.kept_balance, state.balance)


class _Chain:
    """Where the walk of one account's chain stands."""

    def __init__(self, account: Sequence[Any], start: int) -> None:
        self.account_id = str(account[0])
        self.kept_balance = int(account[1])
        self.head_seq = int(account[2])
        self.head_hash = str(account[3])
        self.start = start
        self.checkpoint_hash = str(account[7]) if start else GENESIS
        self.balance = int(account[8]) if start else 0
        self.seq = start - 1 if start else 0
        self.hash = GENESIS
        self.problem = ""


async def audit_books(
    tx: Tx,
    *,
    anchor: Anchor | None = None,
    incremental_after: int | None = None,
    duty_cycle: float = 1.0,
) -> AuditReport:
    """Audit the books `tx` sees (run it in a snapshot: `Driver.snapshot`, `Database.snapshot`).

    `incremental_after`: the entry watermark of the last clean audit, whose checkpoints the chains
    start from; None for a full audit. `duty_cycle`: the share of the time it may be busy (it rests
    after each page for the rest).
    """
    incremental = incremental_after is not None
    report = AuditReport(mode="incremental" if incremental else "full")
    auditor = _Auditor(tx, report, anchor, duty_cycle)
    if incremental:
        (watermark,) = await tx.one(_WATERMARK) or (0,)
        report.entry_watermark = int(watermark)
        start = max(0, int(incremental_after or 0) - MARGIN)
        await auditor.transactions_of_entries_after(start, report.entry_watermark)
    else:
        counted, total, watermark = await tx.one(_COUNTS) or (0, 0, 0)
        report.entry_watermark = int(watermark)
        await auditor.all_transactions()
        report.total = int(total)
        if int(counted) != auditor.legs_seen:  # entries no transaction owns
            for (transaction_id,) in await tx.all(_ORPHANS):
                report.bad_transactions[str(transaction_id)] = (
                    "missing: entries refer to a transaction that is not there"
                )
    await auditor.chains(incremental)
    return report
