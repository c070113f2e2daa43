"""Reversed gifts: gifting follows payout's reversed credits and takes each reversed gift out of
what counted it.

Payout reverses gift credits (ReverseGiftCredits, an admin's: the coins were found fraudulent) and
numbers each reversal in the order it committed. This job, run by the leading replica every
`GIFTING_REVERSALS_EVERY_SECONDS`, reads the reversals after the last one it applied, and in one
transaction marks their gifts `reversed` (GetGift: CREDIT_STATUS_REVERSED), subtracts them from
their LIVE's sums and top gifters, the rankings and the creators' top gifters, and moves its
position. A crash before that commit reads the same page again; a gift is reversed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import Aborted
from services.gifting import storage

FEED = "reversed credits"


@dataclass(frozen=True)
class ReversedCredit:
    sequence: int
    sent_gift_id: str
    diamonds: int


class ReversalSource(Protocol):
    async def reversed_credits(
        self, after: int, *, limit: int, time_limit: float
    ) -> Sequence[ReversedCredit]: ...


class ReversedGifts:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        source: ReversalSource,
        *,
        page: int,
        time_limit: float,
    ) -> None:
        self._db, self._clock, self._source = db, clock, source
        self.page, self._time_limit = page, time_limit

    async def follow(self) -> int:
        """Apply the next page of reversals; returns how many were read (a full page: run again)."""
        async with self._db.driver.read() as tx:
            after = await storage.followed_position(tx, FEED)
        # Payout down or slow (or not started yet) raises: a failed run in the job's metrics and
        # an ERROR on its trace (returning nothing read as an idle pass: review r24), one line in
        # the log, and the worker tries again after a growing pause.
        found = await self._source.reversed_credits(
            after, limit=self.page, time_limit=self._time_limit
        )
        if not found:
            return 0
        async with self._db.driver.transaction() as tx:
            await storage.reverse_gifts(
                tx, {r.sent_gift_id: r.diamonds for r in found}, self._clock.now()
            )
            if not await storage.move_followed_position(tx, FEED, after, found[-1].sequence):
                raise Aborted("CONCURRENT_FOLLOW", "another replica applied these reversals first")
        return len(found)
