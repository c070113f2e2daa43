"""The gifting service's gRPC layer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from runtime.access import Access, method_rules, require_owner, require_reason
from runtime.auth import current_principal
from runtime.clients import downstream_timeout
from runtime.pagination import (
    RankedPage,
    decode_token,
    int64,
    next_page,
    page_size,
    text,
)
from runtime.protos import RpcContext
from runtime.server import Runtime
from services.gifting.convert import (
    gift_pb,
    gift_version_pb,
    live_event_pb,
    live_pb,
    live_summary_pb,
    parked_credit_pb,
    sent_gift_pb,
)
from services.gifting.domain import GiftChange, Gifting, GiftOrder, Target
from services.gifting.feed import LiveFeed
from services.gifting.lives import Lives
from services.gifting.sending import GiftSender, send_scope
from services.gifting.settings import GiftingSettings
from services.gifting.storage import period_keys

_PERIODS = {
    gifting_pb2.RANKING_PERIOD_DAY: "day",
    gifting_pb2.RANKING_PERIOD_WEEK: "week",
    gifting_pb2.RANKING_PERIOD_ALL_TIME: "all",
}

SERVICE = gifting_pb2.DESCRIPTOR.services_by_name["GiftingService"].full_name
ACCESS = method_rules(
    SERVICE,
    {
        "ListGifts": Access.user(),
        "SendGift": Access.user("sender_id", moves_money=True),
        "GetGift": Access.record_owner(),
        "ListTopGifters": Access.user(),  # a LIVE's leaderboard is public to signed-in users
        "SetGift": Access.admin_only(),
        "ListParkedCredits": Access.admin_only(),
        "RedeliverParkedCredits": Access.admin_only(),
        "StartLive": Access.user("creator_id", writes=True),
        "EndLive": Access.record_owner(writes=True),
        "SetLiveGifts": Access.record_owner(writes=True),
        "GetLive": Access.user(),
        "ListGiftVersions": Access.user(),  # the catalog's history is public to signed-in users  # a LIVE and its summary are public to signed-in users
        "WatchLive": Access.user(),  # so is its gift feed
        "ListCreatorRankings": Access.user(),  # rankings are public to signed-in users
        "ListCreatorTopGifters": Access.user(),
    },
)
"""Who may call each RPC (see runtime.access): the account acted on is always the token's user."""


class GiftingApi(gifting_pb2_grpc.GiftingServiceServicer):
    def __init__(
        self,
        runtime: Runtime[GiftingSettings],
        gifting: Gifting,
        sender: GiftSender,
        wake_relay: Callable[[], None],
        lives: Lives,
        feed: LiveFeed,
    ) -> None:
        self._rt = runtime
        self._lives = lives
        self._feed = feed
        self._db = runtime.db
        self._idempotency = runtime.idempotency
        self._gifting = gifting
        self._sender = sender
        self._wake_relay = wake_relay
        runtime.replay_stored(
            f"/{SERVICE}/SendGift",
            lambda request: send_scope(request.sender_id),
            gifting_pb2.SendGiftResponse,
            then=sender.with_streak,
        )

    async def ListGifts(
        self, request: gifting_pb2.ListGiftsRequest, context: RpcContext
    ) -> gifting_pb2.ListGiftsResponse:
        size = page_size(request.page_size)
        kind = f"gifts:{request.region}"  # a token pages the listing of one region
        after = decode_token(request.page_token, kind, int64, text)
        async with self._db.read() as conn:
            gifts = await self._gifting.catalog(
                conn,
                limit=size + 1,
                after=(after[0], after[1]) if after else None,
                region=request.region,
            )
        gifts, token = next_page(gifts, size, kind, lambda g: (g.coins, g.gift_id))
        return gifting_pb2.ListGiftsResponse(
            gifts=[gift_pb(g) for g in gifts],
            next_page_token=token,
        )

    async def SetGift(
        self, request: gifting_pb2.SetGiftRequest, context: RpcContext
    ) -> gifting_pb2.SetGiftResponse:
        admin = current_principal().require_admin()

        change = GiftChange(
            gift_id=request.gift_id,
            name=request.name,
            coins=request.coins,
            active=request.active,
            regions=list(request.regions),
            streakable=request.streakable if request.HasField("streakable") else None,
            animation_ms=request.animation_ms if request.HasField("animation_ms") else None,
        )

        async def effect(conn: AsyncConnection) -> gifting_pb2.SetGiftResponse:
            gift = await self._gifting.set_gift(
                conn, change, now=self._rt.clock.now(), changed_by=admin, reason=request.reason
            )
            return gifting_pb2.SetGiftResponse(gift=gift_pb(gift), active=gift.active)

        return await self._idempotency.once(
            f"SetGift:{admin}", request, gifting_pb2.SetGiftResponse, effect
        )

    async def ListGiftVersions(
        self, request: gifting_pb2.ListGiftVersionsRequest, context: RpcContext
    ) -> gifting_pb2.ListGiftVersionsResponse:
        kind, size = f"gift_versions:{request.gift_id}", page_size(request.page_size, 50, 500)
        after = decode_token(request.page_token, kind, int64)
        async with self._db.read() as conn:
            versions = await self._gifting.gift_versions(
                conn, request.gift_id, limit=size + 1, before=after[0] if after else None
            )
        page, token = next_page(
            versions,
            size,
            kind,
            lambda v: (v.gift.version,),
            weigh=lambda v: 200 + len(v.reason.encode()) + 4 * len(v.gift.regions),
        )
        return gifting_pb2.ListGiftVersionsResponse(
            versions=[gift_version_pb(v) for v in page], next_page_token=token
        )

    async def SendGift(
        self, request: gifting_pb2.SendGiftRequest, context: RpcContext
    ) -> gifting_pb2.SendGiftResponse:
        order = GiftOrder(
            sender_id=request.sender_id,
            creator_id=request.creator_id,
            gift_id=request.gift_id,
            count=request.count,
            target=Target(
                live_id=request.live_id if request.HasField("live_id") else None,
                video_id=request.video_id if request.HasField("video_id") else None,
            ),
        )
        return await self._sender.send(
            request,
            order,
            time_limit=downstream_timeout(context, self._rt.settings.downstream_timeout_seconds),
        )

    async def GetGift(
        self, request: gifting_pb2.GetGiftRequest, context: RpcContext
    ) -> gifting_pb2.GetGiftResponse:
        async with self._db.driver.read() as tx:
            sent = await self._gifting.sent_gift(tx, request.sent_gift_id)
        require_owner(sent.sender_id, sent.creator_id, record=f"gift {request.sent_gift_id}")
        return gifting_pb2.GetGiftResponse(sent_gift=sent_gift_pb(sent))

    async def ListTopGifters(
        self, request: gifting_pb2.ListTopGiftersRequest, context: RpcContext
    ) -> gifting_pb2.ListTopGiftersResponse:
        page = RankedPage.of(
            request.page_token,
            f"top:{request.live_id}",
            page_size(request.page_size, default=10, maximum=100),
        )
        async with self._db.read() as conn:
            rows = await self._gifting.top_gifters(
                conn, request.live_id, limit=page.size + 1, after=page.after
            )
            if not rows and not page.after:  # nobody gifted yet, or no such LIVE: which one
                await self._lives.get(conn, request.live_id)
        rows, token = page.rows(rows)
        return gifting_pb2.ListTopGiftersResponse(
            gifters=[
                gifting_pb2.Gifter(user_id=sender, coins=coins, rank=page.first_rank + i)
                for i, (sender, coins) in enumerate(rows)
            ],
            next_page_token=token,
        )

    async def ListParkedCredits(
        self, request: gifting_pb2.ListParkedCreditsRequest, context: RpcContext
    ) -> gifting_pb2.ListParkedCreditsResponse:
        size = page_size(request.page_size, default=50, maximum=500)
        after = decode_token(request.page_token, "parked", int64)
        async with self._db.read() as conn:
            rows = await self._gifting.parked_credits(
                conn, limit=size + 1, after_outbox_id=after[0] if after else None
            )
        rows, token = next_page(rows, size, "parked", lambda r: (r.outbox_id,))
        return gifting_pb2.ListParkedCreditsResponse(
            credits=[parked_credit_pb(r) for r in rows], next_page_token=token
        )

    async def RedeliverParkedCredits(
        self, request: gifting_pb2.RedeliverParkedCreditsRequest, context: RpcContext
    ) -> gifting_pb2.RedeliverParkedCreditsResponse:
        admin = current_principal().require_admin()

        async def effect(conn: AsyncConnection) -> gifting_pb2.RedeliverParkedCreditsResponse:
            redelivered, not_parked = await self._gifting.redeliver(
                conn, list(request.sent_gift_ids), self._rt.clock.now()
            )
            return gifting_pb2.RedeliverParkedCreditsResponse(
                redelivered=len(redelivered), not_parked_ids=not_parked
            )

        response = await self._idempotency.once(
            f"RedeliverParkedCredits:{admin}",
            request,
            gifting_pb2.RedeliverParkedCreditsResponse,
            effect,
        )
        self._wake_relay()
        return response

    async def StartLive(
        self, request: gifting_pb2.StartLiveRequest, context: RpcContext
    ) -> gifting_pb2.StartLiveResponse:
        async def effect(conn: AsyncConnection) -> gifting_pb2.StartLiveResponse:
            live = await self._lives.start(
                conn, request.creator_id, request.title, request.live_id, self._rt.clock.now()
            )
            return gifting_pb2.StartLiveResponse(live=live_pb(live))

        return await self._idempotency.once(
            f"StartLive:{request.creator_id}", request, gifting_pb2.StartLiveResponse, effect
        )

    async def _owned_live(self, live_id: str, reason: str) -> str:
        """The LIVE exists and the token's user is its creator (or an admin, who says why): checked
        before anything is written. Returns its creator, whose request ids the call's are."""
        async with self._db.read() as conn:
            live = await self._lives.get(conn, live_id)
        require_owner(live.creator_id, record=f"LIVE {live_id}")
        require_reason(live.creator_id, reason, record=f"LIVE {live_id}")
        return live.creator_id

    async def EndLive(
        self, request: gifting_pb2.EndLiveRequest, context: RpcContext
    ) -> gifting_pb2.EndLiveResponse:
        creator = await self._owned_live(request.live_id, request.reason)
        scope = f"EndLive:{creator}"
        if not await self._idempotency.is_recorded(scope, request):
            await self._sender.close_live(
                request.live_id,
                patience=self._rt.settings.end_live_patience_seconds,
                time_limit=downstream_timeout(
                    context, self._rt.settings.downstream_timeout_seconds
                ),
            )

        async def effect(conn: AsyncConnection) -> gifting_pb2.EndLiveResponse:
            live, summary = await self._lives.end(conn, request.live_id, self._rt.clock.now())
            return gifting_pb2.EndLiveResponse(live=live_pb(live), summary=live_summary_pb(summary))

        response = await self._idempotency.once(scope, request, gifting_pb2.EndLiveResponse, effect)
        self._feed.notify(request.live_id)
        return response

    async def SetLiveGifts(
        self, request: gifting_pb2.SetLiveGiftsRequest, context: RpcContext
    ) -> gifting_pb2.SetLiveGiftsResponse:
        creator = await self._owned_live(request.live_id, request.reason)

        async def effect(conn: AsyncConnection) -> gifting_pb2.SetLiveGiftsResponse:
            live = await self._lives.set_gifts(conn, request.live_id, request.gifts_enabled)
            return gifting_pb2.SetLiveGiftsResponse(live=live_pb(live))

        return await self._idempotency.once(
            f"SetLiveGifts:{creator}", request, gifting_pb2.SetLiveGiftsResponse, effect
        )

    async def GetLive(
        self, request: gifting_pb2.GetLiveRequest, context: RpcContext
    ) -> gifting_pb2.GetLiveResponse:
        async with self._db.snapshot() as conn:  # the LIVE's sums and its gifters: one moment
            live = await self._lives.get(conn, request.live_id)
            summary = await self._lives.summary(conn, live)
        return gifting_pb2.GetLiveResponse(live=live_pb(live), summary=live_summary_pb(summary))

    async def WatchLive(
        self, request: gifting_pb2.WatchLiveRequest, context: RpcContext
    ) -> AsyncIterator[gifting_pb2.WatchLiveResponse]:
        events = self._feed.watch(request.live_id, request.after_cursor, current_principal().actor)
        async with contextlib.aclosing(events):  # a watcher that leaves is let go at once
            async for event in events:
                summary = None
                if event.kind == "ended":
                    summary = await self._lives.ended_summary(self._db, request.live_id, event)
                yield live_event_pb(event, summary)

    async def ListCreatorRankings(
        self, request: gifting_pb2.ListCreatorRankingsRequest, context: RpcContext
    ) -> gifting_pb2.ListCreatorRankingsResponse:
        period = _PERIODS[request.period]
        key = period_keys(self._rt.clock.now())[period]
        page = RankedPage.of(
            request.page_token,
            f"rankings:{period}:{key}",
            page_size(request.page_size, default=10, maximum=100),
        )
        async with self._db.read() as conn:
            rows = await self._gifting.creator_rankings(
                conn, period, key, limit=page.size + 1, after=page.after
            )
        rows, token = page.rows(rows)
        return gifting_pb2.ListCreatorRankingsResponse(
            creators=[
                gifting_pb2.RankedCreator(creator_id=creator, coins=coins, rank=page.first_rank + i)
                for i, (creator, coins) in enumerate(rows)
            ],
            period_key=key,
            next_page_token=token,
        )

    async def ListCreatorTopGifters(
        self, request: gifting_pb2.ListCreatorTopGiftersRequest, context: RpcContext
    ) -> gifting_pb2.ListCreatorTopGiftersResponse:
        page = RankedPage.of(
            request.page_token,
            f"creator-gifters:{request.creator_id}",
            page_size(request.page_size, default=10, maximum=100),
        )
        async with self._db.read() as conn:
            rows = await self._gifting.creator_gifters(
                conn, request.creator_id, limit=page.size + 1, after=page.after
            )
        rows, token = page.rows(rows)
        return gifting_pb2.ListCreatorTopGiftersResponse(
            gifters=[
                gifting_pb2.Gifter(user_id=sender, coins=coins, rank=page.first_rank + i)
                for i, (sender, coins) in enumerate(rows)
            ],
            next_page_token=token,
        )
