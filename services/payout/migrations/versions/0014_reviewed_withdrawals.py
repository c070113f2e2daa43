"""Withdrawals on ledger holds with a review lifecycle, a PayPal-like processor and reconciliation.

A withdrawal now holds its diamonds (ledger hold, `hold_id`) instead of moving them to the in-flight
account; it goes requested -> in_review -> approved -> processing -> paid | failed | returned, with
rejected and cancelled from review. Every status change is kept (`withdrawal_events`). The worker
records when it first sent a withdrawal to the processor (`submitted_at`, so a lost answer is looked
up, never resubmitted blindly) and parks one it cannot finish (`parked_at`). Processor callbacks are
kept by event id (exactly once); reconciliation runs keep their reports. A creator's time zone (from
verification) sets the calendar day of the daily cap.

Withdrawals accepted before this revision keep their diamonds in the in-flight account (no hold_id)
and settle as before; the ones still waiting ("pending") are approved.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"

_OPEN_BEFORE = "status IN ('pending', 'processing')"
_WORK = "status IN ('approved', 'processing') AND parked_at IS NULL"


def upgrade() -> None:
    op.drop_index("ix_withdrawals_open", table_name="withdrawals")
    with op.batch_alter_table("withdrawals", recreate="never") as batch:
        batch.add_column(sa.Column("hold_id", sa.String(40)))
        batch.add_column(sa.Column("submitted_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("parked_at", sa.DateTime(timezone=True)))
    op.execute("UPDATE withdrawals SET status = 'approved' WHERE status = 'pending'")
    op.create_index(
        "ix_withdrawals_work",
        "withdrawals",
        ["next_attempt_at", "created_at"],
        postgresql_where=sa.text(_WORK),
        sqlite_where=sa.text(_WORK),
    )
    op.create_index("ix_withdrawals_parked", "withdrawals", ["parked_at", "withdrawal_id"])
    op.create_index("ix_withdrawals_submitted", "withdrawals", ["submitted_at"])
    op.create_table(
        "withdrawal_events",
        sa.Column("withdrawal_id", sa.String(40), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "processor_events",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("item_reference", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "reconciliation_runs",
        sa.Column("run_id", sa.String(40), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked", sa.BigInteger, nullable=False),
        sa.Column("report", sa.Text, nullable=False),
    )
    op.create_index("ix_reconciliation_runs_started", "reconciliation_runs", ["started_at"])
    with op.batch_alter_table("creator_verifications", recreate="never") as batch:
        batch.add_column(
            sa.Column("time_zone", sa.String(64), nullable=False, server_default="UTC")
        )


def downgrade() -> None:
    # Before this revision a waiting withdrawal's diamonds sat in the in-flight account; one that
    # holds them instead would lose its hold here, and its diamonds could be spent twice.
    open_holds = op.get_bind().scalar(
        sa.text(
            "SELECT count(*) FROM withdrawals WHERE hold_id IS NOT NULL "
            "AND status IN ('requested', 'in_review', 'approved', 'processing')"
        )
    )
    if open_holds:
        raise RuntimeError(
            f"{open_holds} withdrawals hold diamonds with ledger holds, which revision 0013 cannot "
            "represent: let them end (paid, failed, cancelled...) before downgrading"
        )
    with op.batch_alter_table("creator_verifications") as batch:
        batch.drop_column("time_zone")
    op.drop_index("ix_reconciliation_runs_started", table_name="reconciliation_runs")
    op.drop_table("reconciliation_runs")
    op.drop_table("processor_events")
    op.drop_table("withdrawal_events")
    for name in ("ix_withdrawals_submitted", "ix_withdrawals_parked"):
        op.drop_index(name, table_name="withdrawals")
    op.drop_index("ix_withdrawals_work", table_name="withdrawals")
    op.execute("UPDATE withdrawals SET status = 'pending' WHERE status = 'approved'")
    with op.batch_alter_table("withdrawals") as batch:
        batch.drop_column("parked_at")
        batch.drop_column("submitted_at")
        batch.drop_column("hold_id")
    op.create_index(
        "ix_withdrawals_open",
        "withdrawals",
        ["created_at"],
        postgresql_where=sa.text(_OPEN_BEFORE),
        sqlite_where=sa.text(_OPEN_BEFORE),
    )
