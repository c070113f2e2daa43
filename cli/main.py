"""coinsctl: drive the coins suite from a terminal.

Every mutating command sends a fresh request id; pass --request-id to retry one safely.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.type import date_pb2

from buf.validate import validate_pb2
from cli import render
from cli.client import Clients, Refusal, default_address
from cli.render import console, errors
from coins.common.v1 import ledger_audit_pb2
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.backoff import backoff
from runtime.config import SUITE_PLACES, suite_address
from runtime.status import error_info

Command = Callable[[Clients, argparse.Namespace], None]
_CHANNELS = {"in-app": wallet_pb2.CHANNEL_IN_APP, "web": wallet_pb2.CHANNEL_WEB}
_METHODS = {"paypal": payout_pb2.PAYOUT_METHOD_PAYPAL, "bank": payout_pb2.PAYOUT_METHOD_BANK}
_GOALS = {
    "views": promotion_pb2.GOAL_VIDEO_VIEWS,
    "profile": promotion_pb2.GOAL_PROFILE_VISITS,
    "followers": promotion_pb2.GOAL_FOLLOWERS,
    "website": promotion_pb2.GOAL_WEBSITE_VISITS,
}


def _rid(args: argparse.Namespace) -> str:
    """The request id of a mutating command: --request-id, else a new one (kept on `args`, so a
    failure can say how to retry with it)."""
    if not args.request_id:
        args.request_id = uuid.uuid4().hex
    return str(args.request_id)


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date: use YYYY-MM-DD") from None


def _moment(value: str) -> dt.datetime:
    """A time given on the command line: ISO 8601, in UTC unless it carries an offset (converted)."""
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or add an offset "
            "(2026-12-06T05:00+02:00)"
        ) from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def open_account(c: Clients, a: argparse.Namespace) -> None:
    born: dt.date = a.birth_date
    response = c.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=_rid(a),
            user_id=a.user,
            country_code=a.country,
            birth_date=date_pb2.Date(year=born.year, month=born.month, day=born.day),
        ),
    )
    console.print(render.account(response.account))


def show_account(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.GetAccount(wallet_pb2.GetAccountRequest(user_id=a.user))
    console.print(render.account(response.account))


def packages(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(user_id=a.user, channel=_CHANNELS[a.channel]),
    )
    console.print(render.packages(response.packages))
    if not response.packages:
        other = next(name for name in _CHANNELS if name != a.channel)
        console.print(
            f"no {a.channel} packages are on sale to {a.user}'s country; try --channel {other}",
        )


def buy(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=_rid(a),
            user_id=a.user,
            package_id=a.package,
            payment_token=a.token or f"tok_visa_{a.user}",
        ),
    )
    console.print(render.purchase(response.purchase, response.balance))


def balance(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=a.user))
    console.print(render.balance(a.user, response.balance))


def ledger(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=a.user, **_history_filters(a, _KINDS)),
    )
    console.print(render.ledger(a.user, response.entries))
    _next_page(a, response.next_page_token)


def _next_page(a: argparse.Namespace, token: str) -> None:
    """Where a listing goes on: the same command with --page-token (its filters must stay)."""
    if token:
        again = _without_option(a.command_line, "--page-token")
        command = shlex.join(["coinsctl", *again, "--page-token", token])
        console.print(f"next page: {command}")


def _kind_names(kinds: Any, prefix: str) -> dict[str, Any]:
    """An entry-kind enum's values by their names on the command line: `purchase`, `gift`..."""
    return {
        name.removeprefix(prefix).lower(): number
        for name, number in kinds.items()
        if number and name.startswith(prefix)
    }


_KINDS = _kind_names(wallet_pb2.EntryKind, "ENTRY_KIND_")
_DIAMOND_KINDS = _kind_names(payout_pb2.DiamondEntryKind, "DIAMOND_ENTRY_KIND_")


def _history_filters(a: argparse.Namespace, kinds: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger listing's page and filters (`add_history_filters`) as its request's fields."""
    return {
        "page_size": a.limit,
        "kinds": [kinds[k] for k in a.kind or ()],
        "page_token": a.page_token or "",
        **_period(a),
    }


def add_history_filters(p: argparse.ArgumentParser, kinds: Mapping[str, Any]) -> None:
    """A ledger listing's filters, as its RPC takes them, and the token of its next page."""
    p.add_argument(
        "--kind",
        action="append",
        choices=sorted(kinds),
        help="only entries of this kind (repeat for several)",
    )
    p.add_argument("--since", type=_moment, help="from this time on (YYYY-MM-DD[THH:MM] UTC)")
    p.add_argument("--until", type=_moment, help="before this time (YYYY-MM-DD[THH:MM] UTC)")
    p.add_argument("--page-token", help="the next page, as the previous page printed it")


def gifts(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.ListGifts(
        gifting_pb2.ListGiftsRequest(page_size=100, region=(a.region or "").upper()),
    )
    console.print(render.gifts(response.gifts))


def send_gift(c: Clients, a: argparse.Namespace) -> None:
    request = gifting_pb2.SendGiftRequest(
        request_id=_rid(a), sender_id=a.sender, creator_id=a.creator, gift_id=a.gift, count=a.count
    )
    if a.video:
        request.video_id = a.video
    else:
        request.live_id = a.live
    response = c.gifting.SendGift(request)
    console.print(render.sent_gift(response))


def top(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.ListTopGifters(
        gifting_pb2.ListTopGiftersRequest(live_id=a.live, page_size=a.limit)
    )
    console.print(render.top_gifters(a.live, response.gifters))


def live_start(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.StartLive(
        gifting_pb2.StartLiveRequest(
            request_id=_rid(a), creator_id=a.creator, title=a.title, live_id=a.id or ""
        ),
    )
    console.print(render.live(response.live))


def _as_creator(c: Clients, live_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """The LIVE's creator's token (or --as USER's): ending or switching a LIVE is its creator's."""
    if c.acting_user:
        return c.token(c.acting_user)
    live = c.gifting.GetLive(gifting_pb2.GetLiveRequest(live_id=live_id)).live
    return c.token(live.creator_id)


def live_end(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.EndLive(
        gifting_pb2.EndLiveRequest(request_id=_rid(a), live_id=a.live_id, reason=a.reason),
        metadata=_as_creator(c, a.live_id),
    )
    console.print(render.live(response.live, response.summary))


def live_gifts(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.SetLiveGifts(
        gifting_pb2.SetLiveGiftsRequest(
            request_id=_rid(a), live_id=a.live_id, gifts_enabled=a.state == "on", reason=a.reason
        ),
        metadata=_as_creator(c, a.live_id),
    )
    console.print(render.live(response.live))


def live_show(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.GetLive(gifting_pb2.GetLiveRequest(live_id=a.live_id))
    console.print(render.live(response.live, response.summary))


RECONNECT_FIRST_SECONDS, RECONNECT_MAX_SECONDS = 0.25, 2.0
"""`live watch`'s pauses between reconnects to a stopped gifting: doubling, at most 2 s."""


def live_watch(c: Clients, a: argparse.Namespace) -> None:
    """Print the LIVE's feed as it comes, until the LIVE ends (Ctrl-C stops; --after resumes).

    A watch that ends early resumes by itself, saying so on stderr: a gifting process that stops
    (a restart, a rollout: UNAVAILABLE SHUTTING_DOWN) or that finds the watcher too far behind
    (ABORTED FEED_TOO_SLOW) says the cursor to resume after; a connection lost once the feed was
    flowing (a gifting killed, a network cut) resumes after the last event printed. It reconnects
    to that gifting restarted or to another replica, and gives up after --reconnect-for seconds
    without an answer. A gifting never reached, or any other refusal, ends the watch as before."""
    cursor: int = a.after
    stream: Any = None
    flowing = False
    try:
        while True:
            stream = c.gifting.WatchLive(
                gifting_pb2.WatchLiveRequest(live_id=a.live_id, after_cursor=cursor)
            )
            try:
                for event in stream:
                    console.print(render.live_event(event))
                    cursor, flowing = event.cursor, True
                return
            except grpc.RpcError as error:
                said = _feed_resumes_after(error)
                lost = error.code() == grpc.StatusCode.UNAVAILABLE and flowing
                if (said is None and not lost) or a.reconnect_for <= 0:
                    raise
                why = "the connection to gifting was lost (UNAVAILABLE)"
                if said is not None:
                    why, cursor = said
                down = error.code() == grpc.StatusCode.UNAVAILABLE
            _note(f"{why}: reconnecting to watch {a.live_id} after cursor {cursor}")
            if down:  # FEED_TOO_SLOW: gifting is up, so at once
                _wait_for_gifting(c, a, cursor)
    except KeyboardInterrupt:
        if stream is not None:
            stream.cancel()


_RESUMABLE = {
    (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"): "gifting is stopping (SHUTTING_DOWN)",
    (grpc.StatusCode.ABORTED, "FEED_TOO_SLOW"): "this watch fell too far behind (FEED_TOO_SLOW)",
}
"""How gifting ends a watch it wants resumed, with the cursor to resume after (ErrorInfo
`resume_after`), and what the watch says on stderr."""


def _feed_resumes_after(error: grpc.RpcError) -> tuple[str, int] | None:
    """What gifting said when it ended a watch to be resumed, and the cursor to resume after;
    None for any other end of a watch."""
    info = error_info(error)
    why = None if info is None else _RESUMABLE.get((error.code(), info.reason))
    if info is None or why is None or not info.metadata.get("resume_after", "").isdigit():
        return None
    return why, int(info.metadata["resume_after"])


def _wait_for_gifting(c: Clients, a: argparse.Namespace, cursor: int) -> None:
    """Until gifting answers again (GetLive of the watched LIVE), with pauses doubling from
    RECONNECT_FIRST_SECONDS to RECONNECT_MAX_SECONDS; after --reconnect-for seconds of
    attempts that found it down, stop saying how to resume."""
    deadline = time.monotonic() + a.reconnect_for
    failures = 0
    while True:
        pause = backoff(failures + 1, first=RECONNECT_FIRST_SECONDS, cap=RECONNECT_MAX_SECONDS)
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        try:
            c.gifting.GetLive(
                gifting_pb2.GetLiveRequest(live_id=a.live_id),
                timeout=max(0.5, min(c.timeout, deadline - time.monotonic())),
            )
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            failures += 1
            if time.monotonic() >= deadline:
                raise SystemExit(
                    f"gifting at {c.addresses['gifting']} did not come back within "
                    f"{a.reconnect_for:g} s ({failures} reconnects failed, the last "
                    f"{error.code().name}): resume once it is up with\n  "
                    f"{_resume_command(a, cursor)}"
                ) from None
            continue
        _note(f"reconnected to gifting: watching {a.live_id} after cursor {cursor}")
        return


def _resume_command(a: argparse.Namespace, cursor: int) -> str:
    """This command again, resuming after `cursor` (its other options as they were given)."""
    given = getattr(a, "command_line", None) or ["live", "watch", a.live_id]
    return shlex.join(["coinsctl", *_without_option(given, "--after"), "--after", str(cursor)])


def _note(text: str) -> None:
    """A line about the command itself (not its output) on stderr."""
    print(f"coinsctl: {text}", file=sys.stderr, flush=True)


_PERIODS = {
    "day": gifting_pb2.RANKING_PERIOD_DAY,
    "week": gifting_pb2.RANKING_PERIOD_WEEK,
    "all": gifting_pb2.RANKING_PERIOD_ALL_TIME,
}


def rankings(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.ListCreatorRankings(
        gifting_pb2.ListCreatorRankingsRequest(period=_PERIODS[a.period], page_size=a.limit),
    )
    console.print(render.rankings(response))


def creator_gifters(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.ListCreatorTopGifters(
        gifting_pb2.ListCreatorTopGiftersRequest(creator_id=a.creator, page_size=a.limit),
    )
    console.print(render.top_gifters(f"creator {a.creator}", response.gifters, scope=""))


def diamonds(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.GetDiamondBalance(payout_pb2.GetDiamondBalanceRequest(creator_id=a.creator))
    console.print(render.diamonds(response.balance))


def diamond_ledger(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.ListDiamondEntries(
        payout_pb2.ListDiamondEntriesRequest(
            creator_id=a.creator, **_history_filters(a, _DIAMOND_KINDS)
        ),
    )
    console.print(render.diamond_ledger(a.creator, response.entries))
    _next_page(a, response.next_page_token)


def _period(a: argparse.Namespace) -> dict[str, Timestamp]:
    period: dict[str, Timestamp] = {}
    for name, value in (("start_time", a.since), ("end_time", a.until)):
        if value:
            stamp = Timestamp()
            stamp.FromDatetime(value)
            period[name] = stamp
    return period


def statement(c: Clients, a: argparse.Namespace) -> None:
    """A coin statement for a viewer, or with --diamonds a diamond statement for a creator."""
    if a.diamonds:
        answer: Any = c.payout.GetDiamondStatement(
            payout_pb2.GetDiamondStatementRequest(creator_id=a.owner, **_period(a)),
        )
        kinds: Any = payout_pb2.DiamondEntryKind
        prefix, unit = "DIAMOND_ENTRY_KIND_", "diamonds"
    else:
        answer = c.wallet.GetCoinStatement(
            wallet_pb2.GetCoinStatementRequest(user_id=a.owner, **_period(a))
        )
        kinds, prefix, unit = wallet_pb2.EntryKind, "ENTRY_KIND_", "coins"
    lines = [
        (render.enum_name(kinds, line.kind, prefix), line.credited, line.debited, line.entries)
        for line in answer.lines
    ]
    period = (
        answer.start_time.ToDatetime().strftime("%Y-%m-%d %H:%M"),
        answer.end_time.ToDatetime().strftime("%Y-%m-%d %H:%M UTC"),
    )
    console.print(
        render.statement(
            a.owner, unit, answer.opening_balance, answer.closing_balance, lines, period
        )
    )


def quote(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.QuoteWithdrawal(
        payout_pb2.QuoteWithdrawalRequest(
            creator_id=a.creator, diamonds=a.diamonds, method=_METHODS[a.method]
        ),
    )
    console.print(render.quote(a.creator, response))
    _note_kept(a.diamonds, response.diamonds)


def withdraw(c: Clients, a: argparse.Namespace) -> None:
    request = payout_pb2.RequestWithdrawalRequest(
        request_id=_rid(a),
        creator_id=a.creator,
        diamonds=a.diamonds,
        payout_method_id=a.method_id or "",
    )
    if a.destination:  # a one-off destination (processors' test tokens)
        request.method = _METHODS[a.method]
        request.destination_token = a.destination
    response = c.payout.RequestWithdrawal(request)
    console.print(render.withdrawal(response.withdrawal))
    _note_kept(a.diamonds, response.withdrawal.diamonds)


def _note_kept(asked: int, taken: int) -> None:
    """A withdrawal takes whole cents' worth of diamonds: say what stays of the amount asked for."""
    if 0 < taken < asked:
        console.print(
            f"{asked - taken} of the {asked} diamonds asked for stay in the balance: only whole "
            "cents are paid (2 diamonds = 1 cent)"
        )


def add_paypal(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            request_id=_rid(a),
            creator_id=a.creator,
            paypal=payout_pb2.PayPalAccount(email=a.email),
            make_default=a.default,
        ),
    )
    console.print(render.payout_methods(a.creator, [response.payout_method]))


def add_bank(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            request_id=_rid(a),
            creator_id=a.creator,
            bank=payout_pb2.BankAccount(processor_token=a.token, last4=a.last4),
            make_default=a.default,
        ),
    )
    console.print(render.payout_methods(a.creator, [response.payout_method]))


def methods(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.ListPayoutMethods(payout_pb2.ListPayoutMethodsRequest(creator_id=a.creator))
    console.print(render.payout_methods(a.creator, response.payout_methods))
    status = render.enum_name(payout_pb2.KycStatus, response.kyc_status, "KYC_STATUS_")
    console.print(f"verification: {status}")
    console.print(f"time zone: {response.time_zone} (the daily withdrawal cap counts its days)")


def default_method(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.SetDefaultPayoutMethod(
        payout_pb2.SetDefaultPayoutMethodRequest(
            request_id=_rid(a), creator_id=a.creator, payout_method_id=a.method_id
        ),
    )
    console.print(render.payout_methods(a.creator, [response.payout_method]))


def remove_method(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.RemovePayoutMethod(
        payout_pb2.RemovePayoutMethodRequest(
            request_id=_rid(a), creator_id=a.creator, payout_method_id=a.method_id
        ),
    )
    console.print(render.payout_methods(a.creator, response.payout_methods))


_KYC = {
    "unverified": payout_pb2.KYC_STATUS_UNVERIFIED,
    "pending": payout_pb2.KYC_STATUS_PENDING,
    "verified": payout_pb2.KYC_STATUS_VERIFIED,
    "rejected": payout_pb2.KYC_STATUS_REJECTED,
}


def verify(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.SetCreatorVerification(
        payout_pb2.SetCreatorVerificationRequest(
            request_id=_rid(a),
            creator_id=a.creator,
            status=_KYC[a.status],
            reason=a.reason,
            time_zone=a.time_zone or "",
        ),
    )
    status = render.enum_name(payout_pb2.KycStatus, response.kyc_status, "KYC_STATUS_")
    zone = f", time zone {a.time_zone}" if a.time_zone else ""
    console.print(f"{a.creator}: verification {status}{zone}")


def withdrawal(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.GetWithdrawal(
        payout_pb2.GetWithdrawalRequest(withdrawal_id=a.withdrawal_id)
    )
    console.print(render.withdrawal(response.withdrawal))


def withdrawals(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.ListWithdrawals(
        payout_pb2.ListWithdrawalsRequest(creator_id=a.creator, page_size=a.limit),
    )
    console.print(
        render.withdrawals(
            f"Withdrawals of {a.creator} (newest first)", response.withdrawals, creators=False
        )
    )


def cancel_withdrawal(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.CancelWithdrawal(
        payout_pb2.CancelWithdrawalRequest(
            request_id=_rid(a), withdrawal_id=a.withdrawal_id, reason=a.reason
        ),
    )
    console.print(render.withdrawal(response.withdrawal))


def review(c: Clients, a: argparse.Namespace) -> None:
    decision = (
        payout_pb2.REVIEW_DECISION_APPROVE if a.approve else payout_pb2.REVIEW_DECISION_REJECT
    )
    response = c.payout.ReviewWithdrawal(
        payout_pb2.ReviewWithdrawalRequest(
            request_id=_rid(a), withdrawal_id=a.withdrawal_id, decision=decision, reason=a.reason
        ),
    )
    console.print(render.withdrawal(response.withdrawal))


def review_queue(c: Clients, a: argparse.Namespace) -> None:
    queue, title = (
        (payout_pb2.WITHDRAWAL_QUEUE_PARKED, "Parked withdrawals")
        if a.parked
        else (payout_pb2.WITHDRAWAL_QUEUE_PROCESSING, "Withdrawals with the processor")
        if a.processing
        else (payout_pb2.WITHDRAWAL_QUEUE_IN_REVIEW, "Withdrawals in review")
    )
    response = c.payout.ListWithdrawalQueue(
        payout_pb2.ListWithdrawalQueueRequest(queue=queue, page_size=a.limit)
    )
    console.print(
        render.withdrawals(
            f"{title} (oldest first)", response.withdrawals, errors=a.parked or a.processing
        )
    )


def retry_withdrawal(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.RetryWithdrawal(
        payout_pb2.RetryWithdrawalRequest(
            request_id=_rid(a), withdrawal_id=a.withdrawal_id, reason=a.reason
        ),
    )
    console.print(render.withdrawal(response.withdrawal))


def parked_credits(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.ListParkedCredits(gifting_pb2.ListParkedCreditsRequest(page_size=a.limit))
    console.print(render.parked_credits(response.credits))
    if response.next_page_token:
        most = most_at_once(gifting_pb2.ListParkedCreditsRequest)
        console.print(f"more are parked than the {a.limit} shown: --limit (up to {most})")


def redeliver_credits(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.RedeliverParkedCredits(
        gifting_pb2.RedeliverParkedCreditsRequest(
            request_id=_rid(a), sent_gift_ids=a.sent_gift_ids, reason=a.reason
        ),
    )
    console.print(
        f"{response.redelivered} parked credit(s) back on the outbox: delivered to payout again, "
        "each credited once"
    )
    if response.not_parked_ids:
        console.print(
            "not parked, left as they are (unknown, delivered already, or still on their way): "
            + ", ".join(response.not_parked_ids),
        )


def reconcile(c: Clients, a: argparse.Namespace) -> None:
    response = c.payout.ReconcileWithdrawals(
        payout_pb2.ReconcileWithdrawalsRequest(run_now=not a.latest)
    )
    if not response.run_id:
        console.print("no reconciliation has run yet (run one: coinsctl --admin reconcile)")
        return
    console.print(
        f"reconciliation {response.run_id} ({render.stamp(response.start_time)}): "
        f"{response.checked:,} payments checked, {len(response.mismatches)} mismatches"
    )
    if response.mismatches:
        console.print(render.mismatches(response.mismatches))


_AUDIT_MODES = {
    "full": ledger_audit_pb2.AUDIT_MODE_FULL,
    "incremental": ledger_audit_pb2.AUDIT_MODE_INCREMENTAL,
    "latest": ledger_audit_pb2.AUDIT_MODE_LATEST_REPORT,
}


def audit_ledger(c: Clients, a: argparse.Namespace) -> None:
    response = c.ledger_audit(a.service).AuditLedger(
        ledger_audit_pb2.AuditLedgerRequest(mode=_AUDIT_MODES[a.mode]),
        timeout=max(c.timeout, 600.0),  # a full audit of a large ledger takes minutes
    )
    console.print(render.ledger_audit(a.service, response))
    if not response.ok:
        raise SystemExit(1)


_CLASSIFICATIONS = {
    "personal": wallet_pb2.ACCOUNT_CLASSIFICATION_PERSONAL,
    "government": wallet_pb2.ACCOUNT_CLASSIFICATION_GOVERNMENT,
    "political": wallet_pb2.ACCOUNT_CLASSIFICATION_POLITICAL,
}


def classify(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.SetAccountClassification(
        wallet_pb2.SetAccountClassificationRequest(
            request_id=_rid(a),
            user_id=a.user,
            classification=_CLASSIFICATIONS[a.classification],
            reason=a.reason,
        ),
    )
    console.print(render.account(response.account))


def revenue(c: Clients, a: argparse.Namespace) -> None:
    period = _period(a)
    if "start_time" not in period:
        period["start_time"] = Timestamp()
        today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        period["start_time"].FromDatetime(today - dt.timedelta(days=a.days - 1))
    response = c.payout.GetRevenueReport(payout_pb2.GetRevenueReportRequest(**period))
    console.print(render.revenue(response))


def promote(c: Clients, a: argparse.Namespace) -> None:
    response = c.promotion.CreatePromotion(
        promotion_pb2.CreatePromotionRequest(
            request_id=_rid(a),
            user_id=a.user,
            video_id=a.video,
            goal=_GOALS[a.goal],
            budget_coins=a.budget,
            duration_days=a.days,
        ),
    )
    console.print(render.promotion(response.promotion))
    console.print(
        f"promotion {response.promotion.promotion_id}: {a.budget:,} coins held, spent only as "
        f"delivered; {a.user} has {response.payer_balance_coins:,} coins available"
    )


def show_promotion(c: Clients, a: argparse.Namespace) -> None:
    response = c.promotion.GetPromotion(
        promotion_pb2.GetPromotionRequest(promotion_id=a.promotion_id)
    )
    console.print(render.promotion(response.promotion))


def list_promotions(c: Clients, a: argparse.Namespace) -> None:
    response = c.promotion.ListPromotions(
        promotion_pb2.ListPromotionsRequest(
            user_id=a.user,
            page_size=a.limit,
            status=promotion_pb2.PromotionStatus.Value(f"PROMOTION_STATUS_{a.status.upper()}")
            if a.status
            else promotion_pb2.PROMOTION_STATUS_UNSPECIFIED,
        ),
    )
    console.print(render.promotions(a.user, response.promotions))


def deliver(c: Clients, a: argparse.Namespace) -> None:
    response = c.ad_delivery.ReportDelivery(
        promotion_pb2.ReportDeliveryRequest(
            request_id=_rid(a), promotion_id=a.promotion_id, coins=a.coins
        ),
    )
    console.print(render.promotion(response.promotion))


def end_promotion(c: Clients, a: argparse.Namespace) -> None:
    response = c.promotion.EndPromotion(
        promotion_pb2.EndPromotionRequest(
            request_id=_rid(a), promotion_id=a.promotion_id, reason=a.reason
        ),
    )
    console.print(render.promotion(response.promotion))
    console.print(
        f"{response.released_coins:,} unspent coins went back to {response.promotion.user_id}"
    )


def token(c: Clients, a: argparse.Namespace) -> None:
    """Print a dev token, for grpcurl and other clients (see the README's Security model)."""
    print(c.issuer.mint(a.user, roles=["admin"] if c.admin else []))


def demo(c: Clients, a: argparse.Namespace) -> None:
    from cli.demo import run

    run(c)


def _live_help(
    c: Clients, a: argparse.Namespace
) -> None:  # pragma: no cover - argparse requires a subcommand
    raise SystemExit("coinsctl live start|end|gifts|show|watch: see coinsctl live --help")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, but only real ones: not "(default: None)" after a help text that says what
    an option left out means, nor a second "(default: ...)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "(default:" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _anywhere() -> argparse.ArgumentParser:
    """--request-id, --as and --admin, accepted after the subcommand too (they override the ones
    given before it)."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--request-id", help="idempotency key: repeat one to retry safely")
    common.add_argument("--as", dest="acting_user", metavar="USER", help="act for USER")
    common.add_argument("--admin", action="store_true", help="mint tokens with the admin role")
    return common


def most_at_once(request: type[Message]) -> int:
    """The most rows a listing returns at once: its `page_size` rule in the proto (`lte`)."""
    field = request.DESCRIPTOR.fields_by_name["page_size"]
    rules = field.GetOptions().Extensions[validate_pb2.field]
    if not rules.int32.HasField("lte"):
        raise TypeError(f"{request.DESCRIPTOR.full_name}.page_size has no upper bound")
    return int(rules.int32.lte)


def _days(low: int, high: int) -> Callable[[str], int]:
    """A --days flag checked by coinsctl, from `low` to `high`, and named as its flag (the service
    would refuse a field the user never typed: `duration_days`, `start_time`)."""

    def days(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of days") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is out of range: give {low} to {high}")
        return number

    return days


def _seconds(value: str) -> float:
    """--reconnect-for: a finite number of seconds, 0 or more (nan and inf never gave up)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give 0 or more seconds")
    return seconds


REVENUE_DAYS_AT_MOST = 92
"""The longest revenue report payout answers (GetRevenueReport: 1 to 92 days)."""


def add_limit(p: argparse.ArgumentParser, request: type[Message], *, default: int) -> None:
    """A listing's --limit: from 1 to what its RPC returns at once, checked by coinsctl and named
    as its flag (the service would refuse `page_size`, a field the user never typed)."""
    most = most_at_once(request)

    def limit(value: str) -> int:
        try:
            rows = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of rows") from None
        if not 1 <= rows <= most:
            raise argparse.ArgumentTypeError(
                f"{rows} is out of range: give 1 to {most} (the most one call returns)"
            )
        return rows

    p.add_argument(
        "--limit", type=limit, default=default, metavar="N", help=f"most rows shown, 1 to {most}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinsctl", description=__doc__, formatter_class=_Help)
    anywhere = _anywhere()
    for service in SUITE_PLACES:
        parser.add_argument(
            f"--{service}",
            default=default_address(service),
            metavar="HOST:PORT",
            help=f"{service} address (COINS_{service.upper()}_ADDRESS)",
        )
    parser.add_argument("--request-id", help="idempotency key: repeat one to retry safely")
    parser.add_argument(
        "--as", dest="acting_user", metavar="USER", help="act for USER (default: the user named)"
    )
    parser.add_argument("--admin", action="store_true", help="mint tokens with the admin role")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Command, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=help_, parents=[anywhere], formatter_class=_Help
        )
        p.set_defaults(run=run)
        return p

    p = command("open-account", open_account, "open a viewer's coin account")
    p.add_argument("user")
    p.add_argument(
        "--country", default="US", help="the account's country (ISO code; its region and currency)"
    )
    p.add_argument("--birth-date", type=_date, default=dt.date(1995, 1, 1), help="YYYY-MM-DD")
    command("account", show_account, "show an account").add_argument("user")
    p = command("packages", packages, "list the coin packages a user can buy")
    p.add_argument("user")
    p.add_argument(
        "--channel",
        choices=sorted(_CHANNELS),
        default="web",
        help="where the coins are bought (prices differ)",
    )
    p = command("buy", buy, "buy a coin package (sandbox payment)")
    p.add_argument("user")
    p.add_argument("package")
    p.add_argument(
        "--token",
        help="sandbox payment token (default: tok_visa_USER, the user's own card: the wallet "
        "limits spending per card and day); tok_decline declines",
    )
    command("balance", balance, "show a user's coins").add_argument("user")
    p = command("ledger", ledger, "show a user's ledger history")
    p.add_argument("user")
    add_limit(p, wallet_pb2.ListLedgerEntriesRequest, default=20)
    add_history_filters(p, _KINDS)
    command("gifts", gifts, "list the gift catalog").add_argument(
        "--region", help="only the gifts offered in this country (ISO code, e.g. GB)"
    )
    p = command("gift", send_gift, "send a gift to a creator")
    p.add_argument("sender")
    p.add_argument("creator")
    p.add_argument("gift")
    p.add_argument("--count", type=int, default=1, help="how many of the gift")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--live", help="the LIVE the gift is sent in (the creator's open LIVE)")
    where.add_argument("--video", help="the creator's video the gift is sent on")
    live = command("live", _live_help, "a creator's LIVE: start, end, gifts on/off, show, watch")
    lives = live.add_subparsers(dest="live_command", required=True)

    def live_command(name: str, run: Command, help_: str) -> argparse.ArgumentParser:
        p = lives.add_parser(
            name, help=help_, description=help_, parents=[anywhere], formatter_class=_Help
        )
        p.set_defaults(run=run)
        return p

    p = live_command("start", live_start, "a creator goes LIVE (gifts on)")
    p.add_argument("creator")
    p.add_argument("--title", default="LIVE", help="what viewers see")
    p.add_argument("--id", help="choose the LIVE's id (default: a new one)")
    p = live_command("end", live_end, "end a LIVE (as its creator, or --as USER)")
    p.add_argument("live_id")
    live_reason = "why (required when an admin acts on a creator's LIVE; kept in the audit trail)"
    p.add_argument("--reason", default="", help=live_reason)
    p = live_command("gifts", live_gifts, "turn gifts on or off for a LIVE (as its creator)")
    p.add_argument("live_id")
    p.add_argument("state", choices=["on", "off"])
    p.add_argument("--reason", default="", help=live_reason)
    live_command("show", live_show, "a LIVE and what it received").add_argument("live_id")
    p = live_command("watch", live_watch, "print a LIVE's gift feed as it comes, until it ends")
    p.add_argument("live_id")
    p.add_argument(
        "--after", type=int, default=0, help="resume after this cursor (default: from the start)"
    )
    p.add_argument(
        "--reconnect-for",
        type=_seconds,
        default=30,
        metavar="SECONDS",
        help="when gifting stops (a restart, a rollout), keep reconnecting this long; 0: end",
    )
    p = command("rankings", rankings, "creators ranked by the coins of their credited gifts")
    p.add_argument("--period", choices=sorted(_PERIODS), default="day", help="default: %(default)s")
    add_limit(p, gifting_pb2.ListCreatorRankingsRequest, default=10)
    p = command("creator-gifters", creator_gifters, "a creator's top gifters, all time")
    p.add_argument("creator")
    add_limit(p, gifting_pb2.ListCreatorTopGiftersRequest, default=10)
    p = command("top", top, "top gifters of a LIVE")
    p.add_argument("live")
    add_limit(p, gifting_pb2.ListTopGiftersRequest, default=10)
    command("diamonds", diamonds, "show a creator's diamonds").add_argument("creator")
    p = command("diamond-ledger", diamond_ledger, "show a creator's diamond movements")
    p.add_argument("creator")
    add_limit(p, payout_pb2.ListDiamondEntriesRequest, default=20)
    add_history_filters(p, _DIAMOND_KINDS)
    p = command(
        "statement", statement, "opening and closing balance of a period, movements by kind"
    )
    p.add_argument("owner", help="the viewer (coins) or, with --diamonds, the creator")
    p.add_argument("--diamonds", action="store_true", help="the creator's diamonds")
    p.add_argument(
        "--since",
        type=_moment,
        help="YYYY-MM-DD[THH:MM] UTC, or with an offset (default: the beginning)",
    )
    p.add_argument(
        "--until", type=_moment, help="YYYY-MM-DD[THH:MM] UTC, or with an offset (default: now)"
    )
    p = command("quote", quote, "what a withdrawal of some diamonds would pay")
    p.add_argument("creator")
    p.add_argument("diamonds", type=int)
    p.add_argument(
        "--method", choices=sorted(_METHODS), default="paypal", help="how the withdrawal is paid"
    )
    p = command("withdraw", withdraw, "withdraw diamonds as cash, to the default payout method")
    p.add_argument("creator")
    p.add_argument("diamonds", type=int)
    p.add_argument("--method-id", help="another registered payout method (see `methods`)")
    p.add_argument(
        "--destination",
        help="a one-off processor token instead of a registered method (dest_fail… fails)",
    )
    p.add_argument(
        "--method", choices=sorted(_METHODS), default="paypal", help="with --destination"
    )
    p = command("add-paypal", add_paypal, "register a PayPal account for withdrawals")
    p.add_argument("creator")
    p.add_argument("email", help="fail…@ and hang…@ make the sandbox fail or never answer")
    p.add_argument("--default", action="store_true", help="make it the default")
    p = command("add-bank", add_bank, "register a bank account (processor token, last 4 digits)")
    p.add_argument("creator")
    p.add_argument("token", help="the processor's token for the account, never its number")
    p.add_argument("last4")
    p.add_argument("--default", action="store_true", help="make it the default")
    command("methods", methods, "a creator's payout methods and verification").add_argument(
        "creator"
    )
    p = command("default-method", default_method, "make a payout method the default")
    p.add_argument("creator")
    p.add_argument("method_id")
    p = command("remove-method", remove_method, "remove a payout method")
    p.add_argument("creator")
    p.add_argument("method_id")
    p = command("verify", verify, "set a creator's verification (KYC), as an admin (--admin)")
    p.add_argument("creator")
    p.add_argument(
        "--status", choices=sorted(_KYC), default="verified", help="the KYC status to set"
    )
    p.add_argument("--reason", default="documents checked", help="why (kept in the audit trail)")
    p.add_argument(
        "--time-zone",
        metavar="IANA",
        help="the creator's time zone, e.g. America/New_York: the daily cap counts its days",
    )
    command(
        "withdrawal", withdrawal, "show a withdrawal and its history (--as CREATOR)"
    ).add_argument("withdrawal_id")
    p = command("withdrawals", withdrawals, "list a creator's withdrawals, newest first")
    p.add_argument("creator")
    add_limit(p, payout_pb2.ListWithdrawalsRequest, default=20)
    p = command(
        "cancel-withdrawal",
        cancel_withdrawal,
        "cancel a withdrawal not yet sent to the processor (--as CREATOR)",
    )
    p.add_argument("withdrawal_id")
    p.add_argument(
        "--reason", default="", help="why (required when an admin cancels a creator's withdrawal)"
    )
    p = command("review", review, "approve or reject a withdrawal in review, as an admin (--admin)")
    p.add_argument("withdrawal_id")
    decision = p.add_mutually_exclusive_group(required=True)
    decision.add_argument("--approve", action="store_true", help="pay it")
    decision.add_argument("--reject", action="store_true", help="refuse it: the diamonds come back")
    p.add_argument(
        "--reason", required=True, help="why, for the audit trail (shown on a rejection)"
    )
    p = command(
        "review-queue", review_queue, "withdrawals waiting for review, as an admin (--admin)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--parked", action="store_true", help="the withdrawals parked after failed processor calls"
    )
    which.add_argument(
        "--processing",
        action="store_true",
        help="the withdrawals with the processor, not parked (their outcome awaited)",
    )
    add_limit(p, payout_pb2.ListWithdrawalQueueRequest, default=50)
    p = command(
        "retry-withdrawal",
        retry_withdrawal,
        "give a parked withdrawal back to the processor worker, as an admin (--admin)",
    )
    p.add_argument("withdrawal_id")
    p.add_argument(
        "--reason", default="", help="why (kept in the withdrawal's history and the audit trail)"
    )
    p = command(
        "parked-credits",
        parked_credits,
        "gift credits payout refused for good, oldest first, as an admin (--admin)",
    )
    add_limit(p, gifting_pb2.ListParkedCreditsRequest, default=50)
    p = command(
        "redeliver-credits",
        redeliver_credits,
        "put parked gift credits back on the outbox once their cause is fixed, as an admin "
        "(--admin)",
    )
    p.add_argument("sent_gift_ids", nargs="+", metavar="ID", help="sent gift ids (parked-credits)")
    p.add_argument(
        "--reason", required=True, help="what was fixed, for the audit trail (3 characters or more)"
    )
    p = command(
        "reconcile", reconcile, "compare the processor's payments with ours, as an admin (--admin)"
    )
    p.add_argument(
        "--latest",
        action="store_true",
        help="the periodic job's latest report instead of a run now",
    )
    p = command(
        "audit-ledger",
        audit_ledger,
        "verify a ledger (balances, hash chains, holds) or read its latest audit, as an admin "
        "(--admin); exit 1 if it found anything",
    )
    p.add_argument("service", choices=["wallet", "payout"], help="wallet: coins; payout: diamonds")
    p.add_argument(
        "--mode",
        choices=sorted(_AUDIT_MODES),
        default="full",
        help="full: every entry; incremental: what was written since the last clean audit; "
        "latest: the newest recorded report, without running one",
    )
    p = command(
        "classify",
        classify,
        "classify an account (government and political ones neither send nor receive gifts), "
        "as an admin (--admin)",
    )
    p.add_argument("user")
    p.add_argument("classification", choices=sorted(_CLASSIFICATIONS))
    p.add_argument("--reason", required=True, help="why, 3+ characters (kept in the audit trail)")
    p = command(
        "revenue", revenue, "the platform's revenue from gifts per UTC day, as an admin (--admin)"
    )
    p.add_argument(
        "--days",
        type=_days(1, REVENUE_DAYS_AT_MOST),
        default=7,
        help=f"the last N days, today included (1 to {REVENUE_DAYS_AT_MOST})",
    )
    p.add_argument(
        "--since",
        type=_moment,
        help="YYYY-MM-DD[THH:MM] UTC, or with an offset (instead of --days)",
    )
    p.add_argument(
        "--until", type=_moment, help="YYYY-MM-DD[THH:MM] UTC, or with an offset (default: now)"
    )
    p = command("promote", promote, "promote a video with a coin budget")
    p.add_argument("user")
    p.add_argument("video")
    p.add_argument("budget", type=int)
    p.add_argument(
        "--goal", choices=sorted(_GOALS), default="views", help="what the promotion buys"
    )
    duration = promotion_pb2.CreatePromotionRequest.DESCRIPTOR.fields_by_name["duration_days"]
    runs = duration.GetOptions().Extensions[validate_pb2.field].int32
    p.add_argument(
        "--days",
        type=_days(runs.gte, runs.lte),
        default=3,
        help=f"how long it runs ({runs.gte} to {runs.lte})",
    )
    command("promotion", show_promotion, "show a promotion (--as OWNER)").add_argument(
        "promotion_id"
    )
    p = command("promotions", list_promotions, "a user's promotions, newest first, with their ids")
    p.add_argument("user")
    add_limit(p, promotion_pb2.ListPromotionsRequest, default=20)
    p.add_argument(
        "--status",
        choices=["pending", "active", "rejected", "completed"],
        help="only promotions in this status",
    )
    p = command("deliver", deliver, "report a promotion's delivery, as the ad-delivery system")
    p.add_argument("promotion_id")
    p.add_argument("coins", type=int, help="what the delivery is worth")
    p = command(
        "end-promotion", end_promotion, "end a promotion early, releasing the rest (--as OWNER)"
    )
    p.add_argument("promotion_id")
    p.add_argument(
        "--reason", default="", help="why (required when an admin ends another user's promotion)"
    )
    command("token", token, "print a dev token for USER (for grpcurl)").add_argument("user")
    command("demo", demo, "run the whole money flow against the running suite")
    return parser


_UNCERTAIN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL"}
"""Codes after which a mutating call may or may not have been applied."""
_TRY_LATER = {"OVERLOADED", "RATE_LIMITED"}
"""RESOURCE_EXHAUSTED reasons refused before any work (a definite limit, such as
PURCHASE_LIMIT_EXCEEDED, is an answer: retrying changes nothing)."""


def _worth_retrying(error: grpc.RpcError) -> bool:
    code = error.code().name if hasattr(error, "code") else ""
    if code == "RESOURCE_EXHAUSTED":
        info = error_info(error)
        return info is not None and info.reason in _TRY_LATER
    return code in _UNCERTAIN


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(arguments)
    clients = Clients(
        {service: getattr(args, service) for service in SUITE_PLACES},
        acting_user=args.acting_user,
        admin=args.admin,
    )
    args.command_line = arguments  # (a watch that gives up says how to resume)
    try:
        args.run(clients, args)
    except grpc.RpcError as error:
        report_error(error, clients)
        if _worth_retrying(error) and args.request_id:
            again = [
                "coinsctl",
                *_without_option(arguments, "--request-id"),
                "--request-id",
                args.request_id,
            ]
            console.print(
                f"It may or may not have been applied. Retry with the same request id (it is "
                f"applied at most once):\n  {shlex.join(again)}",
            )
        return 1
    return 0


def _without_option(arguments: list[str], option: str) -> list[str]:
    """A command line without `option` and its value (`--opt V` or `--opt=V`), to repeat it with
    a value of its own."""
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(f"{option}="):
            kept.append(argument)
    return kept


_OUR_FLAGS = {"after_cursor": "--after"}
"""Request fields a service's message names, and the coinsctl flag that sets each: a refusal is
shown in coinsctl's terms ("reconnect with --after 41", not "after_cursor=41"). The service's own
message names its fields, for every client."""


def _in_our_terms(text: str) -> str:
    for field, flag in _OUR_FLAGS.items():
        text = re.sub(rf"\b{field}=(?=-?\d)", f"{flag} ", text)
        text = re.sub(rf"\b{field}\b", flag, text)
    return text


_HANDSHAKE_REFUSED = re.compile(r"handshake failed", re.IGNORECASE)
"""The server answered but TLS failed: another authority's certificates, or a plaintext port."""


def report_error(error: grpc.RpcError, clients: Clients | None = None) -> None:
    refusal = Refusal.of(error)
    code, details = refusal.code.name, refusal.message
    if code == "UNAVAILABLE" and not refusal.reason and clients is not None:
        service = clients.last_service
        if _HANDSHAKE_REFUSED.search(details) and service in clients.addresses:
            errors.print(
                f"{service} at {clients.addresses[service]} answers, but the TLS handshake failed: "
                "its certificate is not from the certificate authority in COINS_CERTS_DIR "
                f"({clients.security.certs_dir}/), or the address is not a coins API port (a "
                "health port is plaintext). Point COINS_CERTS_DIR at the certs/ of the checkout "
                f"whose suite runs there, or --{service} / COINS_{service.upper()}_ADDRESS at its "
                f"API port. gRPC said: {details}",
            )
            return
        where = (
            f"{service} at {clients.addresses[service]}: is the suite running (make up)? The "
            f"address comes from --{service} or COINS_{service.upper()}_ADDRESS"
            if service in clients.addresses
            else "the service: is the suite running (make up)? Addresses come from --SERVICE or "
            "COINS_<SERVICE>_ADDRESS"
        )
        errors.print(
            f"cannot reach {where} (default: the suite's, from COINS_PORT_BASE); certificates "
            f"from COINS_CERTS_DIR ({clients.security.certs_dir}/). gRPC said: {details}",
        )
        return
    if code == "UNIMPLEMENTED" and not refusal.reason and clients is not None:
        service = clients.last_service
        if service in clients.addresses:
            errors.print(
                f"the server at {clients.addresses[service]} does not serve {service}'s calls "
                f"(UNIMPLEMENTED: {details}): is --{service} / COINS_{service.upper()}_ADDRESS "
                f"pointing at another service? The suite's {service} is at "
                f"{suite_address(service)}",
            )
            return
    reason = f" [{refusal.reason}]" if refusal.reason else ""
    errors.print(f"{code}{reason} {_in_our_terms(details)}", style="bold red")
    for field_path, description in refusal.violations.items():
        errors.print(f"  {_in_our_terms(field_path)}: {_in_our_terms(description)}")
    # A record named by id (a promotion, a withdrawal): coinsctl cannot tell whose it is.
    if refusal.reason == "NOT_ACCOUNT_OWNER" and clients and not clients.acting_user:
        errors.print(
            "coinsctl acted as 'coinsctl' (no --as): pass --as OWNER, the user the record "
            "belongs to (or --admin --as SOMEONE for an admin)",
        )


if __name__ == "__main__":
    sys.exit(main())
