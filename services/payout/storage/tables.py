"""The payout tables in SQLAlchemy Core, as the migrations make them, and the withdrawal statuses."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()


creators = Table(
    "creators",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("coins_received", BigInteger, nullable=False),
    Column("diamonds_credited", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("rate_numerator", Integer),
    Column("rate_denominator", Integer),
    Column("coins_at_rate", BigInteger, nullable=False, server_default="0"),
    Column("diamonds_at_rate", BigInteger, nullable=False, server_default="0"),
    Column("rate_segment", Integer, nullable=False, server_default="0"),
)
"""A creator's running totals: coins received and diamonds credited, less those reversals took
back (migration 0033). The rate of their current segment (migration 0020; none yet for a creator
not credited since) applies from `coins_at_rate` received, when `diamonds_at_rate` had been
credited; `rate_segment` counts the segments."""


closed_segments = Table(
    "closed_segments",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("rate_segment", Integer, primary_key=True),
    Column("rate_numerator", Integer, nullable=False),
    Column("rate_denominator", Integer, nullable=False),
    Column("coins", BigInteger, nullable=False),
)
"""A creator's rate segment that ended (their rate changed), with the coins it converted less those
reversed since (migration 0033): a reversal of one of its gifts rounds in it."""


withdrawals = Table(
    "withdrawals",
    metadata,
    Column("withdrawal_id", String(40), primary_key=True),
    Column("creator_id", String(64), nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("gross_minor", BigInteger, nullable=False),
    Column("fee_minor", BigInteger, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("method", String(16), nullable=False),
    Column("destination_token", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("failure_reason", String(128), nullable=False),
    Column("processor_reference", String(128)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", String(256), nullable=False),
    Column("method_id", String(40)),
    Column("hold_id", String(40)),
    Column("submitted_at", DateTime(timezone=True)),
    Column("parked_at", DateTime(timezone=True)),
    Column("leased_until", DateTime(timezone=True)),
    Column("sender_batch_id", String(64)),
)
"""A withdrawal holds its diamonds (`hold_id`, a ledger hold; migration 0014) from its request to
its ending; `submitted_at`: first sent to the processor (in batch `sender_batch_id`); `parked_at`:
given up on until an admin retries it; `leased_until`: a worker of some replica works it until
then; `next_attempt_at`: when it is next due (a poll, a retry after a pause)."""


ON_ITS_WAY = ("requested", "in_review", "approved", "processing")
"""Statuses of a withdrawal whose diamonds are held."""


NOT_COUNTED = ("failed", "rejected", "cancelled", "returned")
"""Endings whose money never left (or came back): they do not count against the daily cap."""


ENDINGS = ("paid", *NOT_COUNTED)
"""Where a withdrawal ends (a paid one may still move on to returned)."""


withdrawal_events = Table(
    "withdrawal_events",
    metadata,
    Column("withdrawal_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("reason", String(500), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False, server_default="status_changed"),
)
"""Every status a withdrawal went through (migration 0014), and since migration 0027 each time the
worker parked it and an admin retried it (`kind`, see EVENT_KINDS; `status` is then the one it was
in). Events written before that read as status changes."""


EVENT_KINDS = ("status_changed", "parked", "retried")
"""What a withdrawal event records: a move to its `status`; the worker giving up reaching the
processor (the reason: the last error); an admin handing it back to the worker (RetryWithdrawal).
Failed attempts are not events: they are counted on the withdrawal (`attempts`, `last_error`),
reset by every answer and every retry, so one per attempt would grow a history without bound."""


processor_events = Table(
    "processor_events",
    metadata,
    Column("event_id", String(128), primary_key=True),
    Column("item_reference", String(128), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)
"""Processor callbacks handled, by their event id: a redelivered one changes nothing."""


reconciliation_runs = Table(
    "reconciliation_runs",
    metadata,
    Column("run_id", String(40), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("checked", BigInteger, nullable=False),
    Column("report", Text, nullable=False),
)
"""Reconciliation reports (the mismatches as JSON), newest by `started_at`."""


payout_methods = Table(
    "payout_methods",
    metadata,
    Column("method_id", String(40), primary_key=True),
    Column("creator_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("destination_token", String(256), nullable=False),
    Column("display", String(128), nullable=False),
    Column("is_default", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True)),
)
"""Where a creator's withdrawals go (migration 0013); removed ones are kept for the history."""


creator_verifications = Table(
    "creator_verifications",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("reason", String(256), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("time_zone", String(64), nullable=False, server_default="UTC"),
)
"""KYC status per creator, set by admins; a creator without a row is unverified. The time zone
(migration 0014) sets the calendar day of the daily withdrawal cap."""


gift_credits = Table(
    "gift_credits",
    metadata,
    Column("credit_key", String(320), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("creator_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("transaction_id", String(40)),
    Column("response", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("matured_at", DateTime(timezone=True)),
    Column("reference", String(128)),
    Column("reversed_at", DateTime(timezone=True)),
    Column("reversal_transaction_id", String(40)),
    Column("rate_numerator", Integer, nullable=False),
    Column("rate_denominator", Integer, nullable=False),
    Column("coin_value_micros", BigInteger, nullable=False),
    Column("diamond_value_micros", BigInteger, nullable=False),
    Column("platform_micros", BigInteger, nullable=False),
    Column("reversal_seq", BigInteger),
    Column("request_key", String(320)),
    Column("rate_segment", Integer),
    Column("reversed_diamonds", BigInteger),
    Column("reversed_coins", BigInteger),
)
"""One row per applied gift credit (migration 0007): the exactly-once record and its answer; its
diamonds are pending until `matured_at` (migration 0011); the rates it was converted at and the
platform's share, coins x coin value - diamonds x diamond value, in millionths (migration 0016).
The creator's rate segment it was credited in; once reversed, the diamonds taken back and the coins
that came off its segment with them (migration 0033: -1 for a credit of the rule before it; the
database refuses a credit without its segment and a reversal without what it took: a payout older
than the migration).
`credit_key` names the creator, `request_key` (unique, migration 0026) does not: one request id is
one creator's credit."""


OPEN_WITHDRAWAL_STATUSES = ("requested", "in_review", "approved", "processing")
