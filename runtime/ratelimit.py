"""Token buckets for the RPCs that move money: per user and per calling service, per method.

In-process by default (each replica enforces the limits alone); with COINS_RATE_LIMIT_REDIS_URL every
replica takes its tokens from the same buckets in Redis (one Lua script per call: atomic, on Redis's
clock), so the limits hold for the suite, however many replicas serve it. If Redis does not answer,
a replica falls back to its own buckets (one warning) rather than refusing every call. Refusals carry
how long to wait (google.rpc.RetryInfo).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from runtime.errors import ResourceExhausted

log = logging.getLogger("coins.ratelimit")


class Buckets(Protocol):
    rate: float
    burst: int

    async def take(self, key: str) -> float:
        """Take one token; 0.0 if granted, otherwise the seconds until one is available."""
        ...


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

    async def take(self, key: str) -> float:
        return self.take_now(key)

    def take_now(self, key: str) -> float:
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


_TAKE = """
local now = redis.call('TIME')
local at = tonumber(now[1]) + tonumber(now[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, stamp = burst, at end
tokens = math.min(burst, tokens + math.max(0, at - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1
elseif rate > 0 then wait = (1 - tokens) / rate
else wait = 3600 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / math.max(rate, 0.001)) + 60)
return tostring(wait)
"""


REDIS_CONNECTIONS = 16
"""Connections to Redis per bucket set and process: a take is one script call of well under a
millisecond, so a few connections serve thousands of calls a second."""


class RedisTokenBuckets:
    """The same buckets, shared by every replica through Redis (`_TAKE`, atomic on the server)."""

    def __init__(self, url: str, rate: float, burst: int, *, prefix: str) -> None:
        self.rate, self.burst = rate, burst
        # Imported here: redis-py costs a process ~6 MB, and only a suite with shared limits uses it.
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        # A blocking pool: under a burst every call in flight asks at once, and redis-py's default
        # pool refuses the 101st (MaxConnectionsError), which made the limits this replica's own
        # for a while (review A4). Here a call waits for one of REDIS_CONNECTIONS instead, up to
        # the same half second a Redis that does not answer gets.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=0.5,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(_TAKE)
        self._prefix = prefix
        self._fallback = TokenBuckets(rate, burst)
        self._warned = False

    async def take(self, key: str) -> float:
        try:
            wait = float(
                await self._script(keys=[f"{self._prefix}{key}"], args=[self.rate, self.burst])
            )
        except self._errors as error:
            if not self._warned:
                log.warning(
                    "rate limits: Redis does not answer (%r); this replica's own buckets", error
                )
                self._warned = True
            return self._fallback.take_now(key)
        self._warned = False
        return wait


def buckets(
    rate: float, burst: int, *, redis_url: str = "", prefix: str = "coins:rate:"
) -> Buckets:
    """Shared buckets when a Redis URL is set, else this process's own."""
    if redis_url:
        return RedisTokenBuckets(redis_url, rate, burst, prefix=prefix)
    return TokenBuckets(rate, burst)


class RateLimiter:
    def __init__(self, per_user: Buckets, per_caller: Buckets) -> None:
        self._per_user, self._per_caller = per_user, per_caller

    async def check(self, method: str, caller: str, user: str | None) -> None:
        short = method.rsplit("/", 1)[-1]
        if user is not None:
            wait = await self._per_user.take(f"{method}|{user}")
            if wait:
                raise ResourceExhausted(
                    "RATE_LIMITED",
                    f"too many {short} calls for user {user!r}; retry in {wait:.2f}s",
                    retry_after=wait,
                    scope="user",
                    limit_per_second=self._per_user.rate,
                )
        wait = await self._per_caller.take(f"{method}|{caller}")
        if wait:
            raise ResourceExhausted(
                "RATE_LIMITED",
                f"too many {short} calls from service {caller!r}; retry in {wait:.2f}s",
                retry_after=wait,
                scope="caller",
                limit_per_second=self._per_caller.rate,
            )
