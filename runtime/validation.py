"""Request validation from the protovalidate rules written in the protos, before any handler runs."""

from __future__ import annotations

import protovalidate
from google.protobuf.message import Message

from runtime.errors import FieldViolation, InvalidArgument


class RequestValidator:
    """Checks a request against its protovalidate annotations; rules are compiled once per message type."""

    def __init__(self) -> None:
        self._validator = protovalidate.Validator()

    def check(self, request: Message) -> None:
        """Raise InvalidArgument (reason INVALID_REQUEST, one BadRequest violation per bad field)."""
        nul = _nul_fields(request)
        if nul:
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"the request has invalid fields: {', '.join(nul)}",
                violations=tuple(FieldViolation(f, "must not contain NUL characters") for f in nul),
                fields=", ".join(nul),
            )
        try:
            self._validator.validate(request)
        except protovalidate.ValidationError as error:
            violations = tuple(
                FieldViolation(
                    ".".join(e.field_name for e in v.proto.field.elements) if v.proto.field else "",
                    v.proto.message,
                )
                for v in error.violations
            )
            fields = ", ".join(v.field for v in violations)
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"the request has invalid fields: {fields}",
                violations=violations,
                fields=fields,
            ) from None


def _nul_fields(message: Message, prefix: str = "") -> list[str]:
    """Paths of string fields holding U+0000, which no identifier or text of ours may contain (and
    which PostgreSQL cannot store): refused for every field, whatever its rules say."""
    found: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        single = isinstance(value, (str, bytes, Message)) or not hasattr(value, "__iter__")
        for item in [value] if single else list(value):
            if isinstance(item, str) and "\x00" in item:
                found.append(path)
                break
            if isinstance(item, Message):
                found.extend(_nul_fields(item, f"{path}."))
    return found
