"""Shedding load early: refuse what cannot be served in time, before it costs any database work.

A service under a burst it cannot absorb should answer most callers at once ("busy, retry in X")
rather than queue everyone until their deadlines pass: queued calls hold connections and memory and
make every accepted call slow. In asyncio there is no visible queue (every call runs, interleaved), so
the signal is how long calls take, as CoDel reads a router's queue: when even the *fastest* call that
completed in the last half second took longer than the queue budget (`<SVC>_MAX_QUEUE_SECONDS`), the
service is standing in a queue of its own making, and new calls are refused (RESOURCE_EXHAUSTED
OVERLOADED, with a RetryInfo) until calls are fast again; so they are while a call in flight has
waited longer than that budget (a stalled service completes nothing to measure). A step up in healthy load passes (its calls
stay fast); a call whose deadline is shorter than what calls take now is refused as well, and so is
everything beyond `<SVC>_MAX_IN_FLIGHT_RPCS` in flight. Below a few calls in flight nothing is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from runtime.errors import ResourceExhausted

_BUCKET_SECONDS = 0.1
_BUCKETS = 5  # the last half second decides


class LoadShedder:
    def __init__(
        self,
        *,
        max_in_flight: int,
        max_queue_seconds: float,
        min_in_flight: int = 8,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_in_flight = max_in_flight
        self._target = max_queue_seconds
        self._min_in_flight = min_in_flight
        self._now = now
        self.in_flight = 0
        self._fastest: list[float | None] = [None] * _BUCKETS
        self._bucket = int(now() / _BUCKET_SECONDS)
        self._started: dict[int, int] = {}
        """Calls in flight by the 0.1 s slot they started in (the oldest is the smallest key)."""
        self._typical = 0.0
        """Exponentially weighted call duration: what a new call can expect to take."""

    def admit(self, time_remaining: float | None) -> float:
        """Count the call in and return its start time, or refuse it (RESOURCE_EXHAUSTED OVERLOADED)
        if it cannot be served in time. Every admitted call must be ended with `done(start)`."""
        if self.in_flight >= self._min_in_flight:
            if self.in_flight >= self._max_in_flight:
                self._refuse("too many calls in flight")
            fastest = self.fastest_recent()
            if fastest is not None and fastest > self._target:
                self._refuse(f"even the fastest recent call took {fastest:.2f}s")
            oldest = self.oldest_waiting()
            if oldest > self._target:
                self._refuse(f"a call has been in flight for {oldest:.2f}s")
            if time_remaining is not None and self._typical > time_remaining:
                self._refuse(f"calls take {self._typical:.2f}s now, more than its deadline allows")
        self.in_flight += 1
        started = self._now()
        slot = int(started / _BUCKET_SECONDS)
        self._started[slot] = self._started.get(slot, 0) + 1
        return started

    def done(self, started: float) -> None:
        self.in_flight -= 1
        slot = int(started / _BUCKET_SECONDS)
        left = self._started[slot] - 1
        if left:
            self._started[slot] = left
        else:
            del self._started[slot]
        took = self._now() - started
        self._typical += 0.1 * (took - self._typical)
        self._roll()
        slot = self._bucket % _BUCKETS
        fastest = self._fastest[slot]
        self._fastest[slot] = took if fastest is None else min(fastest, took)

    def oldest_waiting(self) -> float:
        """How long the oldest call in flight has been running (0 with none): a stalled service
        completes nothing, so this is its only sign."""
        if not self._started:
            return 0.0
        return max(0.0, self._now() - (min(self._started) + 1) * _BUCKET_SECONDS)

    def fastest_recent(self) -> float | None:
        """The shortest call completed in the last half second; None if none completed."""
        self._roll()
        seen = [t for t in self._fastest if t is not None]
        return min(seen) if seen else None

    def _roll(self) -> None:
        bucket = int(self._now() / _BUCKET_SECONDS)
        if bucket != self._bucket:
            for skipped in range(self._bucket + 1, min(bucket, self._bucket + _BUCKETS) + 1):
                self._fastest[skipped % _BUCKETS] = None
            self._bucket = bucket

    def _refuse(self, why: str) -> None:
        raise ResourceExhausted(
            "OVERLOADED",
            f"the service is overloaded ({why}); retry with the same request_id after the "
            "suggested delay",
            retry_after=min(max(self._typical, self._target), 5.0),
            in_flight=self.in_flight,
        )
