"""How the gifting service is put together."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from coins.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from runtime.metrics import Gauges
from runtime.server import RECONCILE_PAGE, Runtime, ServiceSpec
from services.gifting import storage
from services.gifting.api import ACCESS, GiftingApi
from services.gifting.clients import PayoutCrediter, WalletDebiter
from services.gifting.domain import Gifting
from services.gifting.feed import FeedLimits, LiveFeed
from services.gifting.lives import Lives
from services.gifting.outbox import CreditRelay
from services.gifting.reversals import ReversedGifts
from services.gifting.sending import GiftSender
from services.gifting.settings import GiftingSettings


async def setup(runtime: Runtime[GiftingSettings]) -> None:
    settings = runtime.settings
    payout = PayoutCrediter(runtime.channel(settings.payout_address, peer="payout"))
    relay = CreditRelay(runtime, payout)
    runtime.add_worker(relay.run)
    reversals = ReversedGifts(
        runtime.db,
        runtime.clock,
        payout,
        page=500,
        time_limit=settings.downstream_timeout_seconds,
    )
    runtime.add_periodic(  # the first pass a period after start: payout may start after gifting
        "reversed gifts",
        settings.reversals_every_seconds,
        reversals.follow,
        batch=reversals.page,
        first_after=settings.reversals_every_seconds,
    )
    gifting, wallet = (
        Gifting(),
        WalletDebiter(runtime.channel(settings.wallet_address, peer="wallet")),
    )
    _measure(runtime, gifting)
    lives = Lives(dt.timedelta(seconds=settings.streak_pause_seconds))

    async def ended_streaks() -> int:
        async with runtime.db.driver.transaction() as tx:
            fed = await lives.end_due_streaks(tx, runtime.clock.now(), limit=500)
        for live_id in fed:
            feed.notify(live_id)
        return len(fed)  # LIVEs whose feeds gained streak ends

    feed = LiveFeed(
        runtime.db,
        runtime.clock,
        FeedLimits(
            poll_seconds=settings.feed_poll_seconds,
            page=settings.feed_page,
            keep=settings.feed_keep,
            max_backlog=settings.feed_max_backlog,
            max_watchers=settings.feed_max_watchers,
            max_watchers_per_user=settings.feed_max_watchers_per_user,
            watch_lease_seconds=settings.feed_watch_lease_seconds,
        ),
    )
    runtime.add_worker(feed.listen)  # other replicas' gifts, by LISTEN/NOTIFY
    runtime.on_stopping(feed.close)  # watchers reconnect at once, not after the grace
    runtime.parts.update(feed=feed)
    sender = GiftSender(
        runtime.db,
        runtime.idempotency,
        runtime.clock,
        gifting,
        wallet,
        relay.wake.set,
        lives,
        feed,
    )
    stale = dt.timedelta(seconds=settings.reconcile_after_seconds)
    runtime.add_periodic("ended streaks", settings.streak_sweep_seconds, ended_streaks)
    runtime.add_periodic(
        "settled pending gifts",
        settings.reconcile_every_seconds,
        lambda: sender.reconcile(
            stale, time_limit=settings.downstream_timeout_seconds, limit=RECONCILE_PAGE
        ),
        batch=RECONCILE_PAGE,
    )
    gifting_pb2_grpc.add_GiftingServiceServicer_to_server(
        GiftingApi(runtime, gifting, sender, relay.wake.set, lives, feed), runtime.server
    )


def _measure(runtime: Runtime[GiftingSettings], gifting: Gifting) -> None:
    """Gifting's business metrics and gauges (runtime.metrics)."""
    meter = runtime.metrics.meter
    sent = meter.create_counter("coins.gifts.sent", description="Gifts sent (debited), by where")
    coins = meter.create_counter(
        "coins.gifts.coins", unit="{coins}", description="Coins of the gifts sent, by where"
    )
    where = {True: {"where": "live"}, False: {"where": "video"}}

    def count(gift: storage.SentGiftRecord) -> None:
        attributes = where[gift.live_id is not None]
        sent.add(gift.count, attributes)
        coins.add(gift.coins, attributes)

    gifting.on_sent = count
    gauges = runtime.metrics.gauges
    gauges.declare("coins.outbox.backlog", "Creator credits waiting to be delivered to payout")
    gauges.declare("coins.outbox.oldest_age", "Age of the oldest undelivered credit", "s")
    gauges.declare("coins.outbox.parked", "Credits parked for an operator")
    gauges.declare("coins.gifts.pending", "Gifts whose debit is not settled yet")

    async def sample(gauges: Gauges) -> None:
        async with runtime.db.driver.read() as tx:
            now = await storage.outbox_gauges(tx)
        gauges.set("coins.outbox.backlog", {(): now.backlog})
        gauges.set_age("coins.outbox.oldest_age", now.oldest, runtime.clock.now())
        gauges.set("coins.outbox.parked", {(): now.parked})
        gauges.set("coins.gifts.pending", {(): now.pending_gifts})

    runtime.add_sampler(sample)


SPEC = ServiceSpec(
    name="gifting",
    settings_type=GiftingSettings,
    error_domain="gifting.coins",
    grpc_services=(gifting_pb2.DESCRIPTOR.services_by_name["GiftingService"].full_name,),
    migrations_dir=Path(__file__).parent / "migrations",
    setup=setup,
    access=ACCESS,
)
