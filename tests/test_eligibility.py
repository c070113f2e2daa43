"""Who may send and receive gifts (the wallet decides, with the debit): government and political
accounts neither send nor receive (nor pay for promotions), both sides must be of age for their
country and in a region with gifts, no one gifts themself. Each refusal has its own reason and
moves nothing."""

from __future__ import annotations

import datetime as dt

import grpc
from google.type import date_pb2

from coins.gifting.v1 import gifting_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info
from tests.helpers import (
    expect_error,
    field_violations,
    funded_user,
    live_of,
    new_creator,
    new_id,
    open_account,
    start_live,
)
from tests.suite import Suite

W = wallet_pb2


def gift(sender: str, creator: str) -> gifting_pb2.SendGiftRequest:
    return gifting_pb2.SendGiftRequest(
        request_id=new_id("g"),
        sender_id=sender,
        creator_id=creator,
        gift_id="panda",
        count=1,
        live_id=live_of(creator),
    )


async def classify(
    suite: Suite, user: str, classification: W.AccountClassification.ValueType
) -> W.Account:
    answer = await suite.wallet.SetAccountClassification(
        W.SetAccountClassificationRequest(
            request_id=new_id("c"), user_id=user, classification=classification, reason="verified"
        ),
        metadata=suite.token("trust-1", admin=True),
    )
    return answer.account


async def coins_of(suite: Suite, user: str) -> int:
    return (await suite.wallet.GetBalance(W.GetBalanceRequest(user_id=user))).balance.coins


async def creator_of(suite: Suite, country: str, born: dt.date) -> str:
    creator = new_id("creator")
    await suite.wallet.OpenAccount(
        W.OpenAccountRequest(
            request_id=new_id("open"),
            user_id=creator,
            country_code=country,
            birth_date=date_pb2.Date(year=born.year, month=born.month, day=born.day),
        )
    )
    await start_live(suite, creator, live_of(creator))
    return creator


async def refused(suite: Suite, sender: str, creator: str, reason: str) -> dict[str, str]:
    before = await coins_of(suite, sender)
    error = await expect_error(
        suite.gifting.SendGift(gift(sender, creator)), grpc.StatusCode.FAILED_PRECONDITION, reason
    )
    assert await coins_of(suite, sender) == before  # nothing moved
    info = error_info(error)
    assert info is not None
    return dict(info.metadata)


async def test_government_and_political_accounts_neither_send_nor_receive(suite: Suite) -> None:
    sender, _ = await funded_user(suite)
    politician = await new_creator(suite)
    account = await classify(suite, politician, W.ACCOUNT_CLASSIFICATION_POLITICAL)
    assert account.classification == W.ACCOUNT_CLASSIFICATION_POLITICAL
    meta = await refused(suite, sender, politician, "RECIPIENT_GOVERNMENT_ACCOUNT")
    assert meta["classification"] == "ACCOUNT_CLASSIFICATION_POLITICAL"
    ministry, _ = await funded_user(suite)
    await classify(suite, ministry, W.ACCOUNT_CLASSIFICATION_GOVERNMENT)
    creator = await new_creator(suite)
    await refused(suite, ministry, creator, "GOVERNMENT_ACCOUNT")
    # Classified back as a person's account, it sends again (this process forgot it at once).
    await classify(suite, ministry, W.ACCOUNT_CLASSIFICATION_PERSONAL)
    sent = await suite.gifting.SendGift(gift(ministry, creator))
    assert sent.sent_gift.coins == 5


async def test_government_and_political_accounts_cannot_pay_for_promotions(suite: Suite) -> None:
    """Paid reach for a political account is what ad policies forbid first: its budget is refused
    before a coin is held (a review's political account promoted a video and paid 400 coins)."""
    politician, coins = await funded_user(suite)
    await classify(suite, politician, W.ACCOUNT_CLASSIFICATION_POLITICAL)
    create = promotion_pb2.CreatePromotionRequest(
        request_id=new_id("p"),
        user_id=politician,
        video_id=new_id("video"),
        budget_coins=300,
        duration_days=1,
        goal=promotion_pb2.GOAL_VIDEO_VIEWS,
    )
    error = await expect_error(
        suite.promotion.CreatePromotion(create, metadata=suite.token(politician)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GOVERNMENT_ACCOUNT",
    )
    info = error_info(error)
    assert (
        info is not None and info.metadata["classification"] == "ACCOUNT_CLASSIFICATION_POLITICAL"
    )
    assert "promotions" in (error.details() or "")
    # Nor a budget paid up front (promotion's path for promotions made before budgets were held;
    # a review debited one).
    await expect_error(
        suite.as_caller("promotion").wallet.DebitCoins(
            W.DebitCoinsRequest(
                request_id=new_id("budget"),
                user_id=politician,
                coins=300,
                reason=W.DEBIT_REASON_PROMOTION,
                reference="promotion p",
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "GOVERNMENT_ACCOUNT",
    )
    balance = (await suite.wallet.GetBalance(W.GetBalanceRequest(user_id=politician))).balance
    assert (balance.coins, balance.available_coins) == (coins, coins)
    await classify(suite, politician, W.ACCOUNT_CLASSIFICATION_PERSONAL)
    create.request_id = new_id("p")
    made = await suite.promotion.CreatePromotion(create, metadata=suite.token(politician))
    assert made.promotion.status == promotion_pb2.PROMOTION_STATUS_ACTIVE


async def test_each_side_must_be_of_age_for_its_country_and_in_a_region_with_gifts(
    suite: Suite,
) -> None:
    sender, _ = await funded_user(suite)
    eighteen = dt.date.today().replace(year=dt.date.today().year - 18) - dt.timedelta(days=30)
    korean = await creator_of(suite, "KR", eighteen)  # 18 is of age in the US, not in Korea
    meta = await refused(suite, sender, korean, "RECIPIENT_NOT_ELIGIBLE")
    assert meta == {"user_id": korean}  # no age rule: it told any viewer a creator is a minor
    french = await creator_of(suite, "FR", dt.date(1990, 1, 1))  # no gifts in France (yet)
    meta = await refused(suite, sender, french, "RECIPIENT_NOT_ELIGIBLE")
    assert meta == {"user_id": french}  # nor where a creator lives
    abroad = new_id("viewer")
    await open_account(suite, abroad, country="FR")
    await refused(suite, abroad, await new_creator(suite), "REGION_UNSUPPORTED")


async def test_only_an_admin_classifies_an_account_that_exists(suite: Suite) -> None:
    user = new_id("viewer")
    await open_account(suite, user)
    request = W.SetAccountClassificationRequest(
        request_id=new_id("c"),
        user_id=user,
        classification=W.ACCOUNT_CLASSIFICATION_POLITICAL,
        reason="party account",
    )
    await expect_error(
        suite.wallet.SetAccountClassification(request, metadata=suite.token(user)),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )
    # An admin says why: the audit trail is where a user's lost right to gift is explained.
    unexplained = await expect_error(
        suite.wallet.SetAccountClassification(
            W.SetAccountClassificationRequest(
                request_id=new_id("c"), user_id=user, classification=request.classification
            ),
            metadata=suite.token("trust-1", admin=True),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
    assert field_violations(unexplained) == {"reason"}
    await expect_error(
        suite.wallet.SetAccountClassification(
            W.SetAccountClassificationRequest(
                request_id=new_id("c"),
                user_id=new_id("ghost"),
                classification=W.ACCOUNT_CLASSIFICATION_POLITICAL,
                reason="party account",
            ),
            metadata=suite.token("trust-1", admin=True),
        ),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    got = await suite.wallet.GetAccount(W.GetAccountRequest(user_id=user))
    assert got.account.classification == W.ACCOUNT_CLASSIFICATION_PERSONAL


async def test_an_admin_never_classifies_themself(suite: Suite) -> None:
    """An admin another admin classified political lifted it themself and could receive gifts
    again (a review); classifying oneself is OWN_DECISION, as verifying oneself is."""
    admin = new_id("trust")
    await open_account(suite, admin)
    await classify(suite, admin, W.ACCOUNT_CLASSIFICATION_POLITICAL)
    error = await expect_error(
        suite.wallet.SetAccountClassification(
            W.SetAccountClassificationRequest(
                request_id=new_id("c"),
                user_id=admin,
                classification=W.ACCOUNT_CLASSIFICATION_PERSONAL,
                reason="my own account",
            ),
            metadata=suite.token(admin, admin=True),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "OWN_DECISION",
    )
    assert "another admin must" in (error.details() or "")
    got = await suite.wallet.GetAccount(W.GetAccountRequest(user_id=admin))
    assert got.account.classification == W.ACCOUNT_CLASSIFICATION_POLITICAL
