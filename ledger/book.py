"""Posting transactions, reading balances and history, and auditing the books."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.anchors import Anchor, Heads
from ledger.audit import AuditReport, audit_books
from ledger.chain import GENESIS, entry_hash, transaction_digest
from ledger.schema import accounts
from runtime.auth import principal_or_none
from runtime.clock import Clock, utc
from runtime.errors import FailedPrecondition, NotFound
from runtime.idempotency import AnsweredKey
from runtime.ids import time_ordered_id
from runtime.metrics import after_commit
from runtime.sql import Driver, Statement, Tx, as_tx, is_conflict

log = logging.getLogger("coins.ledger")

MAX_BALANCE = 2**63 - 1

_RETURNING_LINK = "RETURNING balance, seq, head_hash, held, head_at"
_APPLY_DEBIT = Statement(
    "ledger.debit_account",
    "UPDATE ledger_accounts SET balance = balance + :amount, seq = seq + 1 "
    "WHERE account_id = :account_id AND keeps_balance "
    "AND (allow_negative OR balance - held >= :needed) AND (:forced OR NOT frozen) "
    + _RETURNING_LINK,
)
_APPLY_CREDIT = Statement(
    "ledger.credit_account",
    "UPDATE ledger_accounts SET balance = balance + :amount, seq = seq + 1 "
    "WHERE account_id = :account_id AND keeps_balance AND balance <= :ceiling " + _RETURNING_LINK,
)
_ACCOUNT_STATE = Statement(
    "ledger.account_state",
    "SELECT balance, held, keeps_balance, frozen FROM ledger_accounts WHERE account_id = :account_id",
)
_TRANSACTION_COLUMNS = (
    "transaction_id, kind, reference, request_id, caller, policy_version, trace_id, created_at, "
    "digest, acting_user"
)
_TRANSACTION_VALUES = (
    ":transaction_id, :kind, :reference, :request_id, :caller, :policy_version, :trace_id, "
    ":created_at, :digest, :acting_user"
)
_ENTRY_COLUMNS = (
    "transaction_id, account_id, amount, balance_after, created_at, seq, prev_hash, hash, kind"
)
_INSERT_TRANSACTION = Statement(
    "ledger.insert_transaction",
    f"INSERT INTO ledger_transactions ({_TRANSACTION_COLUMNS}) VALUES ({_TRANSACTION_VALUES})",
)
_INSERT_ENTRY = Statement(
    "ledger.insert_entry",
    f"INSERT INTO ledger_entries ({_ENTRY_COLUMNS}) VALUES (:transaction_id, :account_id, "
    ":amount, :balance_after, :created_at, :seq, :prev_hash, :hash, :kind)",
)
_SET_HEAD = Statement(
    "ledger.set_head",
    "UPDATE ledger_accounts SET head_hash = :hash, head_at = :created_at "
    "WHERE account_id = :account_id",
)
_ENTRIES_PG = """unnest(:accounts::text[], :amounts::bigint[], :balances_after::bigint[],
            :seqs::bigint[], :prev_hashes::text[], :hashes::text[])
     WITH ORDINALITY AS e(account_id, amount, balance_after, seq, prev_hash, hash, n)"""
_WRITE_ROWS_PG = f"""tx AS (
    INSERT INTO ledger_transactions ({_TRANSACTION_COLUMNS})
    VALUES (:transaction_id::text, :kind, :reference, :request_id, :caller, :policy_version,
            :trace_id, :created_at::timestamptz, :digest, :acting_user)
)
INSERT INTO ledger_entries ({_ENTRY_COLUMNS})
SELECT :transaction_id::text, e.account_id, e.amount, e.balance_after, :created_at::timestamptz,
       e.seq, e.prev_hash, e.hash, :kind
FROM {_ENTRIES_PG}
ORDER BY e.n"""
_WRITE_POSTING_PG = Statement(
    "ledger.write_posting",
    "",
    postgres=f"""
WITH heads AS (
    UPDATE ledger_accounts AS a SET head_hash = h.hash, head_at = :created_at::timestamptz
    FROM unnest(:head_accounts::text[], :head_hashes::text[]) AS h(account_id, hash)
    WHERE a.account_id = h.account_id
), {_WRITE_ROWS_PG}""",
)
_WRITE_LOCKED_POSTING_PG = Statement(
    "ledger.write_posting",
    "",
    postgres=f"""
WITH heads AS (
    UPDATE ledger_accounts AS a SET balance = e.balance_after, seq = e.seq, head_hash = e.hash,
        head_at = :created_at::timestamptz
    FROM {_ENTRIES_PG}
    WHERE a.account_id = e.account_id AND e.seq IS NOT NULL
), {_WRITE_ROWS_PG}""",
)
"""The same for accounts locked with SELECT ... FOR UPDATE: their balance, seq and head in one UPDATE."""

_READ_LINK = Statement(
    "ledger.read_account",
    "SELECT balance, held, seq, head_hash, frozen, keeps_balance, head_at FROM ledger_accounts "
    "WHERE account_id = :account_id",
)
_POST_AT_ONCE_PG = Statement(
    "ledger.post_at_once",
    "",
    postgres=f"""
WITH updated AS (
    UPDATE ledger_accounts SET balance = :balance_after, seq = :seq, head_hash = :hash,
        head_at = :created_at::timestamptz
    WHERE account_id = :account_id AND keeps_balance AND NOT frozen
      AND balance = :balance_before AND held = :held AND seq = :seq - 1
      AND {AnsweredKey.ABSENT}
    RETURNING account_id
), tx AS (
    INSERT INTO ledger_transactions ({_TRANSACTION_COLUMNS})
    SELECT :transaction_id::text, :kind::text, :reference::text, :request_id::text, :caller::text,
           :policy_version::text, :trace_id::text, :created_at::timestamptz, :digest::text,
           :acting_user::text
    FROM updated
), entries AS (
    INSERT INTO ledger_entries ({_ENTRY_COLUMNS})
    SELECT :transaction_id::text, e.account_id, e.amount, e.balance_after, :created_at::timestamptz,
           e.seq, e.prev_hash, e.hash, :kind::text
    FROM updated, {_ENTRIES_PG}
    ORDER BY e.n
), {AnsweredKey.cte("updated")}
SELECT count(*) FROM updated""",
)
"""A debit, its transaction, its entries and the request's answer in one statement, applied only if the
account is still exactly as read (balance, held, seq) and the request id has no record yet."""

_LOCK_ACCOUNTS_PG = Statement(
    "ledger.lock_accounts",
    "",
    postgres="SELECT account_id, balance, seq, head_hash, held, head_at FROM ledger_accounts "
    "WHERE account_id = ANY(:account_ids::text[]) AND keeps_balance "
    "ORDER BY account_id FOR UPDATE",
)
_BELOW_ZERO = Statement(
    "ledger.below_zero",
    "SELECT account_id FROM ledger_accounts WHERE account_id > :after AND account_id < :end "
    "AND balance < 0 ORDER BY account_id LIMIT :limit",
)
_LOCK_AVAILABLE = Statement(
    "ledger.lock_available",
    "SELECT account_id, balance - held FROM ledger_accounts "
    "WHERE account_id IN (SELECT value FROM json_each(:account_ids)) ORDER BY account_id",
    postgres="SELECT account_id, balance - held FROM ledger_accounts "
    "WHERE account_id = ANY(:account_ids::text[]) ORDER BY account_id FOR UPDATE",
)
_AVAILABLE = Statement(
    "ledger.available_balances",
    "SELECT account_id, balance - held FROM ledger_accounts "
    "WHERE account_id IN (SELECT value FROM json_each(:account_ids))",
    postgres="SELECT account_id, balance - held FROM ledger_accounts "
    "WHERE account_id = ANY(:account_ids::text[])",
)
_OPEN_ACCOUNT = Statement(
    "ledger.open_account",
    "INSERT INTO ledger_accounts (account_id, kind, balance, allow_negative, keeps_balance, "
    "created_at, seq, head_hash) VALUES (:account_id, :kind, 0, :allow_negative, :keeps_balance, "
    ":now, 0, :genesis) ON CONFLICT DO NOTHING",
)
_POSTED_UNDER = Statement(
    "ledger.posted_under",
    "SELECT t.transaction_id, e.balance_after, e.amount FROM ledger_transactions t "
    "JOIN ledger_entries e ON e.transaction_id = t.transaction_id "
    "WHERE t.caller = :caller AND t.request_id = :request_id AND e.account_id = :account_id",
)
"""ux_ledger_transactions_request: the one transaction a caller's request id can have."""
_TRANSACTION_UNDER = Statement(
    "ledger.transaction_under",
    "SELECT transaction_id FROM ledger_transactions "
    "WHERE caller = :caller AND request_id = :request_id",
)
_BALANCES = Statement(
    "ledger.balances",
    "SELECT account_id, balance FROM ledger_accounts "
    "WHERE account_id IN (SELECT value FROM json_each(:account_ids))",
    postgres="SELECT account_id, balance FROM ledger_accounts "
    "WHERE account_id = ANY(:account_ids::text[])",
)


def _current_trace_id() -> str:
    """The trace the posting happens in, recorded on its transaction (empty outside a trace)."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


EntryRow = tuple[str, int, "int | None", "int | None", "str | None", "str | None"]
"""(account, amount, balance after, seq, prev_hash, hash) of one entry to write."""


async def write_posting(
    tx: Tx,
    *,
    transaction: dict[str, object],
    entries: Sequence[EntryRow],
    heads: dict[str, str],
    locked: bool = False,
) -> None:
    """Write a transaction row, its entries and the new chain heads of its accounts (already locked by
    their conditional UPDATEs, or by SELECT ... FOR UPDATE when `locked`: then their balances and
    chain positions are written here too). One round trip on PostgreSQL; on SQLite, statements are
    in-process."""
    if tx.dialect == "postgresql":
        columns = list(zip(*entries, strict=True))
        head_params = (
            {} if locked else {"head_accounts": list(heads), "head_hashes": list(heads.values())}
        )
        await tx.run(
            _WRITE_LOCKED_POSTING_PG if locked else _WRITE_POSTING_PG,
            **transaction,
            **head_params,
            accounts=list(columns[0]),
            amounts=list(columns[1]),
            balances_after=list(columns[2]),
            seqs=list(columns[3]),
            prev_hashes=list(columns[4]),
            hashes=list(columns[5]),
        )
        return
    if heads:
        await tx.run_many(
            _SET_HEAD,
            [
                {"account_id": a, "hash": h, "created_at": transaction["created_at"]}
                for a, h in heads.items()
            ],
        )
    await tx.run(_INSERT_TRANSACTION, **transaction)
    transaction_id, created_at, kind = (
        transaction["transaction_id"],
        transaction["created_at"],
        transaction["kind"],
    )
    await tx.run_many(
        _INSERT_ENTRY,
        [
            {
                "transaction_id": transaction_id,
                "account_id": account_id,
                "amount": amount,
                "balance_after": after,
                "created_at": created_at,
                "seq": seq,
                "prev_hash": prev_hash,
                "hash": hash_,
                "kind": kind,
            }
            for account_id, amount, after, seq, prev_hash, hash_ in entries
        ],
    )


@dataclass(frozen=True)
class Posting:
    """One leg of a transaction: `amount` added to (positive) or taken from (negative) an account."""

    account_id: str
    amount: int
    forced: bool = False
    """A clawback: may take from a frozen account (never below what it may hold, all the same)."""


@dataclass(frozen=True)
class Posted:
    """A written transaction and the balances of its balance-keeping accounts right after it."""

    transaction_id: str
    balances: dict[str, int]
    available: dict[str, int] = field(default_factory=dict)
    """The same accounts' available balances (balance less what active holds reserve)."""


@dataclass(frozen=True)
class _Link:
    """What a keeping account's conditional UPDATE hands back: its new balance and its chain position."""

    balance: int
    seq: int
    head_hash: str
    """The account's head before this posting (its previous entry's hash)."""
    held: int = 0
    head_at: dt.datetime | None = None
    """When its previous entry was posted (None: not known, posted before ledger v10)."""


MAX_CLOCK_SKEW = dt.timedelta(seconds=5)
"""How far ahead of this replica's clock an account's newest entry may be and still date a posting
(replicas' clocks differ by milliseconds). An entry further ahead came from a clock that jumped:
followed, it would date every later posting to the account in the future, for as long as the jump."""


def posting_time(clock_now: dt.datetime, links: Iterable[_Link]) -> dt.datetime:
    """A posting's time: the clock's, but never before the newest entry of an account it posts to
    (another replica's clock may be ahead of this one's), so each account's entries are in time
    order and a statement's opening, movements and closing add up. A newest entry more than
    MAX_CLOCK_SKEW ahead is not followed (and is logged): that one entry stays out of order, and
    the account's next entries are dated by the clock again."""
    now = utc(clock_now)
    latest = now
    for link in links:
        if link.head_at is None or link.head_at <= latest:
            continue
        if link.head_at - now > MAX_CLOCK_SKEW:
            log.warning(
                "an account's newest entry is dated %s, %s ahead of this clock (%s): a clock "
                "jumped; this posting is dated by this clock",
                link.head_at.isoformat(),
                link.head_at - now,
                now.isoformat(),
            )
            continue
        latest = link.head_at
    return latest


def _at(value: object) -> dt.datetime | None:
    return None if value is None else utc(value if isinstance(value, dt.datetime) else str(value))


def insufficient(
    unit: str, account_id: str, balance: int, held: int, required: int
) -> FailedPrecondition:
    """INSUFFICIENT_FUNDS, saying what is available and what holds reserve."""
    on_hold = f" ({held} on hold)" if held else ""
    return FailedPrecondition(
        "INSUFFICIENT_FUNDS",
        f"not enough {unit}: the balance is {balance}{on_hold}, {required} are needed",
        account_id=account_id,
        balance=balance,
        available=balance - held,
        required=required,
        unit=unit,
    )


def frozen(account_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        "ACCOUNT_FROZEN",
        f"account {account_id} is frozen until its clawback debt is paid off",
        account_id=account_id,
    )


class Ledger:
    def __init__(
        self, clock: Clock, *, unit: str, on_posted: Callable[[str, int], None] | None = None
    ) -> None:
        self.clock = clock
        self._clock = clock
        self.unit = unit
        """What the amounts count ("coins", "diamonds"), for error messages."""
        self.on_posted = on_posted
        """Told (kind, amount moved) of every transaction once it has committed: the service's
        business metrics (runtime.metrics.after_commit)."""
        self._passive: set[str] = set()
        """Accounts known to keep no balance row: postings to them skip the UPDATE."""

    async def open_account(
        self,
        conn: AsyncConnection | Tx,
        account_id: str,
        *,
        kind: str = "user",
        allow_negative: bool = False,
        keeps_balance: bool = True,
    ) -> None:
        """Create the account if it does not exist (concurrent opens are safe)."""
        await as_tx(conn).run(
            _OPEN_ACCOUNT,
            account_id=account_id,
            kind=kind,
            allow_negative=allow_negative,
            keeps_balance=keeps_balance,
            now=self._clock.now(),
            genesis=GENESIS,
        )
        if not keeps_balance:
            self._passive.add(account_id)

    async def post(
        self,
        conn: AsyncConnection | Tx,
        postings: Sequence[Posting],
        *,
        kind: str,
        reference: str,
        request_id: str,
        caller: str,
        policy_version: str = "",
        acting_user: str | None = None,
        counted_as: str | None = None,
    ) -> Posted:
        """Write one balanced transaction, or raise and write nothing (the caller's transaction rolls back).
        `counted_as` names it for the metrics (`on_posted`) when its kind alone would miscount it,
        as a correction posted in the other direction under the kind it corrects.

        Round trips: one conditional UPDATE per balance-keeping account, then one write of the chain
        heads, the transaction and its entries (a single statement on PostgreSQL).
        Raises NotFound (ACCOUNT_NOT_FOUND) or FailedPrecondition (INSUFFICIENT_FUNDS).
        """
        if sum(p.amount for p in postings) != 0 or any(p.amount == 0 for p in postings):
            raise ValueError(f"unbalanced or empty postings: {postings}")
        tx = as_tx(conn)
        if acting_user is None:  # who asked: the user the RPC being served acts for, if any
            principal = principal_or_none()
            acting_user = principal.user_id or "" if principal is not None else ""
        transaction_id = time_ordered_id()
        trace_id = _current_trace_id()
        # Lock order by account id, so two transactions touching the same accounts cannot deadlock.
        # Each keeping account's UPDATE also takes the next number of its chain under that row lock.
        order = sorted(range(len(postings)), key=lambda i: postings[i].account_id)
        links: dict[int, _Link] = {}
        balances: dict[str, int] = {}
        available: dict[str, int] = {}
        for i in order:
            link = await self._apply(tx, postings[i])
            if link is not None:
                links[i] = link
                balances[postings[i].account_id] = link.balance
                available[postings[i].account_id] = link.balance - link.held
        # The time is read with the accounts locked, and never before their newest entries': each
        # account's entries are in time order too, whatever the skew between replicas' clocks.
        now = posting_time(self._clock.now(), links.values())
        digest = transaction_digest(
            transaction_id=transaction_id,
            kind=kind,
            reference=reference,
            request_id=request_id,
            caller=caller,
            policy_version=policy_version,
            trace_id=trace_id,
            created_at=now,
            acting_user=acting_user,
            entries=[
                (p.account_id, p.amount, links[i].balance if i in links else None, now)
                for i, p in enumerate(postings)
            ],
        )
        seqs: list[int | None] = [None] * len(postings)
        prev_hashes: list[str | None] = [None] * len(postings)
        hashes: list[str | None] = [None] * len(postings)
        heads: dict[str, str] = {}
        # In chain order: an account posted twice in one transaction links its second entry to its first.
        for i in order:
            if i not in links:
                continue
            link, account_id = links[i], postings[i].account_id
            prev_hash = heads.get(account_id, link.head_hash)
            heads[account_id] = entry_hash(
                prev_hash=prev_hash,
                account_id=account_id,
                seq=link.seq,
                amount=postings[i].amount,
                balance_after=link.balance,
                transaction_id=transaction_id,
                digest=digest,
            )
            seqs[i], prev_hashes[i], hashes[i] = link.seq, prev_hash, heads[account_id]
        await write_posting(
            tx,
            transaction={
                "transaction_id": transaction_id,
                "kind": kind,
                "reference": reference,
                "request_id": request_id,
                "caller": caller,
                "policy_version": policy_version,
                "trace_id": trace_id,
                "created_at": now,
                "digest": digest,
                "acting_user": acting_user,
            },
            entries=[
                (
                    p.account_id,
                    p.amount,
                    links[i].balance if i in links else None,
                    seqs[i],
                    prev_hashes[i],
                    hashes[i],
                )
                for i, p in enumerate(postings)
            ],
            heads=heads,
        )
        self._count(counted_as or kind, postings)
        return Posted(transaction_id, balances, available)

    def _count(self, kind: str, postings: Sequence[Posting]) -> None:
        if self.on_posted is not None:
            moved = sum(p.amount for p in postings if p.amount > 0)
            after_commit(functools.partial(self.on_posted, kind, moved))

    async def open_accounts(self, tx: Tx, account_ids: Sequence[str]) -> None:
        """Create balance-keeping user accounts that do not exist yet, in id order."""
        for account_id in sorted(account_ids):
            await self.open_account(tx, account_id)

    async def transaction_under(self, tx: Tx, *, caller: str, request_id: str) -> str | None:
        """The id of the transaction `caller` posted under `request_id`, if any (kept for ever)."""
        row = await tx.one(_TRANSACTION_UNDER, caller=caller, request_id=request_id)
        return None if row is None else str(row[0])

    async def posted_under(
        self, tx: Tx, *, caller: str, request_id: str, account_id: str
    ) -> tuple[str, int, int] | None:
        """The transaction `caller` posted under `request_id` (unique, kept for ever, unlike the
        request-id answers the services purge): its id, `account_id`'s balance after it and what it
        moved on that account; None if there is none or it did not touch that account."""
        row = await tx.one(
            _POSTED_UNDER, caller=caller, request_id=request_id, account_id=account_id
        )
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    async def balances(self, tx: Tx, account_ids: Sequence[str]) -> dict[str, int]:
        """Kept balances of existing accounts, in one read."""
        rows = await tx.all(_BALANCES, account_ids=list(account_ids))
        return {str(row[0]): int(row[1]) for row in rows}

    async def post_at_once(
        self,
        driver: Driver,
        postings: Sequence[Posting],
        *,
        kind: str,
        reference: str,
        request_id: str,
        caller: str,
        policy_version: str,
        key: AnsweredKey,
        answer: Callable[[Posted], bytes],
    ) -> Posted | None:
        """A debit of one balance-keeping account to a passive one, and the request's `answer`, as ONE
        optimistic statement on PostgreSQL: read the account, compute the chain link, write it all if
        the account is still as read and the request id unrecorded. Two round trips, no transaction
        held open across them, so a hot account's row is locked for one statement only.

        None when it wrote nothing: SQLite, another shape of posting, a refusal to diagnose (funds,
        frozen, no account), the request answered before, or a concurrent posting to the account.
        The caller then takes the transactional path (`post`), which decides each of those.
        """
        if not driver.is_postgres or len(postings) != 2:
            return None
        debit, credit = sorted(postings, key=lambda p: p.amount)
        if (
            debit.amount >= 0
            or debit.forced
            or debit.account_id in self._passive
            or credit.account_id not in self._passive
            or debit.amount + credit.amount != 0
        ):
            return None
        async with driver.read() as tx:
            row = await tx.one(_READ_LINK, account_id=debit.account_id)
        if row is None:
            return None
        balance, held, seq, head_hash, is_frozen, keeps_balance, head_at = row
        if is_frozen or not keeps_balance or int(balance) - int(held) < -debit.amount:
            return None
        link = _Link(
            int(balance) + debit.amount, int(seq) + 1, str(head_hash), int(held), _at(head_at)
        )
        now = posting_time(self._clock.now(), [link])  # as read: the statement checks its seq
        principal = principal_or_none()
        acting_user = principal.user_id or "" if principal is not None else ""
        transaction_id = time_ordered_id()
        trace_id = _current_trace_id()
        digest = transaction_digest(
            transaction_id=transaction_id,
            kind=kind,
            reference=reference,
            request_id=request_id,
            caller=caller,
            policy_version=policy_version,
            trace_id=trace_id,
            created_at=now,
            acting_user=acting_user,
            entries=[
                (p.account_id, p.amount, link.balance if p is debit else None, now)
                for p in postings
            ],
        )
        new_head = entry_hash(
            prev_hash=link.head_hash,
            account_id=debit.account_id,
            seq=link.seq,
            amount=debit.amount,
            balance_after=link.balance,
            transaction_id=transaction_id,
            digest=digest,
        )
        entries: list[EntryRow] = [
            (debit.account_id, debit.amount, link.balance, link.seq, link.head_hash, new_head)
            if p is debit
            else (p.account_id, p.amount, None, None, None, None)
            for p in postings
        ]
        posted = Posted(
            transaction_id,
            {debit.account_id: link.balance},
            {debit.account_id: link.balance - link.held},
        )
        columns = list(zip(*entries, strict=True))
        try:
            async with driver.transaction(single_statement=True) as tx:
                applied = await tx.one(
                    _POST_AT_ONCE_PG,
                    account_id=debit.account_id,
                    balance_before=int(balance),
                    balance_after=link.balance,
                    held=link.held,
                    seq=link.seq,
                    hash=new_head,
                    transaction_id=transaction_id,
                    kind=kind,
                    reference=reference,
                    request_id=request_id,
                    caller=caller,
                    policy_version=policy_version,
                    trace_id=trace_id,
                    created_at=now,
                    digest=digest,
                    acting_user=acting_user,
                    accounts=list(columns[0]),
                    amounts=list(columns[1]),
                    balances_after=list(columns[2]),
                    seqs=list(columns[3]),
                    prev_hashes=list(columns[4]),
                    hashes=list(columns[5]),
                    **key.params,
                    key_response=answer(posted),
                )
        except Exception as error:
            if is_conflict(error):  # a twin recorded the request first: the slow path replays it
                return None
            raise
        if applied is None or int(applied[0]) != 1:
            return None
        self._count(kind, postings)  # after its one statement: committed
        return posted

    async def credit_many(
        self,
        tx: Tx,
        source: str,
        credits: Mapping[str, int],
        *,
        kind: str,
        reference: str,
        request_id: str,
        caller: str,
        policy_version: str = "",
    ) -> Posted:
        """One transaction taking the sum of `credits` from a passive `source` and crediting each
        account its amount: a batch of credits as one balanced, multi-leg transaction.

        Same rows and chain links as `post` with those postings, but on PostgreSQL every account is
        updated by one statement and everything written by one more, however many accounts.
        """
        if not credits or any(amount <= 0 for amount in credits.values()):
            raise ValueError("credit_many takes positive credits")
        postings = [
            Posting(source, -sum(credits.values())),
            *(Posting(account, amount) for account, amount in sorted(credits.items())),
        ]
        if tx.dialect != "postgresql":  # in-process statements: `post`'s one UPDATE each is as fast
            return await self.post(
                tx,
                postings,
                kind=kind,
                reference=reference,
                request_id=request_id,
                caller=caller,
                policy_version=policy_version,
                acting_user="",
            )
        # Lock the accounts in id order (no deadlock with another batch), then write their new
        # balances, chain positions and heads with the rows, in one more statement.
        rows = await tx.all(_LOCK_ACCOUNTS_PG, account_ids=[p.account_id for p in postings[1:]])
        locked = {str(r[0]): r for r in rows}
        links: dict[str, _Link] = {}
        for p in postings[1:]:
            row = locked.get(p.account_id)
            if row is None:  # no such account, or a passive one: say which, as `post` does
                await self._apply(tx, p)
                raise ValueError(f"credit_many: {p.account_id} keeps no balance")
            if int(row[1]) > MAX_BALANCE - p.amount:
                raise FailedPrecondition(
                    "BALANCE_LIMIT_EXCEEDED",
                    f"account {p.account_id} cannot hold more {self.unit}",
                    account_id=p.account_id,
                )
            links[p.account_id] = _Link(
                int(row[1]) + p.amount, int(row[2]) + 1, str(row[3]), int(row[4]), _at(row[5])
            )
        now = posting_time(self._clock.now(), links.values())
        transaction_id = time_ordered_id()
        trace_id = _current_trace_id()
        digest = transaction_digest(
            transaction_id=transaction_id,
            kind=kind,
            reference=reference,
            request_id=request_id,
            caller=caller,
            policy_version=policy_version,
            trace_id=trace_id,
            created_at=now,
            entries=[
                (p.account_id, p.amount, links[p.account_id].balance if i else None, now)
                for i, p in enumerate(postings)
            ],
        )
        entries: list[EntryRow] = [(source, postings[0].amount, None, None, None, None)]
        heads: dict[str, str] = {}
        for p in postings[1:]:
            link = links[p.account_id]
            heads[p.account_id] = entry_hash(
                prev_hash=link.head_hash,
                account_id=p.account_id,
                seq=link.seq,
                amount=p.amount,
                balance_after=link.balance,
                transaction_id=transaction_id,
                digest=digest,
            )
            entries.append(
                (
                    p.account_id,
                    p.amount,
                    link.balance,
                    link.seq,
                    link.head_hash,
                    heads[p.account_id],
                )
            )
        await write_posting(
            tx,
            transaction={
                "transaction_id": transaction_id,
                "kind": kind,
                "reference": reference,
                "request_id": request_id,
                "caller": caller,
                "policy_version": policy_version,
                "trace_id": trace_id,
                "created_at": now,
                "digest": digest,
                "acting_user": "",
            },
            entries=entries,
            heads=heads,
            locked=True,
        )
        balances = {account: link.balance for account, link in links.items()}
        self._count(kind, postings)
        return Posted(
            transaction_id,
            balances,
            {account: link.balance - link.held for account, link in links.items()},
        )

    async def _apply(self, tx: Tx, posting: Posting) -> _Link | None:
        """Move a keeping account's balance and chain position with one conditional UPDATE.

        The UPDATE row-locks the account until the caller's transaction ends, so the `seq` it takes and
        the head it returns cannot be taken by a concurrent posting. None for a non-keeping account.
        """
        if posting.account_id in self._passive:
            return None
        amount = posting.amount
        # A debit may spend only what active holds leave available (balance - held).
        if amount < 0:
            row = await tx.one(
                _APPLY_DEBIT,
                account_id=posting.account_id,
                amount=amount,
                needed=-amount,
                forced=posting.forced,
            )
        else:
            row = await tx.one(
                _APPLY_CREDIT,
                account_id=posting.account_id,
                amount=amount,
                ceiling=MAX_BALANCE - amount,
            )
        if row is not None:
            return _Link(int(row[0]), int(row[1]), str(row[2]), int(row[3]), _at(row[4]))
        found = await tx.one(_ACCOUNT_STATE, account_id=posting.account_id)
        if found is None:
            raise NotFound(
                "ACCOUNT_NOT_FOUND",
                f"account {posting.account_id} does not exist",
                account_id=posting.account_id,
            )
        balance, held, keeps_balance, is_frozen = found
        if not keeps_balance:
            self._passive.add(posting.account_id)
            return None
        if amount > 0:
            raise FailedPrecondition(
                "BALANCE_LIMIT_EXCEEDED",
                f"account {posting.account_id} cannot hold more {self.unit}",
                account_id=posting.account_id,
            )
        if is_frozen and not posting.forced:
            raise frozen(posting.account_id)
        raise insufficient(self.unit, posting.account_id, int(balance), int(held), -amount)

    async def balance(self, conn: AsyncConnection, account_id: str) -> int | None:
        """The kept balance of an account, None if there is no such account."""
        value = await conn.scalar(
            select(accounts.c.balance).where(accounts.c.account_id == account_id)
        )
        return None if value is None else int(value)

    async def below_zero(
        self, tx: Tx, prefix: str, *, after: str = "", limit: int = 500
    ) -> list[str]:
        """Accounts whose id starts with `prefix` and whose kept balance is below zero (debts owed),
        in id order, `limit` at a time from the one `after` (a range of the primary key, not a
        LIKE: an index range on either database)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = await tx.all(_BELOW_ZERO, after=max(after, prefix), end=end, limit=limit)
        return [str(row[0]) for row in rows]

    async def lock_available(self, tx: Tx, account_ids: Sequence[str]) -> dict[str, int]:
        """Row-lock existing accounts in id order (PostgreSQL; SQLite writes are serialized already)
        and read what is available on them (balance less active holds), which then stays true until
        this transaction posts: for decisions computed from balances (a reversal takes what is
        available)."""
        rows = await tx.all(_LOCK_AVAILABLE, account_ids=sorted(account_ids))
        return {str(a): int(b) for a, b in rows}

    async def available_balances(self, tx: Tx, account_ids: Sequence[str]) -> dict[str, int]:
        """What is available (balance less active holds) on existing accounts, in one read."""
        rows = await tx.all(_AVAILABLE, account_ids=list(account_ids))
        return {str(row[0]): int(row[1]) for row in rows}

    async def lock(self, conn: AsyncConnection, account_id: str) -> None:
        """Row-lock an account until the transaction ends (PostgreSQL; SQLite writes are serialized
        already), so a read of its balance stays true until this transaction posts: for decisions
        computed from the balance (a clawback takes what is available), not for plain debits, whose
        conditional UPDATE needs no lock."""
        await conn.execute(
            select(accounts.c.account_id)
            .where(accounts.c.account_id == account_id)
            .with_for_update()
        )

    async def is_frozen(self, conn: AsyncConnection, account_id: str) -> bool:
        return bool(
            await conn.scalar(select(accounts.c.frozen).where(accounts.c.account_id == account_id))
        )

    async def set_frozen(self, conn: AsyncConnection, account_id: str, value: bool) -> None:
        """Freeze (no debits, no holds) or thaw an account."""
        await conn.execute(
            update(accounts).where(accounts.c.account_id == account_id).values(frozen=value)
        )

    async def state(self, conn: AsyncConnection, account_id: str) -> tuple[int, int, bool] | None:
        """(balance, available, frozen) of an account in one read, None if there is none."""
        row = (
            await conn.execute(
                select(accounts.c.balance, accounts.c.held, accounts.c.frozen).where(
                    accounts.c.account_id == account_id
                )
            )
        ).first()
        if row is None:
            return None
        return int(row.balance), int(row.balance) - int(row.held), bool(row.frozen)

    async def available(self, conn: AsyncConnection, account_id: str) -> tuple[int, int] | None:
        """(balance, available = balance - active holds) of an account, None if there is none."""
        row = (
            await conn.execute(
                select(accounts.c.balance, accounts.c.held).where(
                    accounts.c.account_id == account_id
                )
            )
        ).first()
        return None if row is None else (int(row.balance), int(row.balance) - int(row.held))

    async def chain_heads(self, conn: AsyncConnection) -> Heads:
        """Every chained account's newest link (seq, hash): what an anchor keeps."""
        rows = await conn.execute(
            select(accounts.c.account_id, accounts.c.seq, accounts.c.head_hash).where(
                accounts.c.keeps_balance, accounts.c.seq > 0
            )
        )
        return {str(a): (int(seq), str(h)) for a, seq, h in rows}

    async def audit(self, conn: AsyncConnection | Tx, anchor: Anchor | None = None) -> AuditReport:
        """A full audit of the books (see ledger.audit): kept balances against the entries, the zero
        total, every transaction's digest, every chain (seq 1..n, links, hashes, running balances,
        head), every held amount; with an `anchor` (see ledger.anchors), the entries it names must
        still be there, unchanged. Run it in a snapshot (`Database.snapshot`) on a live database."""
        return await audit_books(as_tx(conn), anchor=anchor)
