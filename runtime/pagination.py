"""Cursor pagination (AIP-158): opaque page tokens that carry the last row's sort key.

Keyset pagination keeps every page an index range scan, however deep the caller pages.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from runtime.errors import FieldViolation, InvalidArgument


def page_size(requested: int, default: int = 50, maximum: int = 1000) -> int:
    """0 means the default; the proto rules already refuse negatives and sizes above the maximum."""
    return min(requested or default, maximum)


def encode_token(kind: str, *key: Any) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str, arity: int) -> list[Any] | None:
    """The sort key a token carries, None for an empty token; INVALID_ARGUMENT for a foreign one."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(data, list) or len(data) != arity + 1 or data[0] != kind:
            raise ValueError(token)
        return data[1:]
    except ValueError:
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN",
            "page_token is not a next_page_token of this listing; start again without one",
            violations=(FieldViolation("page_token", "not a token issued by this listing"),),
        ) from None
