"""Token buckets for the RPCs that move money: per user and per calling service, per method.

In-process, so each replica enforces its own share; a shared store (Redis) is the next step once
services run more than one replica. Refusals carry how long to wait (google.rpc.RetryInfo).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from runtime.errors import ResourceExhausted


class TokenBuckets:
    """`rate` tokens per second up to `burst`, one bucket per key; the least recently used keys are
    forgotten past `max_keys`, which only ever makes the limiter more lenient."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst = rate, burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token; 0.0 if granted, otherwise the seconds until one is available."""
        now = self._clock()
        tokens, stamp = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class RateLimiter:
    def __init__(self, per_user: TokenBuckets, per_caller: TokenBuckets) -> None:
        self._per_user, self._per_caller = per_user, per_caller

    def check(self, method: str, caller: str, user: str | None) -> None:
        short = method.rsplit("/", 1)[-1]
        if user is not None:
            wait = self._per_user.take(f"{method}|{user}")
            if wait:
                raise ResourceExhausted(
                    "RATE_LIMITED",
                    f"too many {short} calls for user {user!r}; retry in {wait:.2f}s",
                    retry_after=wait,
                    scope="user",
                    limit_per_second=self._per_user.rate,
                )
        wait = self._per_caller.take(f"{method}|{caller}")
        if wait:
            raise ResourceExhausted(
                "RATE_LIMITED",
                f"too many {short} calls from service {caller!r}; retry in {wait:.2f}s",
                retry_after=wait,
                scope="caller",
                limit_per_second=self._per_caller.rate,
            )
