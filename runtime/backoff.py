"""How long background work waits before trying again: one rule for every worker and outbox."""

from __future__ import annotations


def backoff(failures: int, *, first: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait after `failures` failures in a row: doubling from `first`, at most `cap`.
    The exponent is bounded, so an item that failed a million times never overflows a float."""
    if failures <= 0:
        return 0.0
    return min(cap, first * 2.0 ** min(failures - 1, 60))
