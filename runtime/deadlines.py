"""The caller's deadline, followed through the work it pays for.

grpc Python neither propagates deadlines nor stops a handler whose caller gave up. The request guard
records when the caller's deadline passes; downstream calls get what is left of it
(`runtime.clients.downstream_timeout`), and every write transaction checks it before it commits (and a
single-statement write before it is sent): work the caller was already told had failed must never be
applied behind its back. A retry with the same request id then does it, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from runtime.errors import DeadlineExceeded

_deadline: ContextVar[float | None] = ContextVar("coins_deadline", default=None)


def set_deadline(time_remaining: float | None) -> None:
    """Start following a call whose caller allows `time_remaining` seconds (None: no deadline)."""
    _deadline.set(
        None if time_remaining is None else asyncio.get_running_loop().time() + time_remaining
    )


def remaining() -> float | None:
    """Seconds left before the caller's deadline; None without one."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


def check(stage: str) -> None:
    """Refuse to go on with `stage` once the caller's deadline has passed: DEADLINE_EXCEEDED."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceeded(
            "DEADLINE_EXCEEDED",
            f"the caller's deadline passed before {stage}; nothing was applied: retry with a "
            "longer deadline (a write with the same request_id)",
            stage=stage,
        )


@contextmanager
def lifted() -> Iterator[None]:
    """Write a record of what happened whatever the caller's deadline (the admin audit trail's
    outcome of a call: the caller having left changes nothing about what was done)."""
    token = _deadline.set(None)
    try:
        yield
    finally:
        _deadline.reset(token)
