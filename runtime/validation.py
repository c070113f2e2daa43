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
