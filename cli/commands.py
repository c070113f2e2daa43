"""coinsctl's commands: each takes the clients and its parsed arguments, makes its calls and prints
what came back (cli.render). Every mutating command sends a fresh request id unless given one."""

from __future__ import annotations

import argparse
import datetime as dt
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
from cli.client import Clients
from cli.render import console
from coins.common.v1 import ledger_audit_pb2
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.backoff import backoff
from runtime.status import error_info

Command = Callable[[Clients, argparse.Namespace], None]
CHANNELS = {"in-app": wallet_pb2.CHANNEL_IN_APP, "web": wallet_pb2.CHANNEL_WEB}
METHODS = {"paypal": payout_pb2.PAYOUT_METHOD_PAYPAL, "bank": payout_pb2.PAYOUT_METHOD_BANK}
GOALS = {
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


def parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date: use YYYY-MM-DD") from None


def parse_moment(value: str) -> dt.datetime:
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
        wallet_pb2.ListCoinPackagesRequest(user_id=a.user, channel=CHANNELS[a.channel]),
    )
    console.print(render.packages(response.packages))
    if not response.packages:
        other = next(name for name in CHANNELS if name != a.channel)
        console.print(
            f"no {a.channel} packages are on sale to {a.user}'s country; try --channel {other}",
        )


def buy(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=_rid(a),
            user_id=a.user,
            package_id=a.package or "",
            custom_coins=a.coins or 0,
            payment_token=a.token or f"tok_visa_{a.user}",
        ),
    )
    console.print(render.purchase(response.purchase, response.balance))


def balance(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=a.user))
    console.print(render.balance(a.user, response.balance))


def ledger(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=a.user, **_history_filters(a, KINDS)),
    )
    console.print(render.ledger(a.user, response.entries))
    _next_page(a, response.next_page_token)


def _next_page(a: argparse.Namespace, token: str) -> None:
    """Where a listing goes on: the same command with --page-token (its filters must stay)."""
    if token:
        again = without_option(a.command_line, "--page-token")
        command = shlex.join(["coinsctl", *again, "--page-token", token])
        console.print(f"next page: {command}")


def _kind_names(kinds: Any, prefix: str) -> dict[str, Any]:
    """An entry-kind enum's values by their names on the command line: `purchase`, `gift`..."""
    return {
        name.removeprefix(prefix).lower(): number
        for name, number in kinds.items()
        if number and name.startswith(prefix)
    }


KINDS = _kind_names(wallet_pb2.EntryKind, "ENTRY_KIND_")
DIAMOND_KINDS = _kind_names(payout_pb2.DiamondEntryKind, "DIAMOND_ENTRY_KIND_")


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
    p.add_argument("--since", type=parse_moment, help="from this time on (YYYY-MM-DD[THH:MM] UTC)")
    p.add_argument("--until", type=parse_moment, help="before this time (YYYY-MM-DD[THH:MM] UTC)")
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
    return shlex.join(["coinsctl", *without_option(given, "--after"), "--after", str(cursor)])


def _note(text: str) -> None:
    """A line about the command itself (not its output) on stderr."""
    print(f"coinsctl: {text}", file=sys.stderr, flush=True)


PERIODS = {
    "day": gifting_pb2.RANKING_PERIOD_DAY,
    "week": gifting_pb2.RANKING_PERIOD_WEEK,
    "all": gifting_pb2.RANKING_PERIOD_ALL_TIME,
}


def rankings(c: Clients, a: argparse.Namespace) -> None:
    response = c.gifting.ListCreatorRankings(
        gifting_pb2.ListCreatorRankingsRequest(period=PERIODS[a.period], page_size=a.limit),
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
            creator_id=a.creator, **_history_filters(a, DIAMOND_KINDS)
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
            creator_id=a.creator, diamonds=a.diamonds, method=METHODS[a.method]
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
    if a.method and not a.destination:  # never dropped: a withdrawal pays where asked, or not
        raise SystemExit(
            f"--method {a.method} goes with --destination (a one-off processor token); a "
            "registered payout method is paid with --method-id, or the default without either"
        )
    if a.destination:  # a one-off destination (processors' test tokens)
        request.method = METHODS[a.method or "paypal"]
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


KYC = {
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
            status=KYC[a.status],
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


AUDIT_MODES = {
    "full": ledger_audit_pb2.AUDIT_MODE_FULL,
    "incremental": ledger_audit_pb2.AUDIT_MODE_INCREMENTAL,
    "latest": ledger_audit_pb2.AUDIT_MODE_LATEST_REPORT,
}


def audit_ledger(c: Clients, a: argparse.Namespace) -> None:
    response = c.ledger_audit(a.service).AuditLedger(
        ledger_audit_pb2.AuditLedgerRequest(mode=AUDIT_MODES[a.mode]),
        timeout=max(c.timeout, 600.0),  # a full audit of a large ledger takes minutes
    )
    console.print(render.ledger_audit(a.service, response))
    if not response.ok:
        raise SystemExit(1)


CLASSIFICATIONS = {
    "personal": wallet_pb2.ACCOUNT_CLASSIFICATION_PERSONAL,
    "government": wallet_pb2.ACCOUNT_CLASSIFICATION_GOVERNMENT,
    "political": wallet_pb2.ACCOUNT_CLASSIFICATION_POLITICAL,
}


def classify(c: Clients, a: argparse.Namespace) -> None:
    response = c.wallet.SetAccountClassification(
        wallet_pb2.SetAccountClassificationRequest(
            request_id=_rid(a),
            user_id=a.user,
            classification=CLASSIFICATIONS[a.classification],
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
            goal=GOALS[a.goal],
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


def without_option(arguments: list[str], option: str) -> list[str]:
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


def most_at_once(request: type[Message]) -> int:
    """The most rows a listing returns at once: its `page_size` rule in the proto (`lte`)."""
    field = request.DESCRIPTOR.fields_by_name["page_size"]
    rules = field.GetOptions().Extensions[validate_pb2.field]
    if not rules.int32.HasField("lte"):
        raise TypeError(f"{request.DESCRIPTOR.full_name}.page_size has no upper bound")
    return int(rules.int32.lte)
