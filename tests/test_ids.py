"""The ids the services mint sort in the order they were made (their indexes append at the right
edge), look like a UUID's hex, and do not repeat."""

from __future__ import annotations

import re

import pytest

from runtime import ids


def test_ids_sort_in_the_order_they_were_made(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1_000))
    monkeypatch.setattr("runtime.ids.time.time_ns", lambda: next(clock))
    made = [ids.time_ordered_id() for _ in range(1_000)]
    assert made == sorted(made)
    assert all(re.fullmatch(r"[0-9a-f]{32}", each) for each in made)


def test_ids_made_in_the_same_microsecond_differ() -> None:
    made = {ids.time_ordered_id() for _ in range(10_000)}
    assert len(made) == 10_000
