"""No card data is stored: a card number (a Luhn-valid 13-19 digit PAN) in any token or free-text
field is refused with INVALID_ARGUMENT CARD_DATA_REFUSED, and it reaches no database, log or span."""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Iterator

import grpc
import protovalidate
import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message_factory import GetMessageClass
from sqlalchemy import MetaData, String, Text, select

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.errors import InvalidArgument
from runtime.validation import (
    _TEXT,
    RequestValidator,
    _card_scan_bound,
    _luhn_valid,
    _luhn_window,
    _may_hold_card_data,
    _suspect_fields,
    contains_card_number,
)
from tests.helpers import expect_error, field_violations, funded_user, new_id
from tests.suite import Suite

PAN = "4111111111111111"  # the classic Visa test number
SPELLINGS = [
    PAN,
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111.1111.1111.1111",
    "4111_1111_1111_1111",
    f"tok_{PAN}",
    # What a review got through when one separator was all it took:
    "4111  1111  1111  1111",
    "4111 - 1111 - 1111 - 1111",
    "4111/1111/1111/1111",
    "4111,1111,1111,1111",
    "4111\u00a01111\u00a01111\u00a01111",
    # ... and what a verification got through the next rule:
    "4111    1111    1111    1111",
    "4111:1111:1111:1111",
    "4111|1111|1111|1111",
    "4111\n1111\n1111\n1111",
]


def test_card_numbers_are_recognised_and_ordinary_text_is_not() -> None:
    for pan in ("4111111111111111", "5500005555555559", "378282246310005", "6011000990139424"):
        assert contains_card_number(pan) and contains_card_number(f"paid with {pan} today")
    assert contains_card_number("30569309025904")  # 14 digits (Diners)
    assert contains_card_number("xx 40128888888818810000 yy")  # a PAN inside a longer run
    assert contains_card_number("3782 822463 10005")  # Amex, 4-6-5
    assert contains_card_number(f"{SPELLINGS[1]} 12 items")  # a short group after it
    for text in ("tok_visa", "4111111111111112", "1234567890", "2026-12-04 12:00:00", "dest_ok"):
        assert not contains_card_number(text), text
    # Date ranges in a reason ("refund for 2026-01-05/2026-02-04"): a slash is no card grouping
    # (a review found 37 of a year's ranges refused when it was).
    for day in range(365):
        start = dt.date(2026, 1, 1) + dt.timedelta(days=day)
        text = f"refund for {start.isoformat()}/{(start + dt.timedelta(days=30)).isoformat()}"
        assert not contains_card_number(text), text


def test_long_digit_chains_are_checked_window_by_window_in_linear_time() -> None:
    """The prefix-sum check finds exactly the chains in which some 13-19 digit window passes the
    Luhn check, as reading each window digit by digit does (chains of few distinct digits, so that
    about a third have no such window)."""
    rng = random.Random(7)
    found = missed = 0
    for _ in range(20_000):
        alphabet = rng.choice([[1], [1, 2], [3, 7], [0, 1, 1], [5]])
        digits = [rng.choice(alphabet) for _ in range(rng.randint(20, 26))]
        if rng.random() < 0.3:
            digits[rng.randrange(len(digits))] = rng.randint(0, 9)
        each_window = any(
            _luhn_valid(digits[start : start + length])
            for length in range(13, 20)
            for start in range(len(digits) - length + 1)
        )
        assert _luhn_window(digits) == each_window, digits
        found, missed = found + each_window, missed + (not each_window)
    assert found > 5_000 and missed > 5_000


def test_text_longer_than_its_field_allows_is_refused_for_its_length_unread() -> None:
    """The card check reads no more of a field than its max_len allows: a review froze the wallet
    for 14 s with a 1 MB payment token of ones (every window of the chain checked on the event
    loop, before the length rule). Such a field is refused by its length rule instead, and what it
    holds is stored nowhere either way."""
    for token in (PAN + "1" * 300, "1" * 1_000_000, "111 " * 250_000):
        with pytest.raises(InvalidArgument) as refused:
            RequestValidator().check(
                wallet_pb2.PurchaseCoinsRequest(
                    user_id="u1", package_id="p1", payment_token=token, request_id="r1"
                )
            )
        assert refused.value.reason == "INVALID_REQUEST"
        assert [v.reason for v in refused.value.violations] == ["STRING_MAX_LEN"]


def _request_types() -> Iterator[Descriptor]:
    seen: set[str] = set()
    pending = [
        method.input_type
        for module in (wallet_pb2, gifting_pb2, payout_pb2, promotion_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name in seen or descriptor.full_name.startswith("google."):
            continue
        seen.add(descriptor.full_name)
        yield descriptor
        pending += [f.message_type for f in descriptor.fields if f.message_type is not None]


def test_every_checked_field_without_a_max_len_refuses_what_the_check_does_not_read() -> None:
    """A text field the card check reads only in part (no max_len: `_SCAN_WITHOUT_MAX_LEN`) must
    refuse anything longer by its other rules (a pattern), or a card number could pass unread."""
    validator = protovalidate.Validator()
    checked = []
    for descriptor in _request_types():
        for field in descriptor.fields:
            if field.type != field.TYPE_STRING or not _may_hold_card_data(field):
                continue
            bound = _card_scan_bound(field, _TEXT)
            message = GetMessageClass(descriptor)()
            long_text = PAN + "1" * bound
            if field.is_repeated:
                getattr(message, field.name).append(long_text)
            else:
                setattr(message, field.name, long_text)
            violations = validator.collect_violations(message)
            paths = {v.proto.field.elements[0].field_name for v in violations if v.proto.field}
            assert field.name in paths, (
                f"{descriptor.full_name}.{field.name} takes {len(long_text)}"
            )
            checked.append(field.name)
    assert {"payment_token", "country_code", "processor_token", "regions"} <= set(checked)


def test_the_guard_reads_text_in_nested_repeated_and_map_fields() -> None:
    """The walk behind CARD_DATA_REFUSED and the NUL refusal reaches text at any depth: map keys
    and values, repeated items, singular messages (Struct has all three)."""
    request = struct_pb2.Struct()
    request.update({"a": {"b": ["ok", "x\x00y"]}, "note": f"card {SPELLINGS[1]}", "k\x00": 1})
    nul, cards = _suspect_fields(request)
    assert sorted(nul) == ["fields", "fields.struct_value.fields.list_value.values[1].string_value"]
    assert cards == ["fields.string_value"]
    listed = struct_pb2.Value(
        list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=PAN)])
    )
    assert _suspect_fields(listed) == ([], ["list_value.values[0].string_value"])
    assert _suspect_fields(struct_pb2.Value(number_value=4111111111111111)) == ([], [])


async def test_gift_ids_whose_digits_pass_the_luhn_check_are_ids_not_cards(suite: Suite) -> None:
    """About one 32-hex gift id in 350 holds a Luhn-valid run of digits: lists of ids are ids, so
    a reversal or a redelivery naming such a gift is never refused as card data (a review found
    such gifts could never be reversed)."""
    gift_id = "8274612658354a7a80807d613ea28ddd"  # a sent gift id seen in a review's run
    assert contains_card_number(gift_id)
    admin = suite.token(new_id("ops"), admin=True)
    reversed_ = await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[gift_id], reason="fraud confirmed"
        ),
        metadata=admin,
    )
    assert list(reversed_.not_found) == [gift_id]  # looked up, not refused
    redelivered = await suite.gifting.RedeliverParkedCredits(
        gifting_pb2.RedeliverParkedCreditsRequest(
            request_id=new_id("redeliver"), sent_gift_ids=[gift_id], reason="fixed"
        ),
        metadata=admin,
    )
    assert list(redelivered.not_parked_ids) == [gift_id]


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line any service writes during the test, rendered as text."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # grpc's own DEBUG lines (call objects created, never a request's fields) stay off: grpc logs
    # them while holding its own locks, and a garbage collection in another thread that finalizes
    # a grpc object while holding a logging handler's lock then deadlocks the two (seen in CI).
    grpc_logger = logging.getLogger("grpc")
    old_grpc_level = grpc_logger.level
    grpc_logger.setLevel(logging.INFO)
    yield lines
    grpc_logger.setLevel(old_grpc_level)
    root.removeHandler(handler)
    root.setLevel(old_level)


async def stored_text(suite: Suite) -> str:
    """Every text value in every service's database, run together."""
    chunks: list[str] = []
    for running in suite.services.values():
        async with running.runtime.db.read() as conn:
            metadata = MetaData()
            await conn.run_sync(metadata.reflect)
            for table in metadata.sorted_tables:
                columns = [c for c in table.columns if isinstance(c.type, String | Text)]
                if columns:
                    for row in await conn.execute(select(*columns)):
                        chunks.extend(str(v) for v in row if v is not None)
    return "\n".join(chunks)


async def test_a_card_number_is_refused_everywhere_and_stored_nowhere(
    suite: Suite, logged: list[str]
) -> None:
    buyer, coins = await funded_user(suite)
    admin = suite.token(new_id("ops"), admin=True)
    suite.spans.clear()
    for spelling in SPELLINGS:
        error = await expect_error(
            suite.wallet.PurchaseCoins(
                wallet_pb2.PurchaseCoinsRequest(
                    request_id=new_id("buy"),
                    user_id=buyer,
                    package_id="us-web-700",
                    payment_token=spelling,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CARD_DATA_REFUSED",
        )
        assert field_violations(error) == {"payment_token"}
        assert PAN not in (error.details() or "")  # the refusal does not echo it either
        error = await expect_error(
            suite.payout.RequestWithdrawal(
                payout_pb2.RequestWithdrawalRequest(
                    request_id=new_id("wd"),
                    creator_id=buyer,
                    diamonds=2_000,
                    method=payout_pb2.PAYOUT_METHOD_BANK,
                    destination_token=spelling,
                ),
                metadata=suite.token(buyer),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CARD_DATA_REFUSED",
        )
        assert field_violations(error) == {"destination_token"}
        error = await expect_error(
            suite.gifting.SetGift(
                gifting_pb2.SetGiftRequest(
                    request_id=new_id(),
                    gift_id="card-gift",
                    name="Card",
                    coins=5,
                    active=True,
                    reason=f"customer paid with {spelling}",
                ),
                metadata=admin,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CARD_DATA_REFUSED",
        )
        assert field_violations(error) == {"reason"}
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=buyer))
    assert balance.balance.coins == coins  # nothing was bought

    def found_in(text: str) -> bool:
        return PAN in text.replace(" ", "").replace("-", "")

    assert not found_in(await stored_text(suite)), "a card number reached a database"
    assert not any(found_in(line) for line in logged), "a card number reached a log"
    for span in suite.spans.get_finished_spans():
        assert not any(found_in(str(v)) for v in (span.attributes or {}).values()), span.name
        for event in span.events:
            assert not any(found_in(str(v)) for v in (event.attributes or {}).values())
