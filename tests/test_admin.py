"""Admin RPCs change the catalog and the price lists, and every admin call lands in the audit trail.

These tests change what every user sees, so they run on a suite of their own (`private_suite`).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import DBAPIError

from coins.common.v1 import admin_audit_pb2, admin_audit_pb2_grpc
from coins.common.v1.money_pb2 import Money
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.audit import admin_audit
from runtime.db import Database
from runtime.status import error_info
from tests.helpers import (
    eventually,
    expect_error,
    field_violations,
    funded_user,
    live_of,
    new_creator,
    new_id,
    open_account,
)
from tests.suite import Suite

ADMIN = "ops-alice"


def set_package(
    coins: int, minor: int, *, active: bool = True, **changes: object
) -> wallet_pb2.SetCoinPackageRequest:
    request = wallet_pb2.SetCoinPackageRequest(
        request_id=new_id("price"),
        package_id="gb-web-1000",
        region="GB",
        channel=wallet_pb2.CHANNEL_WEB,
        coins=coins,
        price=Money(currency_code="GBP", amount_minor=minor),
        active=active,
        reason="launch GB web prices",
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


async def audit_trail(suite: Suite, service: str) -> list[admin_audit_pb2.AdminAction]:
    stub = admin_audit_pb2_grpc.AdminAuditServiceStub(suite.channel(service))
    response = await stub.ListAdminActions(
        admin_audit_pb2.ListAdminActionsRequest(page_size=500),
        metadata=suite.token(ADMIN, admin=True),
    )
    return list(response.actions)


async def test_an_admin_prices_a_package_and_buyers_see_it(private_suite: Suite) -> None:
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    request = set_package(1000, 1299)
    created = await suite.wallet.SetCoinPackage(request, metadata=admin)
    assert created.package.price == Money(currency_code="GBP", amount_minor=1299)
    assert created.active
    assert await suite.wallet.SetCoinPackage(request, metadata=admin) == created  # a retry

    buyer = new_id()
    await open_account(suite, buyer, country="GB")
    listed = await suite.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(user_id=buyer, channel=wallet_pb2.CHANNEL_WEB)
    )
    assert [(p.package_id, p.coins, p.price.amount_minor) for p in listed.packages] == [
        ("gb-web-1000", 1000, 1299)
    ]
    bought = await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id(), user_id=buyer, package_id="gb-web-1000", payment_token="tok_visa"
        )
    )
    assert bought.purchase.package.price.amount_minor == 1299  # the price snapshot

    # A new price applies to new purchases only; taking the package off sale hides it.
    await suite.wallet.SetCoinPackage(set_package(1000, 1499, active=False), metadata=admin)
    listed = await suite.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(user_id=buyer, channel=wallet_pb2.CHANNEL_WEB)
    )
    assert list(listed.packages) == []
    off_sale = await expect_error(
        suite.wallet.PurchaseCoins(
            wallet_pb2.PurchaseCoinsRequest(
                request_id=new_id(),
                user_id=buyer,
                package_id="gb-web-1000",
                payment_token="tok_visa",
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_NOT_AVAILABLE",
    )
    assert "package gb-web-1000 is off sale" in (off_sale.details() or "")
    ledger = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=buyer)
    )
    assert [e.amount for e in ledger.entries] == [1000]


async def test_prices_must_be_in_a_sold_region_and_its_currency(private_suite: Suite) -> None:
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    await expect_error(
        suite.wallet.SetCoinPackage(set_package(10, 99, region="FR"), metadata=admin),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REGION_UNSUPPORTED",
    )
    for currency in ("USD", "XYZ"):  # another region's, or none at all: the field is named
        wrong = set_package(10, 99)
        wrong.price.currency_code = currency
        mismatch = await expect_error(
            suite.wallet.SetCoinPackage(wrong, metadata=admin),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CURRENCY_MISMATCH",
        )
        assert field_violations(mismatch) == {"price.currency_code"}
    for price in (100_000_001, 100_000_000_000):  # above 1,000,000.00: a typo, never on sale
        too_dear = set_package(10, price, package_id=new_id("gb-web").lower())
        error = await expect_error(
            suite.wallet.SetCoinPackage(too_dear, metadata=admin),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PRICE_TOO_HIGH",
        )
        assert field_violations(error) == {"price.amount_minor"}
    no_reason = set_package(10, 99, reason="")
    await expect_error(
        suite.wallet.SetCoinPackage(no_reason, metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
    # An existing package keeps what it is (its id says it): its price may change, not its region,
    # channel or coins (a GB user was shown "us-web-999" once it could be moved).
    package = new_id("gb-web").lower()
    await suite.wallet.SetCoinPackage(set_package(4_242, 999, package_id=package), metadata=admin)
    moved = set_package(4_242, 999, package_id=package, region="US")
    moved.price.currency_code = "USD"
    for changed in (moved, set_package(10, 999, package_id=package)):
        await expect_error(
            suite.wallet.SetCoinPackage(changed, metadata=admin),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PACKAGE_IS_FIXED",
        )
    repriced = await suite.wallet.SetCoinPackage(
        set_package(4_242, 1_099, package_id=package), metadata=admin
    )
    assert repriced.package.price.amount_minor == 1_099


async def test_an_admin_changes_the_gift_catalog(private_suite: Suite) -> None:
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    gift = gifting_pb2.SetGiftRequest(
        request_id=new_id(),
        gift_id="snowman",
        name="Snowman",
        coins=30,
        active=True,
        reason="winter campaign",
        streakable=True,  # the admin's to say (not derived from the price)
    )
    created = await suite.gifting.SetGift(gift, metadata=admin)
    assert created.gift == gifting_pb2.Gift(
        gift_id="snowman", name="Snowman", coins=30, streakable=True, version=1, animation_ms=1000
    )
    catalog = await suite.gifting.ListGifts(gifting_pb2.ListGiftsRequest(page_size=100))
    assert "snowman" in {g.gift_id for g in catalog.gifts}

    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    sent = await suite.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            request_id=new_id(),
            sender_id=sender,
            creator_id=creator,
            gift_id="snowman",
            count=2,
            live_id=live_of(creator),
        )
    )
    assert sent.sent_gift.coins == 60

    retire = gifting_pb2.SetGiftRequest(
        request_id=new_id(),
        gift_id="snowman",
        name="Snowman",
        coins=30,
        active=False,
        reason="campaign over",
    )
    await suite.gifting.SetGift(retire, metadata=admin)
    refused = await expect_error(
        suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id(),
                sender_id=sender,
                creator_id=creator,
                gift_id="snowman",
                count=1,
                live_id=live_of(creator),
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GIFT_RETIRED",
    )
    assert refused.details() == (
        "gift 'snowman' is retired: no longer on sale (ListGifts shows what is)"
    )


async def test_a_gift_offered_in_a_country_that_does_not_exist_is_refused(
    private_suite: Suite,
) -> None:
    """ "ZZ" matches the pattern of a country code but no viewer is ever in it: a regional gift
    offered there is a typo that would hide the gift from the countries meant."""
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    gift = gifting_pb2.SetGiftRequest(
        request_id=new_id(),
        gift_id="maple-leaf",
        name="Maple leaf",
        coins=15,
        active=True,
        reason="Canada day",
        regions=["CA", "ZZ"],
    )
    error = await expect_error(
        suite.gifting.SetGift(gift, metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_COUNTRY",
    )
    assert field_violations(error) == {"regions[1]"}
    assert "'ZZ' is not an assigned ISO 3166-1 alpha-2 code" in (error.details() or "")
    info = error_info(error)
    assert info is not None
    assert dict(info.metadata) == {"field": "regions[1]", "country_code": "ZZ"}
    catalog = await suite.gifting.ListGifts(gifting_pb2.ListGiftsRequest(page_size=1000))
    assert "maple-leaf" not in {g.gift_id for g in catalog.gifts}
    await expect_error(
        suite.gifting.ListGifts(gifting_pb2.ListGiftsRequest(region="ZZ")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_COUNTRY",
    )
    gift.request_id, gift.regions[1] = new_id(), "US"
    offered = await suite.gifting.SetGift(gift, metadata=admin)
    assert list(offered.gift.regions) == ["CA", "US"]


async def test_non_admins_cannot_change_the_catalog(private_suite: Suite) -> None:
    suite = private_suite
    await expect_error(
        suite.gifting.SetGift(
            gifting_pb2.SetGiftRequest(
                request_id=new_id(),
                gift_id="free-coins",
                name="x",
                coins=1,
                active=True,
                reason="trying my luck",
            ),
            metadata=suite.token("viewer-mallory"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )
    catalog = await suite.gifting.ListGifts(gifting_pb2.ListGiftsRequest(page_size=100))
    assert "free-coins" not in {g.gift_id for g in catalog.gifts}


async def test_every_admin_call_is_in_the_audit_trail_who_what_when_why(
    private_suite: Suite,
) -> None:
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    request = set_package(2000, 2499, package_id="gb-web-2000", reason="second GB web tier")
    await suite.wallet.SetCoinPackage(request, metadata=admin)
    refused = set_package(10, 99, package_id="gb-web-10", region="FR", reason="oops")
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.wallet.SetCoinPackage(refused, metadata=admin)

    trail = await audit_trail(suite, "wallet")
    mine = [a for a in trail if '"gb-web-2000"' in a.request_json]
    assert [a.outcome for a in mine] == ["OK", "STARTED"]  # newest first
    for action in mine:
        assert action.actor_user_id == ADMIN
        assert action.caller_service == "gateway"
        assert action.method == "/coins.wallet.v1.WalletService/SetCoinPackage"
        assert action.reason == "second GB web tier"
        assert action.create_time.seconds > 0
        assert len(action.trace_id) == 32
    failed = [a for a in trail if '"gb-web-10"' in a.request_json]
    assert [a.outcome for a in failed] == ["FAILED_PRECONDITION REGION_UNSUPPORTED", "STARTED"]
    sequences = [a.sequence for a in trail]
    assert sequences == sorted(sequences, reverse=True)


async def test_an_admin_reading_someone_elses_account_is_audited(private_suite: Suite) -> None:
    suite = private_suite
    user, coins = await funded_user(suite)
    balance = await suite.wallet.GetBalance(
        wallet_pb2.GetBalanceRequest(user_id=user), metadata=suite.token(ADMIN, admin=True)
    )
    assert balance.balance.coins == coins
    trail = await audit_trail(suite, "wallet")
    reads = [a for a in trail if a.method.endswith("/GetBalance") and user in a.request_json]
    assert [a.outcome for a in reads] == ["OK", "STARTED"]


async def test_the_audit_trail_is_append_only_in_the_database(private_suite: Suite) -> None:
    suite = private_suite
    await suite.gifting.SetGift(
        gifting_pb2.SetGiftRequest(
            request_id=new_id(),
            gift_id="candle",
            name="Candle",
            coins=3,
            active=True,
            reason="audit test",
        ),
        metadata=suite.token(ADMIN, admin=True),
    )
    db = suite.services["gifting"].runtime.db
    for statement in (
        sa.update(admin_audit).values(reason="nothing to see"),
        sa.delete(admin_audit),
    ):
        with pytest.raises(DBAPIError, match=r"append-only|permission denied"):
            async with db.transaction() as conn:
                await conn.execute(statement)
    async with db.read() as conn:
        reasons = (await conn.execute(sa.select(admin_audit.c.reason))).scalars().all()
    assert "audit test" in reasons and "nothing to see" not in reasons


_REFUSE_OK = {
    "sqlite": [
        "CREATE TRIGGER refuse_ok BEFORE INSERT ON admin_audit WHEN NEW.outcome = 'OK' "
        "BEGIN SELECT RAISE(ABORT, 'the audit trail refuses this row'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_ok() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.outcome = 'OK' THEN RAISE EXCEPTION 'too many connections' USING ERRCODE = "
        "'53300'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER refuse_ok BEFORE INSERT ON admin_audit FOR EACH ROW "
        "EXECUTE FUNCTION refuse_ok()",
    ],
}
_ALLOW_OK = {
    "sqlite": ["DROP TRIGGER refuse_ok"],
    "postgresql": ["DROP TRIGGER refuse_ok ON admin_audit", "DROP FUNCTION refuse_ok()"],
}


async def _run_as_owner(url: str, statements: list[str]) -> None:
    db = Database(url)
    try:
        async with db.transaction() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))
    finally:
        await db.close()


async def test_an_admin_call_that_was_done_is_answered_done_when_its_ok_cannot_be_recorded(
    private_suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit trail's OK is written after the call's work has committed. When that write failed
    (PostgreSQL refusing a new connection), the call was answered UNAVAILABLE and recorded as
    refused, though it was done (review r5: approvals that paid, reversals that applied)."""
    suite = private_suite
    url = suite.services["wallet"].runtime.db.url
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    request = set_package(2500, 2999, active=False, package_id="gb-web-2500")
    await _run_as_owner(url, _REFUSE_OK[dialect])
    try:
        done = await suite.wallet.SetCoinPackage(request, metadata=suite.token(ADMIN, admin=True))
    finally:
        await _run_as_owner(url, _ALLOW_OK[dialect])
    assert done.package.package_id == "gb-web-2500" and not done.active
    rows = [a for a in await audit_trail(suite, "wallet") if request.request_id in a.request_json]
    assert [a.outcome for a in rows] == ["STARTED"], rows  # not a refusal
    assert any("could not be added to the audit trail" in r.getMessage() for r in caplog.records)


async def test_an_admin_call_whose_caller_left_early_still_has_its_outcome_in_the_trail(
    private_suite: Suite,
) -> None:
    """A caller's short deadline (or cancel) does not leave a STARTED record alone: the work and
    its outcome are one task it does not interrupt, and the trail's writes ignore the deadline. A
    review saw half of such calls STARTED only, two thirds of those never applied, most unlogged."""
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    requests = [
        set_package(3000 + n, 3999, active=False, package_id=f"gb-web-3{n:03d}") for n in range(30)
    ]

    async def hurried(n: int, request: wallet_pb2.SetCoinPackageRequest) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # DEADLINE_EXCEEDED, as asked for
            await suite.wallet.SetCoinPackage(request, metadata=admin, timeout=0.005 + n * 0.008)

    await asyncio.gather(*(hurried(n, r) for n, r in enumerate(requests)))

    async def every_start_has_its_outcome() -> bool:
        trail = await audit_trail(suite, "wallet")
        for request in requests:
            outcomes = [a.outcome for a in trail if request.request_id in a.request_json]
            if "STARTED" in outcomes and len(outcomes) < 2:
                return False
        return True

    await eventually(every_start_has_its_outcome, "an outcome beside every STARTED")
    trail = await audit_trail(suite, "wallet")
    started = [r for r in requests if any(r.request_id in a.request_json for a in trail)]
    assert started, "no call got as far as the trail: the test proves nothing"

    # An admin's read of someone's account is audited too (a review saw reads STARTED alone).
    users = [new_id("read") for _ in range(30)]

    async def hurried_read(n: int, user: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # DEADLINE_EXCEEDED, or NOT_FOUND
            await suite.wallet.GetBalance(
                wallet_pb2.GetBalanceRequest(user_id=user),
                metadata=admin,
                timeout=0.005 + n * 0.008,
            )

    await asyncio.gather(*(hurried_read(n, u) for n, u in enumerate(users)))

    async def every_read_has_its_outcome() -> bool:
        trail = await audit_trail(suite, "wallet")
        for user in users:
            outcomes = [a.outcome for a in trail if f'"{user}"' in a.request_json]
            if "STARTED" in outcomes and len(outcomes) < 2:
                return False
        return True

    await eventually(every_read_has_its_outcome, "an outcome beside every read's STARTED")
    trail = await audit_trail(suite, "wallet")
    assert any(f'"{u}"' in a.request_json for u in users for a in trail), "no read got that far"


async def test_a_malformed_time_is_refused_before_the_audit_trail_records_the_call(
    private_suite: Suite,
) -> None:
    """A Timestamp that is no real time (year 10000, negative nanos) is refused with the other
    malformed input, before the call is recorded: the trail kept such requests, as unrenderable
    ones, with a STARTED and a refusal (a review's)."""
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    before = len(await audit_trail(suite, "payout"))
    for start in (Timestamp(seconds=253_402_300_800), Timestamp(seconds=1, nanos=-5)):
        error = await expect_error(
            suite.payout.GetRevenueReport(
                payout_pb2.GetRevenueReportRequest(start_time=start), metadata=admin
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
        )
        assert field_violations(error) == {"start_time"}
    assert len(await audit_trail(suite, "payout")) == before


async def test_the_audit_trail_pages_by_size_too(private_suite: Suite) -> None:
    """Records of large admin calls (a reversal naming 500 gifts of 128 characters: ~130 KB each)
    made the default page exceed gRPC's 1 MiB, RESOURCE_EXHAUSTED with no way past it (a
    review's): a page also ends at about 512 KiB, and paging reaches every record."""
    suite = private_suite
    admin = suite.token(ADMIN, admin=True)
    reversals = []
    for n in range(6):
        request = payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("reverse"),
            gift_ids=[f"{n}-{i:03d}-".ljust(128, "x") for i in range(500)],
            reason="a large admin call",
        )
        await suite.payout.ReverseGiftCredits(request, metadata=admin)
        reversals.append(request.request_id)
    stub = admin_audit_pb2_grpc.AdminAuditServiceStub(suite.channel("payout"))
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = await stub.ListAdminActions(
            admin_audit_pb2.ListAdminActionsRequest(page_token=token), metadata=admin
        )
        assert page.ByteSize() < 1024 * 1024
        seen += [a.request_json for a in page.actions]
        token, pages = page.next_page_token, pages + 1
        if not token:
            break
    assert pages > 1
    for request_id in reversals:  # STARTED and OK, each
        assert sum(request_id in json for json in seen) == 2, request_id
