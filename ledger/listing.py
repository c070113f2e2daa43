"""The gRPC side of every ledger history listing and statement (wallet's coins, payout's diamonds):
reading a request's page size, token, kinds and period the same way, and writing the next token."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ledger.entry_ids import EntryIds
from ledger.history import HistoryEntry, Period
from runtime.clock import utc
from runtime.errors import FieldViolation, InvalidArgument
from runtime.pagination import decode_token, encode_token, instant, page_size
from runtime.protos import timestamp, to_datetime

M = TypeVar("M")
BEGINNING = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
"""A statement without a start begins here: before any entry."""


@dataclass(frozen=True)
class HistoryQuery:
    """One page's worth of a listing request, in domain terms."""

    size: int
    kinds: list[str]
    since: dt.datetime | None
    until: dt.datetime | None
    cursor: tuple[dt.datetime, int] | None
    scope: str
    """What a token of this listing is bound to (the account and the filters)."""
    ids: EntryIds

    def next_token(self, rows: Sequence[HistoryEntry]) -> str:
        """The token for the page after `rows` (fetched with `size + 1`), empty on the last page;
        it names the last entry as callers see it (ledger.entry_ids)."""
        if len(rows) <= self.size:
            return ""
        last = rows[self.size - 1]
        return encode_token(self.scope, last.created_at.isoformat(), self.ids.public(last.entry_id))


def _time(request: Any, name: str) -> dt.datetime | None:
    """A period bound, rounded up to the microsecond entries are dated in: an entry at e is inside
    [start, end) exactly when it is inside [ceil(start), ceil(end)) (truncating moved an entry a
    nanosecond before a bound to its other side)."""
    if not request.HasField(name):
        return None
    value = getattr(request, name)
    moment = to_datetime(value, name)
    if value.nanos % 1000 and moment < MAX_MOMENT:
        return moment + dt.timedelta(microseconds=1)
    return moment


MAX_MOMENT = dt.datetime.max.replace(tzinfo=dt.UTC)


def history_query(
    request: Any, owner: str, kind_names: Mapping[Any, str], ids: EntryIds
) -> HistoryQuery:
    """Read a listing request (page_size, page_token, kinds, start_time, end_time)."""
    kinds = sorted(kind_names[k] for k in request.kinds)
    since, until = _time(request, "start_time"), _time(request, "end_time")
    if since is not None and until is not None and until < since:
        raise InvalidArgument(  # as a statement says: an empty page would hide the mistake
            "INVALID_PERIOD",
            f"end_time ({until.isoformat()}) is before start_time ({since.isoformat()})",
            violations=(FieldViolation("end_time", "must not be before start_time"),),
        )
    # The filters are part of the token's scope: a token only continues the listing it came from.
    scope = f"ledger:{owner}:{','.join(kinds)}:{since}:{until}"
    after = decode_token(request.page_token, scope, instant, ids.internal)
    return HistoryQuery(
        size=page_size(request.page_size),
        kinds=kinds,
        since=since,
        until=until,
        cursor=(after[0], after[1]) if after else None,
        scope=scope,
        ids=ids,
    )


def statement_response(
    response_type: Callable[..., M],
    line_type: Callable[..., Any],
    kinds: Mapping[str, int],
    period: Period,
    since: dt.datetime,
    until: dt.datetime,
) -> M:
    """A Get*Statement response (wallet's and payout's share their field names)."""
    return response_type(
        opening_balance=period.opening,
        closing_balance=period.closing,
        lines=[
            line_type(
                kind=kinds.get(line.kind, 0),
                credited=line.credited,
                debited=line.debited,
                entries=line.entries,
            )
            for line in sorted(period.movements, key=lambda m: kinds.get(m.kind, 0))
        ],  # in the kind enum's order, as the contract says
        start_time=timestamp(since),
        end_time=timestamp(until),
    )


def statement_period(request: Any, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """[start_time, end_time) of a statement request: from the beginning, until now, by default."""
    until = _time(request, "end_time") or utc(now)
    # No start: from before the account's first entry, even for an end before 1970 (nothing then).
    since = _time(request, "start_time") or min(BEGINNING, until)
    if until < since:  # a start_time was sent (without one, since <= until)
        start = f"start_time ({since.isoformat()})"
        if _time(request, "end_time"):
            end = f"end_time ({until.isoformat()})"
            violation = FieldViolation("end_time", f"must not be before {start}")
        else:  # the caller sent a start in the future: that is the field to mend
            end = f"the end (now, {until.isoformat()}; no end_time was given)"
            violation = FieldViolation("start_time", f"must not be after {end}")
        raise InvalidArgument("INVALID_PERIOD", f"{end} is before {start}", violations=(violation,))
    return since, until
