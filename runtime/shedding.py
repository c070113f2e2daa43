"""Shedding load early: refuse what cannot be served in time, before it costs any database work.

A service under a burst it cannot absorb should answer most callers at once ("busy, retry in X")
rather than queue everyone until their deadlines pass: queued calls hold connections and memory and
make every accepted call slow. In asyncio there is no visible queue (every call runs, interleaved),
so the signal is how long calls take, as CoDel reads a router's queue: when even the *fastest* call
that completed in the last half second took longer than the queue budget
(`<SVC>_MAX_QUEUE_SECONDS`), the service is standing in a queue of its own making, and new calls are
refused (RESOURCE_EXHAUSTED OVERLOADED, with a RetryInfo) until calls are fast again; so they are
while a call in flight has waited longer than that budget (a stalled service completes nothing to
measure). A step up in healthy load passes (its calls stay fast); so is everything beyond
`<SVC>_MAX_IN_FLIGHT_RPCS` in flight. Below a few calls in flight nothing is refused.

A call whose deadline is shorter than what calls take now is not started either, but answered
DEADLINE_EXCEEDED DEADLINE_TOO_SHORT: its caller's deadline, not load, is the cause (it was
OVERLOADED with a wait to sit out, counted as shedding while the service was idle).

Time a call spends waiting on another service (gifting on the wallet) is not queueing here: it is
left out of both signals (`downstream_call`), so a hung dependency fails the calls that need it
(their own timeouts) without this service shedding the calls that do not (a fault-injection review
saw gifting refuse 80% of its catalog reads while the wallet was stopped). What is left out is the
time the other service says it spent on the call (`SERVED_SECONDS`, a trailer every service sends
its service callers), not the whole wait: the rest is this process's own queue, counted here. In a
burst, calls wait on this side of the connection for a stream (the called service takes
`MAX_STREAMS_PER_CONNECTION` at once) and for this process's busy event loop to resume them; left
out with the dependency's time, that queue hid the overload and no call was refused (review A4:
admitted gifts taking 2-4 s, 75-84% of a 5x burst hung to the callers' deadlines). A call with no
trailer (a timeout, an outage, a hung dependency) leaves its whole wait out, as before.

Reads (Get and List calls) are admitted by the reads' own signals: they queue behind no write
(SQLite's readers do not wait for its writer, nor do PostgreSQL's), so writes waiting for a write
lock another process holds, seconds each, are no reason to refuse them (review r9: every GetBalance
refused OVERLOADED while an operator's shell held the wallet's SQLite file, whose README says reads go
on). Writes are admitted by every call's signals, as before; an overload that slows reads down sheds
them by their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from runtime.errors import DeadlineExceeded, ResourceExhausted

SERVED_SECONDS = "coins-served-seconds"
"""Trailing metadata a service sends a service caller: the seconds it spent on the call (the
caller's shedder counts the rest of its wait as its own)."""

_BUCKET_SECONDS = 0.1
_BUCKETS = 5  # the last half second decides


@dataclass
class Admitted:
    """A call in flight, as the shedder counts it."""

    started: float
    slot: int
    """The 0.1 s slot it is counted in: its start moved on by the time it spent downstream."""
    downstream: float = 0.0
    """Seconds spent waiting on other services so far."""
    waiting: int = 0
    """Downstream calls it is waiting on now (it is counted in no slot meanwhile)."""
    waiting_since: float = 0.0
    ours_while_waiting: float = 0.0
    """Of the current wait, the seconds the called services did not account for (`served`)."""
    finished: bool = False
    """Answered (`done`): a write's work may go on past its answer (a caller that gave up), and
    its later downstream calls are no longer this shedder's to count."""
    read: bool = False
    """A read (Get, List): counted in the reads' own signals too."""


_current: contextvars.ContextVar[tuple[LoadShedder, Admitted] | None] = contextvars.ContextVar(
    "shed_call", default=None
)


def serving(shedder: LoadShedder, call: Admitted) -> None:
    """Make `call` the one `downstream_call` accounts for in this task (and the tasks it starts)."""
    _current.set((shedder, call))


class Waiting:
    """One call to another service, as the shedder sees it: `served(seconds)` once the service
    says how long it spent on it."""

    def __init__(self, shedder: LoadShedder | None, call: Admitted | None) -> None:
        self._shedder, self._call = shedder, call
        self._began = shedder.now() if shedder is not None else 0.0

    def served(self, seconds: float) -> None:
        """The called service spent `seconds` on the call: the rest of this wait was ours."""
        if self._shedder is None or self._call is None:
            return
        waited = self._shedder.now() - self._began
        self._call.ours_while_waiting += max(0.0, waited - max(0.0, seconds))


@contextlib.contextmanager
def downstream_call() -> Iterator[Waiting]:
    """Around a call to another service made while serving a call: its wait is not ours, but for
    what the service does not account for (`Waiting.served`)."""
    current = _current.get()
    if current is None:
        yield Waiting(None, None)
        return
    shedder, call = current
    shedder.wait_begins(call)
    try:
        yield Waiting(shedder, call)
    finally:
        shedder.wait_ends(call)


class _Signals:
    """What the shedder reads of one set of calls: in flight by the 0.1 s slot each started in,
    the fastest completion of each of the last five slots, and a typical duration."""

    def __init__(self, bucket: int) -> None:
        self.fastest: list[float | None] = [None] * _BUCKETS
        self.bucket = bucket
        self.started: dict[int, int] = {}
        """Calls in flight by the 0.1 s slot they started in (the oldest is the smallest key)."""
        self.typical = 0.0
        """Exponentially weighted call duration: what a new call can expect to take."""

    def count(self, slot: int) -> None:
        self.started[slot] = self.started.get(slot, 0) + 1

    def uncount(self, slot: int) -> None:
        left = self.started.get(slot, 0) - 1
        if left > 0:
            self.started[slot] = left
        else:
            self.started.pop(slot, None)

    def oldest(self, now: float) -> float:
        if not self.started:
            return 0.0
        return max(0.0, now - (min(self.started) + 1) * _BUCKET_SECONDS)

    def roll(self, now: float) -> None:
        bucket = int(now / _BUCKET_SECONDS)
        if bucket != self.bucket:
            for skipped in range(self.bucket + 1, min(bucket, self.bucket + _BUCKETS) + 1):
                self.fastest[skipped % _BUCKETS] = None
            self.bucket = bucket

    def completed(self, seconds: float, now: float) -> None:
        self.typical += 0.1 * (seconds - self.typical)
        self.roll(now)
        slot = self.bucket % _BUCKETS
        fastest = self.fastest[slot]
        self.fastest[slot] = seconds if fastest is None else min(fastest, seconds)

    def fastest_recent(self, now: float) -> float | None:
        self.roll(now)
        seen = [t for t in self.fastest if t is not None]
        return min(seen) if seen else None


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
        self._all = _Signals(int(now() / _BUCKET_SECONDS))
        """Every call: what a write is admitted by."""
        self._reads = _Signals(int(now() / _BUCKET_SECONDS))
        """Reads alone: what a read is admitted by."""

    def now(self) -> float:
        """The shedder's clock (monotonic seconds; a test's own)."""
        return self._now()

    def _views(self, call: Admitted) -> tuple[_Signals, ...]:
        return (self._all, self._reads) if call.read else (self._all,)

    def admit(self, time_remaining: float | None, *, read: bool = False) -> Admitted:
        """Count the call in and return its start time, or refuse it (RESOURCE_EXHAUSTED OVERLOADED)
        if it cannot be served in time. Every admitted call must be ended with `done(start)`. A
        `read` is judged by the reads' signals alone."""
        signals = self._reads if read else self._all
        if self.in_flight >= self._min_in_flight:
            if self.in_flight >= self._max_in_flight:
                self._refuse("too many calls in flight", signals)
            now = self._now()
            fastest = signals.fastest_recent(now)
            if fastest is not None and fastest > self._target:
                self._refuse(f"even the fastest recent call took {fastest:.2f}s", signals)
            oldest = signals.oldest(now)
            if oldest > self._target:
                self._refuse(f"a call has been in flight for {oldest:.2f}s", signals)
            if time_remaining is not None and signals.typical > time_remaining:
                # Not overload (nothing to wait out): this caller's deadline is too short.
                raise DeadlineExceeded(
                    "DEADLINE_TOO_SHORT",
                    f"calls take {signals.typical:.2f}s now and this one's deadline leaves "
                    f"{max(time_remaining, 0.0):.3f}s: it was not started (nothing was done); "
                    "send it again with a longer deadline",
                    typical_seconds=f"{signals.typical:.3f}",
                )
        self.in_flight += 1
        started = self._now()
        call = Admitted(started, int(started / _BUCKET_SECONDS), read=read)
        for view in self._views(call):
            view.count(call.slot)
        return call

    def done(self, call: Admitted) -> None:
        if call.finished:
            return
        self.in_flight -= 1
        now = self._now()
        if call.waiting:  # answered while waiting downstream: the wait ends here for us
            call.downstream += self._theirs(call, now)
        else:
            for view in self._views(call):
                view.uncount(call.slot)
        call.finished = True
        here = now - call.started - call.downstream  # the time it spent in this process
        for view in self._views(call):
            view.completed(here, now)

    def wait_begins(self, call: Admitted) -> None:
        """The call waits on another service: it is not in our queue meanwhile."""
        call.waiting += 1
        if call.waiting == 1 and not call.finished:
            call.waiting_since = self._now()
            call.ours_while_waiting = 0.0
            for view in self._views(call):
                view.uncount(call.slot)

    def wait_ends(self, call: Admitted) -> None:
        call.waiting -= 1
        if call.waiting == 0 and not call.finished:
            call.downstream += self._theirs(call, self._now())
            call.slot = int((call.started + call.downstream) / _BUCKET_SECONDS)
            for view in self._views(call):
                view.count(call.slot)

    @staticmethod
    def _theirs(call: Admitted, now: float) -> float:
        """Of the wait that ends now, the seconds the called services account for."""
        waited = now - call.waiting_since
        return max(0.0, waited - min(call.ours_while_waiting, waited))

    def oldest_waiting(self) -> float:
        """How long the oldest call in flight has been running (0 with none): a stalled service
        completes nothing, so this is its only sign."""
        return self._all.oldest(self._now())

    def fastest_recent(self) -> float | None:
        """The shortest call completed in the last half second; None if none completed."""
        return self._all.fastest_recent(self._now())

    def _refuse(self, why: str, signals: _Signals) -> None:
        raise ResourceExhausted(
            "OVERLOADED",
            f"the service is overloaded ({why}); retry after the suggested delay (a call with a "
            "request_id: with the same one)",
            retry_after=min(max(signals.typical, self._target), 5.0),
            in_flight=self.in_flight,
        )
