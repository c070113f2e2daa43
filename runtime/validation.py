"""Request validation from the protovalidate rules written in the protos, before any handler runs."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import protovalidate
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from buf.validate import validate_pb2
from runtime.errors import FieldViolation, InvalidArgument
from runtime.protos import to_datetime, to_timedelta


class RequestValidator:
    """Checks a request against its protovalidate annotations; rules are compiled once per message type."""

    def __init__(self) -> None:
        self._validator = protovalidate.Validator()

    def check(self, request: Message) -> None:
        """Raise InvalidArgument (reason INVALID_REQUEST, one BadRequest violation per bad field;
        CARD_DATA_REFUSED for what looks like a card number)."""
        nul, cards = _suspect_fields(request)
        if nul:
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"invalid request: {'; '.join(f'{f} must not contain NUL characters' for f in nul)}",
                violations=tuple(FieldViolation(f, "must not contain NUL characters") for f in nul),
            )
        if cards:
            raise InvalidArgument(
                "CARD_DATA_REFUSED",
                f"{', '.join(cards)} holds what looks like a card number: send the payment "
                "provider's token (or the last four digits), never card data",
                violations=tuple(
                    FieldViolation(f, "must not contain a card number (PAN)") for f in cards
                ),
            )
        try:
            self._validator.validate(request)
        except protovalidate.ValidationError as error:
            violations = tuple(f for v in error.violations for f in _field_violations(request, v))
            fields_saying: dict[str, list[str]] = {}  # a rule over several fields said once
            for v in violations:
                fields_saying.setdefault(v.description, []).append(v.field or "the request")
            said = "; ".join(
                f"{_listed(fields)}: {description}" for description, fields in fields_saying.items()
            )
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"invalid request: {said[:400]}",  # each field also in the BadRequest detail
                violations=violations,
            ) from None
        if blank := _blank_text(request):
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"{blank} is only spaces or invisible characters: "
                + ("say why (it is kept in the audit trail)" if blank == "reason" else "write one"),
                violations=(FieldViolation(blank, "must have words, not only spaces"),),
                fields=blank,
            )
        if controlled := _text_with(_CONTROL_CHARACTERS, request):
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"{controlled} holds a control character (U+0000-U+001F, U+007F-U+009F, U+2028, "
                "U+2029: a line break, tab or terminal escape), which a feed, a catalog or a "
                "terminal would act on rather than show: write it on one line of plain text",
                violations=(FieldViolation(controlled, "must not contain control characters"),),
                fields=controlled,
            )
        if turned := _text_with(_DIRECTION_CONTROLS, request):
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"{turned} holds a bidirectional control character (U+202A-U+202E, "
                "U+2066-U+2069), which reorders how the text and what follows it are shown: "
                "remove it (right-to-left text needs none)",
                violations=(
                    FieldViolation(turned, "must not contain bidirectional control characters"),
                ),
                fields=turned,
            )
        for name, whole in _time_fields(request.DESCRIPTOR):
            if request.HasField(name):
                whole(getattr(request, name), name)  # INVALID_ARGUMENT if it is not a real time


@functools.cache
def _time_fields(descriptor: Descriptor) -> tuple[tuple[str, Callable[[Any, str], Any]], ...]:
    """The request's Timestamp and Duration fields, each with the check that it is a real time
    (0001-9999, nanos in range): here, before anything is recorded. A handler's own check came
    after the admin audit trail had kept the malformed request (a review's year 10000)."""
    checks: dict[str, Callable[[Any, str], Any]] = {
        Timestamp.DESCRIPTOR.full_name: to_datetime,
        Duration.DESCRIPTOR.full_name: to_timedelta,
    }
    return tuple(
        (field.name, checks[field.message_type.full_name])
        for field in descriptor.fields
        if field.message_type is not None and field.message_type.full_name in checks
    )


def _listed(fields: list[str]) -> str:
    """`a and b`, or for many items (`kinds[0]` ... `kinds[299]`) the first two and how many more."""
    if len(fields) <= 3:
        return " and ".join(fields)
    return f"{fields[0]}, {fields[1]} and {len(fields) - 2} more"


def _field_violations(
    request: Message, violation: protovalidate.Violation
) -> tuple[FieldViolation, ...]:
    if violation.proto.rule_id == "message.oneof":
        return _oneof_violations(request, violation)
    path = violation.proto.field
    field = ".".join(map(_path_element, path.elements)) if path else ""
    return (FieldViolation(field, _explained(violation), _rule_reason(violation)),)


def _path_element(element: Any) -> str:
    """`kinds[3]`: an item of a repeated field named by its index, as the card and NUL checks name
    it (a list of 300 bad kinds was "kinds and kinds and ..."); map entries by their key."""
    subscript = element.subscript
    if subscript is None:
        return str(element.field_name)
    if subscript.field == "index":
        return f"{element.field_name}[{subscript.value}]"
    return f"{element.field_name}[{subscript.value!r}]"


def _oneof_violations(
    request: Message, violation: protovalidate.Violation
) -> tuple[FieldViolation, ...]:
    """A message's "exactly one of these fields" rule (`(buf.validate.message).oneof`) broken: one
    violation per field it names, saying how many are set. protovalidate names the fields only in
    its text, so the rule is found by them there."""
    text = str(violation.proto.message)
    for rule in _oneof_rules(request.DESCRIPTOR):
        names = ", ".join(rule)
        if names in text:
            several = text.startswith("only")
            which = (
                ("both are set" if len(rule) == 2 else "more than one is set")
                if several
                else ("neither is set" if len(rule) == 2 else "none is set")
            )
            description = f"exactly one of {names} must be set; {which}"
            return tuple(FieldViolation(name, description, "MESSAGE_ONEOF") for name in rule)
    return (FieldViolation("", text, "MESSAGE_ONEOF"),)


@functools.cache
def _oneof_rules(descriptor: Descriptor) -> tuple[tuple[str, ...], ...]:
    rules = descriptor.GetOptions().Extensions[validate_pb2.message].oneof
    return tuple(tuple(rule.fields) for rule in rules)


def _explained(violation: protovalidate.Violation) -> str:
    """protovalidate's message, or for an id left empty (a pattern fails on ""), that it is
    required: "does not match regex pattern `^[A-Za-z0-9]...`" does not say what was wrong."""
    if violation.proto.rule_id == "string.pattern" and violation.field_value == "":
        return f"is required ({violation.proto.message.replace('does not match', 'to match')})"
    return str(violation.proto.message)


_TEXT_FIELDS = ("reason", "title", "name")
"""Free text people read (why an admin acts, a LIVE's title, a gift's name): when given, it has
words in it."""


@functools.cache
def _text_fields(descriptor: Descriptor) -> tuple[str, ...]:
    """The message type's string fields among `_TEXT_FIELDS` (looked up once per type: this runs on
    every call)."""
    return tuple(
        name
        for name in _TEXT_FIELDS
        if (field := descriptor.fields_by_name.get(name)) is not None
        and field.type == FieldDescriptor.TYPE_STRING
    )


def _blank_text(request: Message) -> str | None:
    """The first such field given but made of spaces and invisible format characters only (zero-
    width spaces and joiners, byte order marks: a name that shows as nothing)."""
    for name in _text_fields(request.DESCRIPTOR):
        value = getattr(request, name)
        if (
            isinstance(value, str)
            and value
            and all(c.isspace() or unicodedata.category(c) == "Cf" for c in value)
        ):
            return name
    return None


_DIRECTION_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
"""Embeddings, overrides and isolates: they turn the text after them around ("Trojan Source");
the marks U+200E/U+200F, which do not, are left alone."""


_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 controls: a LIVE title with ESC sequences cleared a viewer's terminal in coinsctl and
forged lines in it (a review); a line break or a carriage return forges a line in any log or feed,
and so do the line and paragraph separators U+2028 and U+2029 (Python's splitlines, JavaScript)."""


def _text_with(characters: re.Pattern[str], request: Message) -> str | None:
    for name in _text_fields(request.DESCRIPTOR):
        value = getattr(request, name)
        if isinstance(value, str) and characters.search(value):
            return name
    return None


_DIGIT_RUN = re.compile(r"\d+(?:[\W_]{1,8}\d+)*")
"""Digits in groups, apart by up to eight of anything but letters and digits: what a person types
or pastes between groups (spaces of any kind, tabs, newlines, dots, dashes, slashes, colons, bars:
"4111 1111 1111 1111", "4111 - 1111 - 1111 - 1111", "4111:1111:..."). Reviews got card numbers
through with each separator a narrower rule left out."""
_DIGIT_GROUP = re.compile(r"\d+")


def _digit_chains(run: str) -> list[list[int]]:
    """The run's groups of three or more digits, chained: how card numbers are written (4-4-4-4,
    4-6-5, 4-4-4-4-3, or not grouped). A shorter group breaks a chain, so a date range
    ("2026-01-05/2026-02-04": its 2-digit groups, 16 digits that pass the Luhn check one time in ten)
    is no card number."""
    chains: list[list[int]] = [[]]
    for group in _DIGIT_GROUP.findall(run):
        if len(group) >= 3:
            chains[-1].extend(int(c) for c in group)
        elif chains[-1]:
            chains.append([])
    return [chain for chain in chains if len(chain) >= 13]


def contains_card_number(text: str) -> bool:
    """Whether `text` holds a primary account number: a chain of 13 to 19 digits passing the Luhn
    check, or such a window inside a longer chain. Fields holding one are refused, so it never
    reaches a database or a log (PCI DSS: we store no card data). Linear in the text's length."""
    for run in _DIGIT_RUN.findall(text):
        for digits in _digit_chains(run):
            if len(digits) <= 19:
                if _luhn_valid(digits):
                    return True
            elif _luhn_window(digits):
                return True
    return False


def _luhn_valid(digits: list[int]) -> bool:
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _luhn_window(digits: list[int]) -> bool:
    """Whether any window of 13 to 19 digits passes the Luhn check, each window's sum read off
    prefix sums (a window checked digit by digit made a 1 MB field of ones take 14 s of the event
    loop). A window ending at index e doubles the digits whose index has the other parity than
    e's: `even_last` sums for windows ending on an even index, `odd_last` for the others."""
    doubled = [d * 2 - 9 if d > 4 else d * 2 for d in digits]
    even_last = [0, *accumulate(doubled[i] if i % 2 else d for i, d in enumerate(digits))]
    odd_last = [0, *accumulate(d if i % 2 else doubled[i] for i, d in enumerate(digits))]
    for end in range(13, len(digits) + 1):
        sums = even_last if (end - 1) % 2 == 0 else odd_last
        top = sums[end]
        for length in range(13, min(19, end) + 1):
            if (top - sums[end - length]) % 10 == 0:
                return True
    return False


def _may_hold_card_data(field: FieldDescriptor) -> bool:
    """Tokens and free text a person could paste a card number into. Identifiers (`*_id`, lists of
    them `*_ids`: one 32-hex gift id in 350 holds a Luhn-valid digit run), the caller's
    `reference`, page tokens and signatures (hex digests) are left alone: numeric ids and digests
    are legitimate there."""
    name = field.name
    return not (name.endswith(("_id", "_ids")) or name in ("reference", "page_token", "signature"))


_TEXT, _MESSAGE, _MAP = range(3)


_SCAN_WITHOUT_MAX_LEN = 128
"""How much of a field with no max_len rule the card check reads: such fields are bounded by a
pattern (country codes, processor tokens), which refuses anything longer (a test holds every
field to it)."""


@functools.cache
def _suspect_plan(descriptor: Descriptor) -> tuple[tuple[str, int, bool, int], ...]:
    """The fields of a message type that `_suspect_fields` looks into, as (name, kind, repeated,
    card check bound), worked out once per type: the walk runs on every call, over every item of a
    500-credit batch, and numbers, bytes and enums hold no text. The bound is the field's max_len
    (0: no card check): a longer text is refused by that rule without being read, so no field
    makes the check cost more than its largest allowed value."""
    plan = []
    for field in descriptor.fields:
        if field.message_type is not None:
            kind = _MAP if field.message_type.GetOptions().map_entry else _MESSAGE
        elif field.type == FieldDescriptor.TYPE_STRING:
            kind = _TEXT
        else:
            continue
        bound = 0 if not _may_hold_card_data(field) else _card_scan_bound(field, kind)
        plan.append((field.name, kind, field.is_repeated, bound))
    return tuple(plan)


def _card_scan_bound(field: FieldDescriptor, kind: int) -> int:
    if kind != _TEXT:
        return _SCAN_WITHOUT_MAX_LEN
    rules = field.GetOptions().Extensions[validate_pb2.field]
    text_rules = rules.repeated.items.string if field.is_repeated else rules.string
    return text_rules.max_len if text_rules.HasField("max_len") else _SCAN_WITHOUT_MAX_LEN


def _suspect_fields(message: Message) -> tuple[list[str], list[str]]:
    """Paths of string fields holding U+0000, which no identifier or text of ours may contain (and
    which PostgreSQL cannot store), and of those holding a card number: refused for every field,
    whatever its rules say. Items of a repeated field are named by their index (`gift_ids[3]`):
    in a batch of a hundred, the caller learns which one to fix."""
    nul: list[str] = []
    cards: list[str] = []
    for name, kind, repeated, scan_bound in _suspect_plan(message.DESCRIPTOR):
        value = getattr(message, name)
        if kind == _MESSAGE:
            items = value if repeated else (value,) if message.HasField(name) else ()
            for i, item in enumerate(items):
                inner_nul, inner_cards = _suspect_fields(item)
                if inner_nul or inner_cards:  # paths are built only for what is refused
                    where = f"{name}[{i}]." if repeated else f"{name}."
                    nul += [where + path for path in inner_nul]
                    cards += [where + path for path in inner_cards]
            continue
        if kind == _MAP:
            texts: Sequence[str] = [t for t in (*value.keys(), *value.values()) if type(t) is str]
            for item in value.values():
                if isinstance(item, Message):
                    inner_nul, inner_cards = _suspect_fields(item)
                    nul += [f"{name}.{path}" for path in inner_nul]
                    cards += [f"{name}.{path}" for path in inner_cards]
            repeated = False
        else:
            texts = value if repeated else (value,)
        for i, text in enumerate(texts):
            if "\x00" in text:
                nul.append(f"{name}[{i}]" if repeated else name)
                break
            if len(text) <= scan_bound and contains_card_number(text):
                cards.append(f"{name}[{i}]" if repeated else name)
                break
    return nul, cards


def _rule_reason(violation: protovalidate.Violation) -> str:
    """A protovalidate rule's id as a FieldViolation reason (AIP-193: UPPER_SNAKE_CASE, at most
    63 characters): `int64.gte_lte` -> `INT64_GTE_LTE`; an id left empty is REQUIRED, as its
    description says (`_explained`)."""
    if violation.proto.rule_id == "string.pattern" and violation.field_value == "":
        return "REQUIRED"
    return re.sub(r"[^A-Za-z0-9]+", "_", violation.proto.rule_id).strip("_").upper()[:63]
