"""Small conversions between Python values and the protobuf types every service uses."""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeAlias

import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from coins.common.v1 import money_pb2

RpcContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
"""The context a servicer method receives."""


def timestamp(value: dt.datetime) -> Timestamp:
    """A Timestamp from a datetime; naive datetimes (SQLite hands them back) are UTC."""
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    return ts


def money(currency_code: str, amount_minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency_code, amount_minor=amount_minor)
