"""The payout gauges (withdrawals open by status, parked work, the last reconciliation)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from runtime.clock import utc
from runtime.sql import Statement, Tx

_GAUGE_WITHDRAWALS = Statement(
    "payout.gauge_withdrawals",
    "SELECT status, COUNT(*), COALESCE(SUM(gross_minor), 0) FROM withdrawals "
    "WHERE status IN ('requested', 'in_review', 'approved', 'processing') "  # ..._status_created
    "GROUP BY status",
)


_GAUGE_PARKED = Statement(
    "payout.gauge_parked",
    "SELECT COUNT(*) FROM withdrawals WHERE parked_at IS NOT NULL",  # ix_withdrawals_parked
)


_GAUGE_OLDEST_PROCESSING = Statement(
    "payout.gauge_oldest_processing",
    "SELECT MIN(submitted_at) FROM withdrawals "  # ix_withdrawals_status_created
    "WHERE status = 'processing' AND parked_at IS NULL",
)


_GAUGE_RECONCILIATION = Statement(
    "payout.gauge_reconciliation",
    "SELECT finished_at, report FROM reconciliation_runs ORDER BY started_at DESC LIMIT 1",
)


@dataclass(frozen=True)
class PayoutGauges:
    open_withdrawals: dict[str, tuple[int, int]]
    """status -> (how many, gross minor units), for the statuses a withdrawal passes through."""
    parked: int
    oldest_processing: dt.datetime | None
    """When the oldest withdrawal with the processor, not parked, was first sent (None: none)."""
    reconciliation: tuple[dt.datetime, str] | None
    """The last reconciliation run: when it finished, its mismatches as JSON."""


async def payout_gauges(tx: Tx) -> PayoutGauges:
    rows = await tx.all(_GAUGE_WITHDRAWALS)
    parked = await tx.one(_GAUGE_PARKED)
    oldest = await tx.one(_GAUGE_OLDEST_PROCESSING)
    last = await tx.one(_GAUGE_RECONCILIATION)
    assert parked is not None
    return PayoutGauges(
        {str(r[0]): (int(r[1]), int(r[2])) for r in rows},
        int(parked[0]),
        utc(oldest[0]) if oldest is not None and oldest[0] is not None else None,
        (utc(last[0]), str(last[1])) if last is not None else None,
    )
