"""Reconciliation: the processor's records of our payments against ours, every mismatch reported.

Compared: every withdrawal sent in the window (`PAYOUT_RECONCILE_WINDOW_HOURS`) and every item the
processor has from it. A mismatch is a payment paid there but not here, paid here but not there,
with amounts that differ, an item we never sent, or a withdrawal the processor has more than one
live item for (paid, or still on its way): a double payment. An outcome younger than
`PAYOUT_RECONCILE_GRACE_SECONDS` is not yet a mismatch: its callback may be on its way. The job
reports; it never moves money (a person decides, and the worker's lookups fix what was merely late).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from runtime.clock import utc
from runtime.errors import Unavailable
from runtime.server import Runtime
from services.payout import storage
from services.payout.processor import ItemStatus, PayoutProcessor, outcome_of
from services.payout.settings import PayoutSettings

log = logging.getLogger("coins.payout.reconciliation")


@dataclass(frozen=True)
class Mismatch:
    kind: str
    """paid_there_not_here, paid_here_not_there, amount_differs, unknown_at_processor,
    paid_more_than_once."""
    withdrawal_id: str
    processor_reference: str
    our_status: str
    processor_status: str
    our_amount_minor: int
    processor_amount_minor: int


@dataclass
class Report:
    run_id: str = ""
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


def _mismatch(w: storage.WithdrawalRecord | None, item: ItemStatus | None, kind: str) -> Mismatch:
    reference = item.payout_item_id if item is not None else ""
    if not reference and w is not None:
        reference = w.processor_reference or ""
    return Mismatch(
        kind,
        w.withdrawal_id if w is not None else "",
        reference,
        w.status if w is not None else "",
        item.status if item is not None else "",
        w.net_minor if w is not None else 0,
        item.amount_minor if item is not None else 0,
    )


def by_withdrawal(items: Sequence[ItemStatus]) -> dict[str, list[ItemStatus]]:
    """The processor's items grouped by our withdrawal id (`sender_item_id`), in the order the
    processor lists them (its first item for a withdrawal first)."""
    grouped: dict[str, list[ItemStatus]] = {}
    for item in items:
        grouped.setdefault(item.sender_item_id, []).append(item)
    return grouped


def compare(
    ours: dict[str, storage.WithdrawalRecord],
    theirs: dict[str, list[ItemStatus]],
    settled_before: dt.datetime,
) -> list[Mismatch]:
    """The mismatches between our withdrawals and the processor's items, by withdrawal id. Of
    several items for one withdrawal, the first live one (paid or on its way) is the payment; each
    further live item is a double payment; failed and returned items paid nothing."""
    found: list[Mismatch] = []
    for withdrawal_id in sorted(set(ours) | set(theirs)):
        w, items = ours.get(withdrawal_id), theirs.get(withdrawal_id, [])
        live = [i for i in items if outcome_of(i) not in ("failed", "returned")]
        item = live[0] if live else (items[0] if items else None)
        if w is not None:
            found.extend(_mismatch(w, extra, "paid_more_than_once") for extra in live[1:])

        if w is None:
            found.append(_mismatch(w, item, "unknown_at_processor"))
            continue
        if item is not None and item.amount_minor != w.net_minor:
            found.append(_mismatch(w, item, "amount_differs"))
        settled = item is not None and item.updated_at <= settled_before
        paid_there = item is not None and outcome_of(item) == "paid"
        if paid_there and w.status != "paid" and settled:
            found.append(_mismatch(w, item, "paid_there_not_here"))
        elif w.status == "paid" and not paid_there and (item is None or settled):
            found.append(_mismatch(w, item, "paid_here_not_there"))
    return found


class Reconciler:
    def __init__(self, runtime: Runtime[PayoutSettings], processor: PayoutProcessor) -> None:
        self._rt = runtime
        self._processor = processor

    async def run(self) -> Report:
        settings, clock = self._rt.settings, self._rt.clock
        started = clock.now()
        report = Report(run_id=uuid.uuid4().hex, started_at=started)
        since = started - dt.timedelta(hours=settings.reconcile_window_hours)
        try:
            items = await asyncio.wait_for(
                self._processor.items_since(since), settings.processor_timeout_seconds
            )
        except Exception as error:
            why = "did not answer in time" if isinstance(error, TimeoutError) else repr(error)
            raise Unavailable(
                "PROCESSOR_UNAVAILABLE",
                f"the payout processor {why}: reconciliation did not run; try again shortly",
                retry_after=settings.processor_timeout_seconds,
            ) from error
        theirs = by_withdrawal(items)
        async with self._rt.db.read() as conn:
            ours = {w.withdrawal_id: w for w in await storage.submitted_since(conn, since)}
            # Items of ours sent before the window but updated in it.
            missing = [i for i in theirs if i not in ours]
            if missing:
                ours.update(await storage.withdrawals_by_id(conn, missing))
        grace = dt.timedelta(seconds=settings.reconcile_grace_seconds)
        report.mismatches = compare(ours, theirs, started - grace)
        report.checked = len(set(ours) | set(theirs))
        report.finished_at = finished = clock.now()
        async with self._rt.db.transaction() as conn:
            await storage.save_reconciliation(
                conn,
                report.run_id,
                started,
                finished,
                report.checked,
                json.dumps([asdict(m) for m in report.mismatches]),
            )
        if report.mismatches:
            log.warning(
                "reconciliation %s: %d mismatches in %d payments",
                report.run_id,
                len(report.mismatches),
                report.checked,
            )
        return report

    async def latest(self) -> Report:
        async with self._rt.db.read() as conn:
            row = await storage.latest_reconciliation(conn)
        if row is None:
            return Report()
        return Report(
            run_id=row.run_id,
            started_at=utc(row.started_at),
            finished_at=utc(row.finished_at),
            checked=int(row.checked),
            mismatches=[Mismatch(**m) for m in json.loads(row.report)],
        )

    async def periodic(self) -> int:
        """The scheduled run: how many mismatches it found."""
        return len((await self.run()).mismatches)
