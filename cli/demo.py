"""`make demo`: the whole money flow against the running suite, step by step, as tables."""

from __future__ import annotations

import time
import uuid

from google.type import date_pb2

from cli import render
from cli.client import Clients
from cli.render import console
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2


def _rid() -> str:
    return uuid.uuid4().hex


def run(c: Clients) -> None:
    run_id = uuid.uuid4().hex[:6]
    ava, ben, leo = f"ava-{run_id}", f"ben-{run_id}", f"leo-{run_id}"
    live = f"live-{run_id}"

    console.rule("1. Two viewers and a creator open accounts")
    for user in (ava, ben, leo):
        account = c.wallet.OpenAccount(
            wallet_pb2.OpenAccountRequest(
                request_id=_rid(),
                user_id=user,
                country_code="US",
                birth_date=date_pb2.Date(year=1994, month=3, day=8),
            ),
        ).account
        console.print(render.account(account))

    console.rule("2. Coin packages on sale to them (web prices)")
    listed = c.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(user_id=ava, channel=wallet_pb2.CHANNEL_WEB)
    )
    console.print(render.packages(listed.packages))

    console.rule("3. They buy coins (sandbox payment provider)")
    for user, package in ((ava, "us-web-17500"), (ben, "us-web-700")):
        bought = c.wallet.PurchaseCoins(
            wallet_pb2.PurchaseCoinsRequest(
                request_id=_rid(),
                user_id=user,
                package_id=package,
                payment_token=f"tok_visa_{user}",
            ),
        )
        console.print(render.purchase(bought.purchase, bought.balance))

    console.rule(f"4. {leo} goes LIVE; they send gifts to {leo} in {live}")
    c.gifting.StartLive(
        gifting_pb2.StartLiveRequest(
            request_id=_rid(), creator_id=leo, title=f"{leo} live", live_id=live
        ),
    )
    for sender, gift, count in (
        (ava, "drama-queen", 2),
        (ava, "concert", 4),
        (ava, "rose", 5),
        (ben, "concert", 1),
    ):
        sent = c.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=_rid(),
                sender_id=sender,
                creator_id=leo,
                gift_id=gift,
                count=count,
                live_id=live,
            ),
        )
        console.print(render.sent_gift(sent))
    top = c.gifting.ListTopGifters(gifting_pb2.ListTopGiftersRequest(live_id=live))
    console.print(render.top_gifters(live, top.gifters))

    console.rule(f"5. {leo}'s diamonds (2 coins = 1 diamond; 200 diamonds = $1)")
    time.sleep(
        0.3
    )  # the diamond credit is delivered by gifting's outbox relay, just after the gift
    balance = c.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=leo)
    ).balance
    console.print(render.diamonds(balance))

    console.rule(f"6. {leo} withdraws 4,000 diamonds to PayPal")
    if balance.available_diamonds < 4000:
        console.print(
            f"{leo}'s diamonds are still pending: each gift's diamonds become available "
            "PAYOUT_MATURATION_DAYS (15) days after it, the chargeback window. To see a withdrawal "
            "now, restart the suite with PAYOUT_MATURATION_DAYS=0 make up."
        )
        _promotion_part(c, ava, run_id)
        return
    # An admin verifies leo (withdrawals need it); leo registers where the money goes.
    c.payout.SetCreatorVerification(
        payout_pb2.SetCreatorVerificationRequest(
            request_id=_rid(),
            creator_id=leo,
            status=payout_pb2.KYC_STATUS_VERIFIED,
            reason="documents checked (demo)",
        ),
        metadata=c.token_as(f"ops-{run_id}", admin=True),
    )
    method = c.payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            request_id=_rid(),
            creator_id=leo,
            paypal=payout_pb2.PayPalAccount(email=f"{leo}@example.com"),
        ),
    ).payout_method
    console.print(f"{leo} is verified and gets paid to {method.display}")
    requested = c.payout.RequestWithdrawal(
        payout_pb2.RequestWithdrawalRequest(request_id=_rid(), creator_id=leo, diamonds=4000),
    ).withdrawal
    console.print(render.withdrawal(requested))
    for _ in range(50):
        current = c.payout.GetWithdrawal(
            payout_pb2.GetWithdrawalRequest(withdrawal_id=requested.withdrawal_id),
            metadata=c.token(requested.creator_id),
        ).withdrawal
        if current.status in (
            payout_pb2.WITHDRAWAL_STATUS_PAID,
            payout_pb2.WITHDRAWAL_STATUS_FAILED,
        ):
            break
        time.sleep(0.1)
    console.print("after the payment processor answered:")
    console.print(render.withdrawal(current))
    balance = c.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=leo)
    ).balance
    console.print(render.diamonds(balance))

    _promotion_part(c, ava, run_id)


def _promotion_part(c: Clients, ava: str, run_id: str) -> None:
    """Steps 7 and 8: a promotion, then the viewer's balance and ledger."""
    console.rule(f"7. {ava} promotes a video with 1,000 coins: held, consumed as delivered")
    promoted = c.promotion.CreatePromotion(
        promotion_pb2.CreatePromotionRequest(
            request_id=_rid(),
            user_id=ava,
            video_id=f"video-{run_id}",
            goal=promotion_pb2.GOAL_VIDEO_VIEWS,
            budget_coins=1000,
            duration_days=3,
        ),
    )
    promotion_id = promoted.promotion.promotion_id
    console.print(render.promotion(promoted.promotion))
    coins = c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=ava)).balance
    console.print(render.balance(ava, coins))
    console.print("the ad-delivery system reports what it delivered:")
    for worth in (250, 150):
        delivered = c.ad_delivery.ReportDelivery(
            promotion_pb2.ReportDeliveryRequest(
                request_id=_rid(), promotion_id=promotion_id, coins=worth
            ),
        ).promotion
        console.print(f"  delivery worth {worth} coins: {delivered.spent_coins:,} spent so far")
    ended = c.promotion.EndPromotion(
        promotion_pb2.EndPromotionRequest(request_id=_rid(), promotion_id=promotion_id),
        metadata=c.token(ava),
    )
    console.print(f"{ava} ends it early; {ended.released_coins:,} unspent coins come back:")
    console.print(render.promotion(ended.promotion))

    console.rule(f"8. {ava}'s balance and ledger")
    coins = c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=ava)).balance
    console.print(render.balance(ava, coins))
    entries = c.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=ava, page_size=20)
    ).entries
    console.print(render.ledger(ava, entries))
