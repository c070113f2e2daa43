"""Gifting configuration (environment variables prefixed GIFTING_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from pydantic_settings import SettingsConfigDict

from runtime.config import ServiceSettings


class GiftingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GIFTING_", extra="ignore")
    service_name: ClassVar[str] = "gifting"

    wallet_address: str = ""
    """Where the wallet listens: host:port, dns:///name:port (every replica the name resolves to)
    or ipv4:host:port,host:port (a list of replicas); empty: this suite's (COINS_PORT_BASE + 1)."""
    payout_address: str = ""
    """Where payout listens (the forms of wallet_address); empty: this suite's (COINS_PORT_BASE + 3)."""
    relay_batch_size: PositiveInt = 500
    """Most credits the outbox relay sends in one BatchCreditDiamonds call (payout takes up to 1,000)."""
    relay_max_backoff_seconds: PositiveFloat = 60.0
    relay_linger_seconds: NonNegativeFloat = 0.05
    """How long the relay, woken by a gift, waits for more before it sends a batch (a producer's
    linger): fewer, larger batches for up to this much more credit lag. At half the maximum gift
    rate 0.05 s cut payout's CPU per gift from 0.54 to 0.16 ms and PostgreSQL's from 1.96 to 1.42.
    0: at once."""
    reconcile_every_seconds: PositiveFloat = 30.0
    reconcile_after_seconds: PositiveFloat = 60.0
    """Gifts still pending after this (a crash or a lost wallet answer mid-send) are settled by asking
    the wallet what became of their debit."""
    end_live_patience_seconds: NonNegativeFloat = 5.0
    """EndLive first turns the LIVE's gifts off, then waits up to this long for the gifts it took
    already to be recorded, so each is in the feed and EndLive's summary is final. A gift still on
    its way after this (a slow or unreachable wallet) counts in the LIVE's totals, not its feed."""
    streak_pause_seconds: PositiveFloat = 5.0
    """Sends of a streakable gift by one viewer in one LIVE at most this far apart form a streak; it
    ends when the pause passes (a `streak_ended` event in the feed)."""
    streak_sweep_seconds: PositiveFloat = 0.5
    """How often ended streaks are looked for (so a streak's end shows within this of the pause)."""
    reversals_every_seconds: float = Field(default=10.0, gt=0)
    """How often payout's reversed gift credits are looked for: a reversed gift leaves the rankings,
    top gifters and LIVE summaries (and reads REVERSED) within this (services.gifting.reversals)."""
    feed_poll_seconds: PositiveFloat = 1.0
    """Each LIVE's feed reader (one per LIVE per process) looks for new events at least this often;
    it is woken at once when a gift is recorded: in-process, and across replicas by PostgreSQL
    NOTIFY."""
    feed_page: PositiveInt = 200
    """Events read at a time (by a LIVE's reader, and by a watcher catching up)."""
    feed_keep: PositiveInt = 1_000
    """A LIVE's newest events kept in memory per process for all its watchers; a watcher further
    behind reads pages of its own."""
    feed_max_backlog: PositiveInt = 5_000
    """A watcher further behind than this, and still losing ground, is told to resume from its
    cursor (ABORTED FEED_TOO_SLOW)."""
    feed_max_watchers: PositiveInt = 1_000
    """Feed watchers one process serves at once (RESOURCE_EXHAUSTED TOO_MANY_WATCHERS beyond). At
    most half of GIFTING_MAX_CONCURRENT_RPCS, which counts open streams too: watchers up to that
    limit refused every gift (review r25). More viewers: more replicas, or a fan-out in front."""
    feed_max_watchers_per_user: PositiveInt = 10
    """Feed watchers of one user one process serves at once."""
    feed_watch_lease_seconds: PositiveFloat = 30.0
    """A LIVE with watchers in a process is marked watched this far ahead (renewed at a third of
    it); gifts NOTIFY the other replicas only for a watched LIVE (NOTIFY costs every commit a
    database-wide lock)."""

    @model_validator(mode="after")
    def _watchers_leave_room_for_calls(self) -> GiftingSettings:
        if self.feed_max_watchers * 2 > self.max_concurrent_rpcs:
            raise ValueError(
                f"GIFTING_FEED_MAX_WATCHERS={self.feed_max_watchers} is more than half of "
                f"GIFTING_MAX_CONCURRENT_RPCS={self.max_concurrent_rpcs}, which counts open feeds "
                "too: watchers would leave no room for gifts; lower the first or raise the second"
            )
        return self
