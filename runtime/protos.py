"""Small conversions between Python values and the protobuf types every service uses."""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeAlias

import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from coins.common.v1 import money_pb2
from runtime.clock import utc
from runtime.errors import FieldViolation, InvalidArgument

RpcContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
"""The context a servicer method receives."""


def timestamp(value: dt.datetime) -> Timestamp:
    """A Timestamp from a datetime; naive datetimes (SQLite hands them back) are UTC."""
    ts = Timestamp()
    ts.FromDatetime(utc(value))
    return ts


def money(currency_code: str, amount_minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency_code, amount_minor=amount_minor)


_SYMBOLS = {"USD": "$", "GBP": "£", "EUR": "€"}


def money_text(currency_code: str, amount_minor: int) -> str:
    """An amount as a person reads it: 1250 USD -> "$12.50" (two-decimal currencies)."""
    sign = "-" if amount_minor < 0 else ""
    units, cents = divmod(abs(amount_minor), 100)
    symbol = _SYMBOLS.get(currency_code)
    if symbol:
        return f"{sign}{symbol}{units:,}.{cents:02d}"
    return f"{sign}{units:,}.{cents:02d} {currency_code}"


def to_timedelta(value: Duration, field: str) -> dt.timedelta:
    """A request's Duration; INVALID_ARGUMENT unless it is well formed (nanos within a second and of
    the seconds' sign: `{1 s, -5 ns}` passed the range rule and meant 0.999999995 s)."""
    nanos_ok = -1_000_000_000 < value.nanos < 1_000_000_000
    if not nanos_ok or value.seconds * value.nanos < 0:
        raise _not_valid(
            field, "duration", "nanos within -999,999,999..999,999,999 and of the seconds' sign"
        )
    return value.ToTimedelta()


def to_datetime(value: Timestamp, field: str) -> dt.datetime:
    """A request's Timestamp as an aware UTC datetime; INVALID_ARGUMENT if it is not a valid time."""
    try:
        if not 0 <= value.nanos < 1_000_000_000:
            raise ValueError(value.nanos)
        return value.ToDatetime(dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise _not_valid(
            field, "timestamp", "seconds within 0001-01-01..9999-12-31, nanos 0..999,999,999"
        ) from None


def _not_valid(field: str, kind: str, rule: str) -> InvalidArgument:
    return InvalidArgument(
        "INVALID_REQUEST",
        f"the request has invalid fields: {field} (not a valid {kind}: {rule})",
        violations=(FieldViolation(field, f"not a valid {kind}"),),
        fields=field,
    )
