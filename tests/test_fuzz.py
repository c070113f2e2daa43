"""Fuzzing: thousands of random and malformed requests to every RPC fail cleanly; the books hold.

**What is fuzzed.** Every RPC every service serves, its own and coins.common.v1.AdminAuditService,
enumerated from the descriptors the servers register (`ServiceSpec.grpc_services`), so an RPC added
later is fuzzed without touching this file. Two kinds of input:

1. Structurally valid messages with random values, built from each request's descriptor: integers of
   every width (0, negatives, the 32- and 64-bit boundaries), strings (empty, up to hundreds of KiB,
   any Unicode code point including control characters and NUL, SQL-ish and other hostile text), enums
   (unknown numbers too), nested messages (google.type.Date, coins.common.v1.Money), oneofs, repeated
   and map fields. A field whose name the suite uses (`user_id`, `gift_id`, `page_token`, ...) also
   draws from pools of values that exist (funded users, creators with diamonds, real gifts, packages,
   withdrawals, promotions, issued page tokens, tokens forged with a listing's kind), so that many
   requests pass validation and reach the handlers and the databases. Calls go out in small concurrent
   batches, some repeated as they are or with a new request id (a retry, a double click), so that
   duplicates race each other.
2. Malformed bytes, sent with a pass-through serializer: random bytes, and valid requests truncated,
   corrupted, or of another RPC's type.

Calls go through the real servers over mutual TLS as a caller the method's access rule admits, with
a valid token: for the user the request names (so owner checks pass and handlers run), an admin's,
another user's, or none.

**What must hold.** After every call: OK with a response that parses, or a refusal that is neither
INTERNAL nor UNKNOWN and carries a google.rpc.ErrorInfo of the service's domain. After each run, once
the background workers are idle, the books and the records of all four services agree: see
`assert_books_and_records_agree`.

**How it runs.** The servers live on pytest-asyncio's session event loop, and hypothesis's @given
drives synchronous functions. So each async test runs a @given function in a worker thread
(`asyncio.to_thread`); for each example, that function sends the calls back to the loop with
`asyncio.run_coroutine_threadsafe` and waits. Hypothesis sees every outcome, so a failure is shrunk to a
minimal batch and printed. `derandomize=True` makes every run send the same requests (only the ids the
set-up creates, and timing, differ). The suite is the module's own, with fast sandbox processors:
admin calls change the catalog and the price lists, and the fuzz drains rate limits.

**Known bugs** (KNOWN_BUGS, empty now): a bug the fuzz finds and that cannot be fixed at once may be
listed there with its exact failure, tolerated only in that form, and given a strict-xfail reproducer
at the end of this file. The reproducers of the four bugs it found first stay as regression tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import operator
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.type import date_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from coins.common.v1 import admin_audit_pb2, admin_audit_pb2_grpc
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from ledger import Ledger
from ledger import accounts as ledger_accounts
from ledger import entries as ledger_entries
from ledger import transactions as ledger_transactions
from ledger.schema import holds as ledger_holds
from runtime.audit import AdminAuditApi
from runtime.clock import SystemClock
from runtime.db import Database
from runtime.idempotency import idempotency_keys
from runtime.pagination import encode_token
from runtime.status import error_info
from services.gifting.storage import credit_outbox, live_gifters, sent_gifts
from services.payout import policy
from services.payout.sandbox import PayPalSandbox
from services.payout.storage import creators, gift_credits, withdrawals
from services.promotion.storage import promotion_deliveries, promotions
from services.wallet.storage import purchases, wallet_accounts
from tests.helpers import (
    adult_birth_date,
    eventually,
    first_message,
    funded_user,
    live_of,
    new_creator,
    new_id,
    open_account,
    rpc_error,
    verify_creator,
)
from tests.suite import Suite, start_suite

BATCH = (1, 10)
"""Calls per example, sent concurrently (plus up to two repeats); a failing batch shrinks to one."""
STRUCTURED_EXAMPLES = 500
"""About 2,250 calls per backend (derandomized: the same number on every run)."""
MALFORMED_EXAMPLES = 80
MIN_STRUCTURED_CALLS = 2_000
MAX_REQUEST_BYTES = 1024 * 1024 - 4096
"""Under the servers' 1 MiB limit: bigger requests are refused by gRPC itself, not by coins."""
CALL_TIMEOUT = 30.0

pytestmark = pytest.mark.filterwarnings(
    # The servers share this process: their OpenTelemetry ids come from the global `random`, on the
    # loop thread, while hypothesis draws examples on its worker thread and sees that state move.
    "ignore:Do not use the `random` module inside strategies"
)


@pytest.fixture(scope="module")
async def fuzz_suite(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    """A suite of this module's own (admin calls change catalogs, floods drain rate limits), with
    1 ms sandbox payment and payout processors so that thousands of calls stay quick."""
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"fuzz-{backend}"),
        overrides={"wallet": {"payment_latency_ms": 1}, "payout": {"processor_latency_ms": 1}},
    )
    yield suite
    await suite.stop()


# ---------------------------------------------------------------------------------------------------
# Every RPC, from the descriptors the servers register.


@dataclass(frozen=True)
class Rpc:
    service: str
    """The suite's name of the serving service ("wallet")."""
    method: MethodDescriptor
    domain: str
    """The ErrorInfo domain of the serving service."""
    owner_field: str | None
    """The request field naming the account acted on (from the access rule)."""
    admin: bool
    """The access rule requires the admin role."""
    moves_money: bool

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    def __repr__(self) -> str:
        return self.path


def every_rpc(suite: Suite) -> list[Rpc]:
    pool = descriptor_pool.Default()
    rpcs = []
    for name, running in suite.services.items():
        rules = {**running.spec.access, **AdminAuditApi.ACCESS}
        for service_name in (*running.spec.grpc_services, AdminAuditApi.FULL_NAME):
            for method in pool.FindServiceByName(service_name).methods:
                rule = rules.get(f"/{service_name}/{method.name}")
                owner = rule.owner_field if rule is not None else None
                admin, money = (rule.admin, rule.moves_money) if rule else (False, False)
                rpcs.append(Rpc(name, method, running.spec.error_domain, owner, admin, money))
    return rpcs


# ---------------------------------------------------------------------------------------------------
# Pools: values that exist in the suite, so that random requests reach the handlers.

ADMIN = "ops-fuzz"
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Pools:
    core_users: list[str]
    """A funded viewer and a creator with diamonds, drawn often: the issued page tokens name them."""
    viewers: list[str]
    """Funded: they can buy, gift and promote."""
    creators: list[str]
    users: list[str]
    """Everyone: viewers, creators, a GB viewer, a minor, ids without an account."""
    gift_ids: list[str]
    package_ids: list[str]
    live_ids: list[str]
    video_ids: list[str]
    sent_gift_ids: list[str]
    withdrawal_ids: list[str]
    promotion_ids: list[str]
    issued_tokens: dict[str, list[str]]
    """Request type -> next_page_tokens its listing really issued."""
    token_kinds: list[str]
    """The kinds today's listings put in their tokens (runtime.pagination): a token forged with the
    right kind gets past the kind check to the parsing of its sort key."""


@pytest.fixture(scope="module")
async def pools(fuzz_suite: Suite) -> Pools:
    """Built once per suite, before any fuzzing retires gifts or reprices packages."""
    return await build_pools(fuzz_suite)


async def build_pools(suite: Suite) -> Pools:
    """Funded viewers, a GB viewer, a minor, creators with diamonds, one record of every kind, and a
    second page of every listing."""
    viewers = [(await funded_user(suite, "us-web-17500"))[0] for _ in range(4)]
    gb_viewer, minor = new_id("gb"), new_id("minor")
    await open_account(suite, gb_viewer, "GB")
    await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=new_id(),
            user_id=minor,
            country_code="US",
            birth_date=date_pb2.Date(year=2015, month=6, day=1),
        )
    )
    makers = [await new_creator(suite) for _ in range(3)]
    for creator in makers[:2]:  # 50,000 diamonds each: withdrawals can succeed
        await suite.as_caller("gifting").payout.CreditDiamonds(
            payout_pb2.CreditDiamondsRequest(
                request_id=new_id(), creator_id=creator, coins=100_000, reference="fuzz-setup"
            )
        )
    live, video = live_of(makers[0]), "video-fuzz"
    sent = [
        await suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id(),
                sender_id=viewer,
                creator_id=makers[0],
                gift_id="rose",
                count=3,
                live_id=live,
            )
        )
        for viewer in viewers[:2]
    ]
    await verify_creator(suite, makers[0])
    paid_or_failed = [
        await suite.payout.RequestWithdrawal(
            payout_pb2.RequestWithdrawalRequest(
                request_id=new_id(),
                creator_id=makers[0],
                diamonds=2_000,
                method=payout_pb2.PAYOUT_METHOD_PAYPAL,
                destination_token=destination,
            )
        )
        for destination in ("dest_paypal_ok", "dest_fail_account_closed")
    ]
    promoted = [
        await suite.promotion.CreatePromotion(
            promotion_pb2.CreatePromotionRequest(
                request_id=new_id(),
                user_id=viewers[0],
                video_id=video,
                goal=promotion_pb2.GOAL_FOLLOWERS,
                budget_coins=budget,
                duration_days=3,
            )
        )
        for budget in (100, 100, 5_000)  # the last one has room for many deliveries
    ]
    admin = suite.token(ADMIN, admin=True)
    for _ in range(2):  # an admin reading another's balance is audited: two records each time
        await suite.wallet.GetBalance(
            wallet_pb2.GetBalanceRequest(user_id=viewers[0]), metadata=admin
        )
    catalog = await suite.gifting.ListGifts(gifting_pb2.ListGiftsRequest(page_size=1000))
    packages: list[str] = []
    for user in (viewers[0], gb_viewer):
        for channel in (wallet_pb2.CHANNEL_WEB, wallet_pb2.CHANNEL_IN_APP):
            listed = await suite.wallet.ListCoinPackages(
                wallet_pb2.ListCoinPackagesRequest(user_id=user, channel=channel, page_size=1000)
            )
            packages += [p.package_id for p in listed.packages]
    audit = admin_audit_pb2_grpc.AdminAuditServiceStub(suite.channel("wallet"))
    first_pages: list[tuple[Any, Message, Metadata | None]] = [
        (suite.gifting.ListGifts, gifting_pb2.ListGiftsRequest(page_size=1), None),
        (
            suite.gifting.ListTopGifters,
            gifting_pb2.ListTopGiftersRequest(live_id=live, page_size=1),
            None,
        ),
        (
            suite.wallet.ListLedgerEntries,
            wallet_pb2.ListLedgerEntriesRequest(user_id=viewers[0], page_size=1),
            None,
        ),
        (
            suite.wallet.ListCoinPackages,
            wallet_pb2.ListCoinPackagesRequest(
                user_id=viewers[0], channel=wallet_pb2.CHANNEL_WEB, page_size=1
            ),
            None,
        ),
        (
            suite.payout.ListWithdrawals,
            payout_pb2.ListWithdrawalsRequest(creator_id=makers[0], page_size=1),
            None,
        ),
        (
            suite.payout.ListDiamondEntries,
            payout_pb2.ListDiamondEntriesRequest(creator_id=makers[0], page_size=1),
            None,
        ),
        (
            suite.promotion.ListPromotions,
            promotion_pb2.ListPromotionsRequest(user_id=viewers[0], page_size=1),
            None,
        ),
        (audit.ListAdminActions, admin_audit_pb2.ListAdminActionsRequest(page_size=1), admin),
    ]
    tokens: dict[str, list[str]] = {}
    for listing, request, metadata in first_pages:
        page = await listing(request, metadata=metadata)
        assert page.next_page_token, f"{request.DESCRIPTOR.name}: no next_page_token"
        tokens[request.DESCRIPTOR.full_name] = [page.next_page_token]
    core = [viewers[0], makers[0]]
    kinds = ["gifts:", "audit:wallet", "audit:gifting", f"top:{live}"]
    for user in core:
        kinds += [f"ledger:{user}", f"packages:{user}:web", f"packages:{user}:in_app"]
        kinds += [f"withdrawals:{user}", f"promotions:{user}"]
    return Pools(
        core_users=core,
        viewers=viewers,
        creators=makers,
        users=[*viewers, gb_viewer, minor, *makers, "ghost-user", "a" * 64, "x"],
        gift_ids=[*(g.gift_id for g in catalog.gifts), "no-such-gift"],
        package_ids=[*packages, "gb-web-999", "us-web-1"],
        live_ids=[live, "live-2", "LIVE"],
        video_ids=[video, "video-2"],
        sent_gift_ids=[*(s.sent_gift.sent_gift_id for s in sent), "0" * 32],
        withdrawal_ids=[*(w.withdrawal.withdrawal_id for w in paid_or_failed), "0" * 32],
        promotion_ids=[*(p.promotion.promotion_id for p in promoted), "0" * 32],
        issued_tokens=tokens,
        token_kinds=kinds,
    )


# ---------------------------------------------------------------------------------------------------
# Strategies: a request message of any type, from its descriptor.

_INT_RANGE = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_EDGES = (
    *(0, 1, -1, 2, 99, 100, 101, 999, 1_000, 1_999, 2_000, 10_000, 10_001, 10**6, 10**6 + 1),
    *(10**7, 10**8, 10**9, 10**9 + 1, 10**11 + 1, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1),
    *(2**63 - 1, -(2**63), 2**64 - 1),
)
_PLAUSIBLE_INTS = {
    "count": (1, 5),
    "coins": (1, 3_000),
    "budget_coins": (100, 3_000),
    "diamonds": (2_000, 6_000),
    "duration_days": (1, 30),
    "page_size": (0, 4),
    "year": (1900, 2030),
    "month": (1, 12),
    "day": (1, 28),
    "amount_minor": (1, 50_000),
}
"""Values inside the validation rules of the fields the suite uses, so that handlers run."""

_HOSTILE = (
    *("' OR '1'='1", "'; DROP TABLE ledger_entries; --", '" OR 1=1 --', "%", "_", "\\", "%00"),
    *("NULL", "null", "None", "undefined", "../../etc/passwd", "${jndi:ldap://x/a}", "{{7*7}}"),
    *("%s%s%n", "<script>alert(1)</script>", " ", "\t\n\r", "\u202e\u200b\ufeff", "İ", "ß"),
    *("\U0001f381" * 3, "\uff55\uff53\uff45\uff52", "user\n", " user", "-1", "1e309", "NaN"),
    *("gift:", ":", "/", "a" * 64, "a" * 65, "A" * 129, "a" * 257, "a" * 501, "a" * 513),
    *("\x00", "a\x00b", "\x7f\x1b[2J"),
)
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."


def hostile_text() -> SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.sampled_from(_HOSTILE),
        st.text(max_size=40),  # any code point (no surrogates)
        st.text(st.characters(max_codepoint=0x9F), min_size=1, max_size=8),  # control characters
        st.builds("{}\x00{}".format, st.text(max_size=5), st.text(max_size=5)),  # NUL, inside
        st.builds(  # long: one character repeated, up to ~240 KB
            operator.mul,
            st.sampled_from(("a", "7", "é", "\U0001f381", "\x00", " ")),
            st.integers(60, 60_000),
        ),
    )


json_values: SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from((2**63, -(2**63) - 1, 10**30)),
        st.floats(),
        st.text(max_size=20),
    ),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=4,
)


def _token_parts(token: str) -> list[Any]:
    body = token.partition(".")[0]  # then its signature (runtime.pagination)
    parts = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert isinstance(parts, list)
    return parts


def _forge(token: str, position: int, value: Any) -> str:
    """An issued token with one element of its sort key replaced (signed as the services in this
    process sign theirs, so the service's checks of each key are what the fuzz reaches)."""
    kind, *key = _token_parts(token)
    key[position % len(key)] = value
    return encode_token(kind, *key)


def page_tokens(pools: Pools, request_type: str, *, hostile: bool) -> SearchStrategy[str]:
    """Plausible: the first page, or a token this listing issued. Hostile: tokens the service never
    issued that decode (forged from issued ones, or with a listing's kind), garbage, any text."""
    everyone = [token for tokens in pools.issued_tokens.values() for token in tokens]
    issued = pools.issued_tokens.get(request_type) or everyone
    if not hostile:
        return st.one_of(st.just(""), st.sampled_from(issued))
    forged = st.one_of(
        st.builds(_forge, st.sampled_from(issued), st.integers(0, 3), json_values),
        st.builds(
            lambda kind, key: encode_token(kind, *key),
            st.sampled_from(pools.token_kinds),
            st.lists(json_values, min_size=1, max_size=3),
        ),
    )
    garbage = st.one_of(
        st.binary(max_size=48).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
        st.lists(json_values, max_size=3).map(
            lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()
        ),
    )
    return st.one_of(forged, forged, garbage, hostile_text())


def named_strings(pools: Pools) -> dict[str, SearchStrategy[str]]:
    """Plausible values for the string fields the suite's requests use, by field name."""
    newcomers = st.integers(0, 29).map("newcomer-{}".format)  # no account until the fuzz opens one
    users = st.one_of(st.sampled_from(pools.core_users), st.sampled_from(pools.users), newcomers)
    fresh = st.uuids().map(lambda u: u.hex)
    return {
        "request_id": st.one_of(fresh, fresh, fresh, st.sampled_from(("r-1", "r-2", "gift:r-1"))),
        "user_id": users,
        "sender_id": st.one_of(st.sampled_from(pools.viewers), users),
        "creator_id": st.one_of(st.sampled_from(pools.creators), users),
        "gift_id": st.sampled_from(pools.gift_ids),
        "package_id": st.sampled_from(pools.package_ids),
        "live_id": st.sampled_from(pools.live_ids),
        "video_id": st.sampled_from(pools.video_ids),
        "sent_gift_id": st.sampled_from(pools.sent_gift_ids),
        "withdrawal_id": st.sampled_from(pools.withdrawal_ids),
        "promotion_id": st.sampled_from(pools.promotion_ids),
        "country_code": st.sampled_from(("US", "GB", "FR")),
        "region": st.sampled_from(("US", "GB", "FR")),
        "currency_code": st.sampled_from(("USD", "GBP", "EUR")),
        "payment_token": st.sampled_from(("tok_visa", "tok_decline_insufficient_funds")),
        "destination_token": st.sampled_from(("dest_paypal_ok", "dest_fail_account_closed")),
        "reference": st.one_of(fresh, st.just("ref-1")),
        "reason": st.sampled_from(("price review", "retire it", "new season")),
        "name": st.sampled_from(("Rose", "Fuzz Gift", "  ")),
    }


class RequestStrategies:
    """Messages of any descriptor. Each field has a plausible strategy (its name's pool, or values
    inside the rules the suite uses) and a hostile one (any value of its type). A message is
    plausible throughout (half: these reach the handlers), spoiled in one or two fields (a third:
    each field's validation, and the handlers' edge cases), or hostile throughout."""

    def __init__(self, pools: Pools) -> None:
        self._pools = pools
        self._named = named_strings(pools)
        self._cache: dict[str, SearchStrategy[Message]] = {}
        self._building: set[str] = set()

    def message(self, descriptor: Descriptor) -> SearchStrategy[Message]:
        if descriptor.full_name not in self._cache:
            self._building.add(descriptor.full_name)
            self._cache[descriptor.full_name] = self._build(descriptor)
            self._building.discard(descriptor.full_name)
        return self._cache[descriptor.full_name]

    def _build(self, descriptor: Descriptor) -> SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        names = [f.name for f in descriptor.fields]
        in_oneof = {f.name for oneof in descriptor.oneofs for f in oneof.fields}
        plain = [f for f in descriptor.fields if f.name not in in_oneof]
        oneofs = [list(oneof.fields) for oneof in descriptor.oneofs]
        plausible = {f.name: self._field(f, hostile=False) for f in descriptor.fields}
        hostile = {f.name: self._field(f, hostile=True) for f in descriptor.fields}

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            how = draw(st.sampled_from(("plausible",) * 3 + ("spoiled",) * 2 + ("hostile",)))
            spoiled: set[str] = set(names) if how == "hostile" else set()
            if how == "spoiled" and names:
                spoiled = draw(st.sets(st.sampled_from(names), min_size=1, max_size=2))
            chosen = []
            for fields in oneofs:  # one member set; a spoiled oneof may have none
                wild = any(f.name in spoiled for f in fields)
                member = st.one_of(st.none(), st.sampled_from(fields))
                chosen.append(draw(member if wild else st.sampled_from(fields)))
            message = cls()
            for f in plain + [c for c in chosen if c is not None]:
                _assign(message, f, draw((hostile if f.name in spoiled else plausible)[f.name]))
            return message

        return build()

    def _field(self, f: FieldDescriptor, *, hostile: bool) -> SearchStrategy[Any]:
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key = self._single(entry.fields_by_name["key"], hostile=hostile)
            value = self._single(entry.fields_by_name["value"], hostile=hostile)
            return st.dictionaries(key, value, max_size=3)
        if f.is_repeated:
            return st.lists(self._single(f, hostile=hostile), max_size=3)
        if entry is not None and hostile:
            return st.one_of(st.none(), self._single(f, hostile=hostile))  # or unset
        return self._single(f, hostile=hostile)

    def _single(self, f: FieldDescriptor, *, hostile: bool) -> SearchStrategy[Any]:
        if f.message_type is not None:
            if f.message_type.full_name in self._building:  # a recursive type: leave it unset
                return st.none()
            return self.message(f.message_type)
        cpp = f.cpp_type
        if cpp == FieldDescriptor.CPPTYPE_STRING and f.type == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64 if hostile else 16)
        if cpp == FieldDescriptor.CPPTYPE_STRING and f.name == "page_token":
            listing = f.containing_type.full_name if f.containing_type else ""
            return page_tokens(self._pools, listing, hostile=hostile)
        if cpp == FieldDescriptor.CPPTYPE_STRING:
            named = self._named.get(f.name)
            if hostile:
                return hostile_text()
            return st.text(alphabet=_ID_CHARS, min_size=1, max_size=16) if named is None else named
        if cpp == FieldDescriptor.CPPTYPE_BOOL:  # plausibly `active`: retiring is the hostile case
            return st.just(True) if f.name == "active" and not hostile else st.booleans()
        if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
            return st.floats(width=32) if hostile else st.floats(0, 100, width=32)
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            assert f.enum_type is not None
            defined = [v.number for v in f.enum_type.values]
            if hostile:  # unset, or any number: defined or not
                return st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1))
            return st.sampled_from([n for n in defined if n != 0] or defined)
        low, high = _INT_RANGE[cpp]
        if hostile:
            edges = [v for v in _EDGES if low <= v <= high]
            return st.one_of(st.sampled_from(edges), st.integers(low, high))
        return st.integers(*_PLAUSIBLE_INTS.get(f.name, (max(low, 0), 100)))


def _assign(message: Message, f: FieldDescriptor, value: Any) -> None:
    if value is None:
        return
    target = getattr(message, f.name)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif isinstance(value, list):
        for item in value:
            target.add().CopyFrom(item) if isinstance(item, Message) else target.append(item)
    elif isinstance(value, Message):
        target.CopyFrom(value)
    else:
        setattr(message, f.name, value)


# ---------------------------------------------------------------------------------------------------
# Calls, outcomes, and what every outcome must be.

TOKEN_MODES = ("fitting", "fitting", "fitting", "fitting", "fitting", "admin", "stranger", "none")
"""Whose token a call carries: the one a legitimate caller would (the named user's, an admin's for
an admin RPC), an admin's, another user's, or none."""
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Token subjects are user ids the identity provider issued: a request naming anything else gets
another user's token (validation refuses such a request before any owner check anyway)."""


class Call:
    """One call of a batch. A plain class, so that hypothesis prints it with `__repr__`, briefly."""

    def __init__(
        self, rpc: Rpc, payload: bytes, request: Message | None, token_mode: str, stranger: str
    ) -> None:
        self.rpc = rpc
        self.payload = payload
        self.request = request
        """The request the payload parses as (None: it does not parse)."""
        self.token_mode = token_mode
        self.stranger = stranger

    def with_request(self, request: Message) -> Call:
        return Call(self.rpc, request.SerializeToString(), request, self.token_mode, self.stranger)

    def token(self) -> tuple[str, bool] | None:
        """The call's token: for whom, and whether with the admin role."""
        if self.token_mode == "none":
            return None
        if self.token_mode == "fitting" and self.rpc.admin:
            return self.stranger, True
        named = ""
        if self.rpc.owner_field and self.request is not None:
            named = str(getattr(self.request, self.rpc.owner_field))
        if self.token_mode == "fitting" and USER_ID.fullmatch(named):
            return named, False
        return self.stranger, self.token_mode == "admin"

    def __repr__(self) -> str:
        if self.request is None:
            shown = f"bytes {self.payload[:200]!r}"
        else:
            shown = text_format.MessageToString(self.request, as_one_line=True)
            shown = shown if len(shown) < 600 else f"{shown[:600]}... ({len(shown)} chars)"
        return f"<{self.rpc.path} token={self.token()} {shown}>"


def _first_of_stream(multicallable: Any) -> Any:
    """A server-streaming RPC called like a unary one: its first message (a feed that has none yet
    answers b"" once the stream has been admitted and has waited a moment), then cancelled."""

    async def call(payload: bytes, **options: Any) -> bytes:  # metadata, timeout
        first = await first_message(multicallable(payload, **options))
        return b"" if first is None else bytes(first)

    return call


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    body: bytes | None
    error: grpc.aio.AioRpcError | None


def _parse(rpc: Rpc, payload: bytes) -> Message | None:
    try:
        return rpc.request_type.FromString(payload)
    except DecodeError:
        return None


def _has_nul(message: Message) -> bool:
    for f, value in message.ListFields():
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            items = [*value.keys(), *value.values()]
        else:
            items = value if f.is_repeated else [value]
        for item in items:
            if isinstance(item, str) and "\x00" in item:
                return True
            if isinstance(item, Message) and _has_nul(item):
                return True
    return False


@dataclass(frozen=True)
class Context:
    """What a known bug's matcher may look at, besides the call and its outcome."""

    backend: str
    batch: Sequence[Call]
    issued_tokens: frozenset[str]


@dataclass(frozen=True)
class KnownBug:
    name: str
    reproducer: str
    matches: Callable[[Call, Outcome, Context], bool]


KNOWN_BUGS: tuple[KnownBug, ...] = ()
"""Bugs the fuzz may meet but that are not fixed yet (each with its exact failure and a strict-xfail
reproducer at the end of this file). Empty: the four it found (forged page tokens, NUL reaching
PostgreSQL, the OpenAccount insert race, unparseable bytes answered UNKNOWN by grpcio) are fixed, and
their reproducers below now pass."""


@dataclass
class Fuzzer:
    suite: Suite
    loop: asyncio.AbstractEventLoop
    issued_tokens: frozenset[str]
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    tolerated: Counter[str] = field(default_factory=Counter)
    _multicallables: dict[tuple[str, str], Any] = field(default_factory=dict)
    _tokens: dict[tuple[str, bool], Metadata] = field(default_factory=dict)

    def open_channels(self, rpcs: Sequence[Rpc]) -> None:
        """On the loop: one channel per (service, caller), as the access rule admits."""
        channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        for rpc in rpcs:
            identity = self.suite.allowed_identity(rpc.service, rpc.path)
            if (rpc.service, identity) not in channels:
                channels[rpc.service, identity] = self.suite.channel(rpc.service, identity=identity)
            channel = channels[rpc.service, identity]
            self._multicallables[rpc.service, rpc.path] = (
                _first_of_stream(channel.unary_stream(rpc.path, _raw, _raw))
                if rpc.method.server_streaming
                else channel.unary_unary(
                    rpc.path, request_serializer=_raw, response_deserializer=_raw
                )
            )

    def _metadata(self, call: Call) -> Metadata:
        token = call.token()
        if token is None:
            return ()
        if token not in self._tokens:
            self._tokens[token] = self.suite.token(token[0], admin=token[1])
        return self._tokens[token]

    async def _send(self, call: Call, metadata: Metadata) -> Outcome:
        try:
            body = await self._multicallables[call.rpc.service, call.rpc.path](
                call.payload, metadata=metadata, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), None, error)
        return Outcome(grpc.StatusCode.OK, body, None)

    def run_batch(self, batch: Sequence[Call]) -> None:
        """From the hypothesis thread: send the batch concurrently on the loop, then check it."""
        metadata = [self._metadata(call) for call in batch]

        async def send_all() -> list[Outcome]:
            return list(await asyncio.gather(*map(self._send, batch, metadata)))

        outcomes = asyncio.run_coroutine_threadsafe(send_all(), self.loop).result()
        context = Context(self.suite.backend, batch, self.issued_tokens)
        for call, outcome in zip(batch, outcomes, strict=True):
            self.calls[f"{call.rpc.service}{call.rpc.path}", outcome.code.name] += 1
            self.check(call, outcome, context)

    def check(self, call: Call, outcome: Outcome, context: Context) -> None:
        if outcome.code == grpc.StatusCode.OK:
            assert outcome.body is not None
            call.rpc.response_type.FromString(outcome.body)  # a response that parses
            return
        for bug in KNOWN_BUGS:
            if bug.matches(call, outcome, context):
                self.tolerated[bug.reproducer] += 1
                return
        error = outcome.error
        assert error is not None
        said = f"{call!r} got {outcome.code.name}: {error.details()}"
        assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), said
        info = error_info(error)
        assert info is not None, f"no ErrorInfo: {said}"
        assert info.domain == call.rpc.domain and info.reason, f"{info}: {said}"

    def report(self, title: str) -> int:
        total = sum(self.calls.values())
        print(f"\n{title} on {self.suite.backend}: {total} calls")
        for path in sorted({p for p, _ in self.calls}):
            codes = {code: n for (p, code), n in self.calls.items() if p == path}
            shown = ", ".join(f"{c} {n}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1]))
            service, _, method = path.partition("/")
            name = f"{service}: {method.rsplit('.', 1)[-1]}"
            print(f"  {name:<48} {sum(codes.values()):>5}  {shown}")
        for name, count in self.tolerated.items():
            print(f"  known bug, tolerated {count}x: see {name}")
        return total


def _raw(data: bytes) -> bytes:
    return data


def _batches(calls: SearchStrategy[Call]) -> SearchStrategy[list[Call]]:
    """Calls sent together; some repeated, as is or with a new request id (a retry and a double
    click, racing the original)."""

    @st.composite
    def batch(draw: st.DrawFn) -> list[Call]:
        batch = draw(st.lists(calls, min_size=BATCH[0], max_size=BATCH[1]))
        for _ in range(draw(st.integers(0, 2))):
            original = draw(st.sampled_from(batch))
            request = original.request
            named = request is not None and "request_id" in request.DESCRIPTOR.fields_by_name
            if request is not None and named and draw(st.booleans()):  # a new request id
                again = type(request)()
                again.CopyFrom(request)
                setattr(again, "request_id", draw(st.uuids()).hex)  # noqa: B010
                original = original.with_request(again)
            batch.append(original)
        return batch

    return batch()


def _call_strategy(
    rpcs: Sequence[Rpc], requests: RequestStrategies, pools: Pools
) -> SearchStrategy[Call]:
    weighted = [*rpcs, *(rpc for rpc in rpcs if rpc.moves_money)]  # the money moves, twice as often

    @st.composite
    def structured(draw: st.DrawFn) -> Call:
        rpc = draw(st.sampled_from(weighted))
        request = draw(requests.message(rpc.method.input_type))
        payload = request.SerializeToString()
        assume(len(payload) <= MAX_REQUEST_BYTES)
        mode = draw(st.sampled_from(TOKEN_MODES))
        return Call(rpc, payload, request, mode, draw(st.sampled_from(pools.users)))

    return structured()


def _malformed_strategy(
    rpcs: Sequence[Rpc], requests: RequestStrategies, pools: Pools
) -> SearchStrategy[Call]:
    @st.composite
    def malformed(draw: st.DrawFn) -> Call:
        rpc = draw(st.sampled_from(rpcs))
        donor = draw(st.just(rpc) | st.sampled_from(rpcs))  # or another's: wire types clash
        valid = draw(requests.message(donor.method.input_type)).SerializeToString()
        assume(len(valid) <= MAX_REQUEST_BYTES)
        how = draw(st.sampled_from(("random", "truncated", "corrupted", "appended")))
        if how == "random":
            payload = draw(st.binary(max_size=300))
        elif how == "truncated":
            payload = valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
        elif how == "corrupted":
            data = bytearray(valid or b"\x00")
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            payload = bytes(data)
        else:
            payload = valid + draw(st.binary(min_size=1, max_size=40))
        mode = draw(st.sampled_from(TOKEN_MODES))
        return Call(rpc, payload, _parse(rpc, payload), mode, draw(st.sampled_from(pools.users)))

    return malformed()


FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same requests on every run
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,  # each example makes real calls
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


async def _fuzz(
    suite: Suite,
    pools: Pools,
    examples: int,
    calls_of: Callable[[Sequence[Rpc], RequestStrategies, Pools], Any],
) -> Fuzzer:
    rpcs = every_rpc(suite)
    issued = frozenset(token for tokens in pools.issued_tokens.values() for token in tokens)
    fuzzer = Fuzzer(suite, asyncio.get_running_loop(), issued)
    fuzzer.open_channels(rpcs)
    batches = _batches(calls_of(rpcs, RequestStrategies(pools), pools))

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(batch=batches)
    def fuzz(batch: list[Call]) -> None:
        fuzzer.run_batch(batch)

    def every_rpc_once() -> None:  # hypothesis draws some RPCs rarely: each is called at least once
        for rpc in rpcs:
            empty = rpc.request_type()
            fuzzer.run_batch([Call(rpc, b"", empty, "fitting", pools.users[0])])

    await asyncio.to_thread(every_rpc_once)
    await asyncio.to_thread(fuzz)
    return fuzzer


async def test_random_requests_to_every_rpc_fail_cleanly_and_keep_the_books(
    fuzz_suite: Suite, pools: Pools
) -> None:
    started = time.monotonic()
    fuzzer = await _fuzz(fuzz_suite, pools, STRUCTURED_EXAMPLES, _call_strategy)
    total = fuzzer.report("structured fuzz")
    print(f"  {time.monotonic() - started:.1f}s")
    assert total >= MIN_STRUCTURED_CALLS
    called = {path for path, _ in fuzzer.calls}
    assert called == {f"{r.service}{r.path}" for r in every_rpc(fuzz_suite)}, "an RPC not called"
    answered = sum(n for (_, code), n in fuzzer.calls.items() if code == "OK")
    assert answered >= total // 10, f"only {answered} of {total} calls got past validation"
    await assert_books_and_records_agree(fuzz_suite)


async def test_malformed_bytes_to_every_rpc_fail_cleanly_and_keep_the_books(
    fuzz_suite: Suite, pools: Pools
) -> None:
    started = time.monotonic()
    fuzzer = await _fuzz(fuzz_suite, pools, MALFORMED_EXAMPLES, _malformed_strategy)
    fuzzer.report("malformed bytes")
    print(f"  {time.monotonic() - started:.1f}s")
    await assert_books_and_records_agree(fuzz_suite)


# ---------------------------------------------------------------------------------------------------
# The books and the records, read straight from the four databases.


@dataclass(frozen=True)
class Tx:
    transaction_id: str
    kind: str
    reference: str
    request_id: str
    legs: dict[str, int]


@dataclass(frozen=True)
class Books:
    transactions: list[Tx]
    by_request: dict[str, Tx]
    """Ledger request id (`<scope>/<request id>` of the RPC that posted it) -> transaction."""
    balances: dict[str, int]
    """Kept balance of every balance-keeping account."""


async def _rows(db: Database, query: Any) -> list[Any]:
    async with db.read() as conn:
        return list((await conn.execute(query)).all())


async def _books(db: Database) -> Books:
    t, e = ledger_transactions, ledger_entries
    legs = await _rows(
        db,
        sa.select(t.c.transaction_id, t.c.kind, t.c.reference, t.c.request_id)
        .add_columns(e.c.account_id, e.c.amount)
        .select_from(t.outerjoin(e, e.c.transaction_id == t.c.transaction_id)),
    )
    found: dict[str, Tx] = {}
    for row in legs:
        tx = found.setdefault(
            row.transaction_id, Tx(row.transaction_id, row.kind, row.reference, row.request_id, {})
        )
        if row.account_id is not None:
            tx.legs[row.account_id] = tx.legs.get(row.account_id, 0) + int(row.amount)
    kept = await _rows(
        db,
        sa.select(ledger_accounts.c.account_id, ledger_accounts.c.balance).where(
            ledger_accounts.c.keeps_balance
        ),
    )
    return Books(
        list(found.values()),
        {tx.request_id: tx for tx in found.values()},
        {row.account_id: int(row.balance) for row in kept},
    )


def _unscoped(key: Any) -> SimpleNamespace:
    """A key row with its scope as the service wrote it: stored scopes start with the calling
    service (`gateway|PurchaseCoins:<user>`), which the checks below do not need."""
    caller, bar, scope = key.scope.partition("|")
    return SimpleNamespace(**{**key._asdict(), "scope": scope if bar else caller})


def _answer(key: Any) -> str:
    """How a request id ended: "ok" (a stored response), "refused" (a stored error), or "open"."""
    if key.response is not None:
        return "ok"
    return "refused" if key.error is not None else "open"


@dataclass(frozen=True)
class Snapshot:
    """What the invariants read, once the background workers are idle."""

    wallet: Books
    payout: Books
    keys: dict[str, list[Any]]
    """Idempotency key rows, by service."""
    accounts: set[str]
    purchases: dict[str, Any]
    gifts: dict[str, Any]
    outbox: dict[str, Any]
    leaderboards: Counter[tuple[str, str]]
    creators: list[Any]
    withdrawals: list[Any]
    promotions: dict[str, Any]
    deliveries: list[Any]
    """Promotion deliveries counted (promotion_deliveries rows)."""
    holds: dict[str, Any]
    """The wallet's holds, by id."""

    answers: dict[tuple[str, str, str], str]
    """(service, scope, request id) -> how the request ended (see `_answer`)."""

    def answer(self, service: str, scope: str, request_id: str) -> str | None:
        return self.answers.get((service, scope, request_id))


async def wait_until_idle(suite: Suite, seconds: float = 20.0) -> None:
    """Until every queued diamond credit is delivered and every withdrawal is settled."""

    async def undelivered() -> list[Any]:
        return await _rows(
            suite.services["gifting"].runtime.db,
            sa.select(credit_outbox.c.sent_gift_id, credit_outbox.c.last_error).where(
                credit_outbox.c.delivered_at.is_(None), credit_outbox.c.dead.is_(False)
            ),
        )

    async def unsettled() -> list[Any]:
        processor = suite.services["payout"].runtime.parts["processor"]
        assert isinstance(processor, PayPalSandbox)
        rows = await _rows(
            suite.services["payout"].runtime.db,
            sa.select(withdrawals.c.withdrawal_id).where(
                withdrawals.c.status.in_(("approved", "processing")),
                withdrawals.c.parked_at.is_(None),
            ),
        )
        return rows + ["(sandbox callbacks)"] * processor.busy

    async def idle() -> bool:
        return not await undelivered() and not await unsettled()

    try:
        await eventually(idle, "the outbox and the withdrawal worker idle", seconds=seconds)
    except AssertionError:
        waiting, open_ = await undelivered(), await unsettled()
        raise AssertionError(
            f"not idle after {seconds}s: {len(waiting)} credits undelivered ({waiting[:3]}), "
            f"{len(open_)} withdrawals unsettled"
        ) from None


async def snapshot(suite: Suite) -> Snapshot:
    db = {name: running.runtime.db for name, running in suite.services.items()}
    boards = await _rows(db["gifting"], sa.select(live_gifters))
    keys = {
        name: [_unscoped(row) for row in await _rows(db[name], sa.select(idempotency_keys))]
        for name in db
    }
    return Snapshot(
        wallet=await _books(db["wallet"]),
        payout=await _books(db["payout"]),
        keys=keys,
        accounts={r.user_id for r in await _rows(db["wallet"], sa.select(wallet_accounts))},
        purchases={r.purchase_id: r for r in await _rows(db["wallet"], sa.select(purchases))},
        gifts={r.sent_gift_id: r for r in await _rows(db["gifting"], sa.select(sent_gifts))},
        outbox={r.sent_gift_id: r for r in await _rows(db["gifting"], sa.select(credit_outbox))},
        leaderboards=Counter({(r.live_id, r.sender_id): int(r.coins) for r in boards}),
        creators=await _rows(db["payout"], sa.select(creators)),
        withdrawals=await _rows(db["payout"], sa.select(withdrawals)),
        promotions={r.promotion_id: r for r in await _rows(db["promotion"], sa.select(promotions))},
        deliveries=await _rows(db["promotion"], sa.select(promotion_deliveries)),
        holds={r.hold_id: r for r in await _rows(db["wallet"], sa.select(ledger_holds))},
        answers={(s, k.scope, k.request_id): _answer(k) for s in keys for k in keys[s]}
        | {
            ("payout", scope.partition("|")[2], request_id): "ok"
            for scope, _, request_id in (
                row.credit_key.rpartition("/")
                for row in await _rows(db["payout"], sa.select(gift_credits.c.credit_key))
            )
        },
    )


async def assert_books_and_records_agree(suite: Suite) -> None:
    """The invariants a fuzz run must leave intact, once the background workers are idle.

    Ledgers (wallet: coins, payout: diamonds): `Ledger.audit` passes (kept balances equal the sums of
    their entries, all entries sum to zero, every transaction digest and hash chain verifies), and no
    balance-keeping account is negative.

    No partial writes: every effect has its record and every record its effect, across the services
    (one function per service below says exactly what).
    """
    await wait_until_idle(suite)
    problems: list[str] = []
    for service, unit in (("wallet", "coins"), ("payout", "diamonds")):
        async with suite.services[service].runtime.db.read() as conn:
            audit = await Ledger(SystemClock(), unit=unit).audit(conn)
        if not audit.ok or audit.accounts_checked == 0:
            problems.append(f"{service}: ledger audit {audit}")
    state = await snapshot(suite)
    for service, books in (("wallet", state.wallet), ("payout", state.payout)):
        problems += [
            f"{service}: {a} is negative ({b})" for a, b in books.balances.items() if b < 0
        ]
    problems += request_id_problems(state)
    problems += wallet_problems(state)
    problems += gifting_problems(state)
    problems += payout_problems(state, suite.services["payout"].runtime.settings)
    problems += promotion_problems(state)
    assert not problems, f"{len(problems)} broken invariants:\n" + "\n".join(problems[:30])


def request_id_problems(state: Snapshot) -> list[str]:
    """Every request id has a stored answer, or the record of its operation still open. A refused
    request moved nothing: no ledger transaction carries its ledger request id (`<scope>/<id>`).
    Every coin debit in the wallet has its DebitCoins answer."""
    problems = []
    books = {"wallet": state.wallet, "payout": state.payout}
    for service, keys in state.keys.items():
        for key in keys:
            named = f"{service}: {key.scope}/{key.request_id}"
            if _answer(key) == "open" and key.resource_id is None:
                problems.append(f"{named} has neither an answer nor a record")
            moved = (
                service in books and f"{key.scope}/{key.request_id}" in books[service].by_request
            )
            if _answer(key) == "refused" and moved:
                problems.append(f"{named} was refused, yet moved value")
    for tx in state.wallet.transactions:
        scope, _, request_id = tx.request_id.partition("/")
        if scope.startswith("CaptureHold:"):
            continue  # a hold's capture: see promotion_problems
        if tx.kind in ("gift", "promotion") and state.answer("wallet", scope, request_id) != "ok":
            problems.append(f"wallet: debit {tx.transaction_id} has no DebitCoins answer")
    return problems


def wallet_problems(state: Snapshot) -> list[str]:
    """Every account has its ledger account and back. A purchase is completed exactly when one ledger
    transaction credited its coins to the buyer; each PurchaseCoins answer matches its purchase;
    each OpenAccount answer has its account."""
    problems = []
    ledger_users = {a.removeprefix("user:") for a in state.wallet.balances if a.startswith("user:")}
    if state.accounts != ledger_users:
        problems.append(
            f"wallet: accounts and ledger accounts differ: {state.accounts ^ ledger_users}"
        )
    credits: dict[str, list[Tx]] = {}
    for tx in state.wallet.transactions:
        if tx.kind == "purchase":
            credits.setdefault(tx.reference, []).append(tx)
    problems += [
        f"wallet: coins credited for no purchase {r}"
        for r in credits.keys() - state.purchases.keys()
    ]
    for p in state.purchases.values():
        found = credits.get(p.purchase_id, [])
        if (p.status == "completed") != (len(found) == 1):
            problems.append(f"wallet: purchase {p.purchase_id} {p.status}, credited {len(found)}x")
        elif found and found[0].legs.get(f"user:{p.user_id}") != p.coins:
            problems.append(
                f"wallet: purchase {p.purchase_id} of {p.coins} credited {found[0].legs}"
            )
    status_of = {"ok": "completed", "refused": "failed", "open": "pending"}
    for key in state.keys["wallet"]:
        if key.scope.startswith("PurchaseCoins:") and key.resource_id is not None:
            status = state.purchases[key.resource_id].status
            if status != status_of[_answer(key)]:
                problems.append(f"wallet: {key.scope}/{key.request_id} {_answer(key)}, {status}")
        user = key.scope.removeprefix("OpenAccount:")
        if key.scope.startswith("OpenAccount:") and key.response and user not in state.accounts:
            problems.append(f"wallet: {key.scope}/{key.request_id} answered, no account")
    return problems


def gifting_problems(state: Snapshot) -> list[str]:
    """A debited or credited gift has the wallet transaction it names (the sender's coins, under the
    gift's derived request id) and exactly one outbox credit for its creator; a pending or failed gift
    queued no credit, and a failed one took no coins. Every credit was delivered (none parked dead)
    and acknowledged by payout. Each LIVE leaderboard row is the sum of its debited gifts. Each
    SendGift answer matches its gift."""
    problems = []
    boards: Counter[tuple[str, str]] = Counter()
    for g in state.gifts.values():
        debit = state.wallet.by_request.get(f"DebitCoins:{g.sender_id}/gift:{g.sent_gift_id}")
        box = state.outbox.get(g.sent_gift_id)
        named = f"gifting: {g.status} gift {g.sent_gift_id}"
        if g.status not in ("debited", "credited"):
            if box is not None:
                problems.append(f"{named} queued a credit")
            if g.status == "failed" and debit is not None:
                problems.append(f"{named} took coins: {debit}")
            continue
        if g.live_id:
            boards[g.live_id, g.sender_id] += g.coins
        if debit is None or debit.transaction_id != g.wallet_transaction_id:
            problems.append(f"{named} has no wallet debit")
        elif debit.legs.get(f"user:{g.sender_id}") != -g.coins:
            problems.append(f"{named} of {g.coins} coins debited {debit.legs}")
        if box is None or (box.creator_id, box.coins) != (g.creator_id, g.coins):
            problems.append(f"{named}: outbox {box}")
        credited = state.answer(
            "payout", f"CreditDiamonds:{g.creator_id}", f"gift:{g.sent_gift_id}"
        )
        delivered = g.status == "credited" or (box is not None and box.delivered_at is not None)
        if delivered != (credited == "ok"):
            problems.append(f"{named}: payout's answer to its credit is {credited}")
    for box in state.outbox.values():
        if box.dead or box.delivered_at is None or box.sent_gift_id not in state.gifts:
            problems.append(f"gifting: credit {box.sent_gift_id} undelivered: {box.last_error}")
    if state.leaderboards != boards:
        wrong = (state.leaderboards - boards) + (boards - state.leaderboards)
        problems.append(f"gifting: leaderboard rows differ from the gifts: {wrong}")
    states = {"ok": ("debited", "credited"), "refused": ("failed",), "open": ("pending",)}
    for key in state.keys["gifting"]:
        if key.scope.startswith("SendGift:") and key.resource_id is not None:
            status = state.gifts[key.resource_id].status
            if status not in states[_answer(key)]:
                problems.append(f"gifting: {key.scope}/{key.request_id} {_answer(key)}, {status}")
    return problems


def payout_problems(state: Snapshot, settings: Any) -> list[str]:
    """Each creator's credited diamonds are floor(coins received x rate) and equal the diamonds the
    ledger issued to them; their balance is those less their paid withdrawals (a withdrawal holds its
    diamonds on the balance until it is paid). A paid withdrawal moved its diamonds out once; one
    returned after it was paid moved them back once; every other ending moved nothing (its hold was
    released). Each RequestWithdrawal answer names a withdrawal that exists."""
    problems = []
    for c in state.creators:
        account = f"creator:{c.creator_id}"
        issued = sum(t.legs.get(account, 0) for t in state.payout.transactions if t.kind == "gift")
        held = sum(
            w.diamonds
            for w in state.withdrawals
            if w.creator_id == c.creator_id and w.status == "paid"
        )
        balance = state.payout.balances.get(account, 0)
        if c.diamonds_credited != policy.diamonds_owed(c.coins_received, settings):
            problems.append(
                f"payout: {c.creator_id} got {c.diamonds_credited} for {c.coins_received}"
            )
        if issued != c.diamonds_credited or balance != c.diamonds_credited - held:
            problems.append(
                f"payout: {c.creator_id} credited {c.diamonds_credited}, issued {issued}, "
                f"withdrawing or withdrawn {held}, balance {balance}"
            )
    moves = Counter((t.reference, t.kind) for t in state.payout.transactions)
    for w in state.withdrawals:
        found = {kind: n for (ref, kind), n in moves.items() if ref == w.withdrawal_id}
        allowed: list[dict[str, int]] = [{}]
        if w.status == "paid":
            allowed = [{"withdrawal": 1}]
        elif w.status == "returned":
            allowed = [{}, {"withdrawal": 1, "withdrawal_returned": 1}]
        if found not in allowed:
            problems.append(f"payout: {w.status} withdrawal {w.withdrawal_id} moved {found}")
    known = {w.withdrawal_id for w in state.withdrawals}
    for key in state.keys["payout"]:
        if key.scope.startswith("RequestWithdrawal:") and key.response is not None:
            answered = payout_pb2.RequestWithdrawalResponse.FromString(key.response)
            if answered.withdrawal.withdrawal_id not in known:
                problems.append(f"payout: {key.scope}/{key.request_id} answered, no withdrawal")
    return problems


def promotion_problems(state: Snapshot) -> list[str]:
    """A promotion's budget is held while it is active, captured as delivered, and the rest released
    when it ends:
    - an active or completed promotion has the wallet hold it names: placed by promotion for its
      payer, of its budget, with its id as reference; active while the promotion is, captured in
      full once its budget is spent, released (or expired) when it ended with coins left;
    - what the hold captured is what the promotion spent and the sum of its counted deliveries;
      every capture is one counted delivery and every counted delivery one capture (the wallet
      transaction it names: the payer's coins, as a promotion);
    - a rejected or pending promotion holds nothing; no promotion has more than one hold;
    - promotions paid up front (funding `debit`, from before budgets were held) have the debit of
      their budget they name; a rejected one took nothing.
    Each CreatePromotion, ReportDelivery and EndPromotion answer matches the records."""
    problems = []
    counted: dict[str, list[Any]] = {}
    for d in state.deliveries:
        counted.setdefault(d.promotion_id, []).append(d)
    held: dict[str, list[Any]] = {}
    for h in state.holds.values():
        if h.owner == "promotion" and h.reference in state.promotions:
            held.setdefault(h.reference, []).append(h)
    captures: dict[str, list[Tx]] = {}
    for tx in state.wallet.transactions:
        if tx.request_id.startswith("CaptureHold:") and tx.reference in state.promotions:
            captures.setdefault(tx.reference, []).append(tx)
    for p in state.promotions.values():
        named = f"promotion: {p.status} promotion {p.promotion_id}"
        deliveries = counted.get(p.promotion_id, [])
        if p.spent_coins != sum(d.coins for d in deliveries):
            problems.append(f"{named} spent {p.spent_coins}, deliveries {deliveries}")
        if p.funding == "debit":
            problems += _debit_funding_problems(state, p, named)
            continue
        holds = held.get(p.promotion_id, [])
        if p.status in ("pending", "rejected"):
            if holds or p.hold_id is not None:
                problems.append(f"{named} holds coins: {holds}")
            continue
        hold = state.holds.get(p.hold_id) if p.hold_id else None
        if hold is None or [h.hold_id for h in holds] != [hold.hold_id]:
            problems.append(f"{named} has not exactly its hold {p.hold_id}: {holds}")
            continue
        if (hold.account_id, hold.amount, hold.kind) != (
            f"user:{p.user_id}",
            p.budget_coins,
            "promotion",
        ):
            problems.append(f"{named} of {p.budget_coins} coins by {p.user_id} has hold {hold}")
        spent_out = p.spent_coins == p.budget_coins
        expected = {
            "active": {"active"},
            "completed": {"captured"} if spent_out else {"released", "expired"},
        }[p.status]
        if hold.status not in expected or hold.captured != p.spent_coins:
            problems.append(f"{named} spent {p.spent_coins}: hold {hold.status} {hold.captured}")
        found = {tx.transaction_id: tx for tx in captures.get(p.promotion_id, [])}
        if set(found) != {d.wallet_transaction_id for d in deliveries}:
            problems.append(f"{named}: captures {sorted(found)} but deliveries {deliveries}")
        for d in deliveries:
            capture = found.get(d.wallet_transaction_id)
            if capture is not None and capture.legs.get(f"user:{p.user_id}") != -d.coins:
                moved = capture.legs
                problems.append(f"{named}: delivery {d.request_id} of {d.coins} moved {moved}")
    statuses = {"ok": ("active", "completed"), "refused": ("rejected",), "open": ("pending",)}
    recorded = {(d.promotion_id, d.request_id) for d in state.deliveries}
    for key in state.keys["promotion"]:
        action = key.scope.partition(":")[0]
        promotion_id = key.resource_id or ""  # the promotion a delivery or an end claimed for
        answer = _answer(key)
        if action == "CreatePromotion" and key.resource_id is not None:
            status = state.promotions[key.resource_id].status
            if status not in statuses[answer]:
                problems.append(f"promotion: {key.scope}/{key.request_id} {answer}, {status}")
        is_counted = (promotion_id, key.request_id) in recorded
        if action == "ReportDelivery" and answer != "open" and (answer == "ok") != is_counted:
            problems.append(
                f"promotion: {key.scope}/{key.request_id} {answer}, counted {is_counted}"
            )
        if action == "EndPromotion" and answer == "ok":
            ended = state.promotions.get(promotion_id)
            if ended is None or ended.status != "completed":
                problems.append(f"promotion: {key.scope}/{key.request_id} ended {ended}")
    return problems


def _debit_funding_problems(state: Snapshot, p: Any, named: str) -> list[str]:
    """A promotion paid up front: active or completed, it has the debit of its budget it names."""
    debit = state.wallet.by_request.get(f"DebitCoins:{p.user_id}/promotion:{p.promotion_id}")
    if p.status in ("active", "completed") and (
        debit is None
        or debit.transaction_id != p.wallet_transaction_id
        or debit.legs.get(f"user:{p.user_id}") != -p.budget_coins
    ):
        return [f"{named} has no debit of its budget: {debit}"]
    if p.status == "rejected" and debit is not None:
        return [f"{named} took coins: {debit}"]
    return []


# ---------------------------------------------------------------------------------------------------
# Minimal reproducers of the bugs the fuzz found, now fixed: regression tests.


async def test_a_forged_page_token_is_refused_as_invalid(fuzz_suite: Suite) -> None:
    # A token signed as the service signs its own, of the right kind, with a non-integer key.
    error = await rpc_error(
        fuzz_suite.gifting.ListGifts(
            gifting_pb2.ListGiftsRequest(page_token=encode_token("gifts:", "x", "y"))
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


async def test_a_nul_character_in_a_string_field_is_refused_as_invalid(fuzz_suite: Suite) -> None:
    error = await rpc_error(
        fuzz_suite.gifting.GetGift(gifting_pb2.GetGiftRequest(sent_gift_id="\x00"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


async def test_concurrent_opens_of_one_account_do_not_fail_internally(fuzz_suite: Suite) -> None:
    for _ in range(5):
        user = new_id()
        opens = [
            fuzz_suite.wallet.OpenAccount(
                wallet_pb2.OpenAccountRequest(
                    request_id=new_id(),
                    user_id=user,
                    country_code="US",
                    birth_date=adult_birth_date(),
                )
            )
            for _ in range(2)
        ]
        results = await asyncio.gather(*opens, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, failed  # the same details twice: both are the same no-op open


async def test_unparseable_bytes_are_refused_as_invalid_with_error_info(fuzz_suite: Suite) -> None:
    path = "/coins.wallet.v1.WalletService/GetBalance"
    call = fuzz_suite.channel("wallet").unary_unary(
        path, request_serializer=_raw, response_deserializer=_raw
    )
    error = await rpc_error(call(b"\xff", metadata=fuzz_suite.token("someone")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info = error_info(error)
    assert info is not None and info.reason == "MALFORMED_REQUEST"
