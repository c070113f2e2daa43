"""coinsctl's command line: every command, its options and their limits (read from the protos'
validation rules, so the command line refuses what the service would)."""

from __future__ import annotations

import argparse
import datetime as dt
import math
from collections.abc import Callable

from google.protobuf.message import Message

from buf.validate import validate_pb2
from cli.client import Clients, default_address
from cli.commands import (
    AUDIT_MODES,
    CHANNELS,
    CLASSIFICATIONS,
    DIAMOND_KINDS,
    GOALS,
    KINDS,
    KYC,
    METHODS,
    PERIODS,
    Command,
    add_bank,
    add_history_filters,
    add_paypal,
    audit_ledger,
    balance,
    buy,
    cancel_withdrawal,
    classify,
    creator_gifters,
    default_method,
    deliver,
    demo,
    diamond_ledger,
    diamonds,
    end_promotion,
    gifts,
    ledger,
    list_promotions,
    live_end,
    live_gifts,
    live_show,
    live_start,
    live_watch,
    methods,
    most_at_once,
    open_account,
    packages,
    parked_credits,
    parse_date,
    parse_moment,
    promote,
    quote,
    rankings,
    reconcile,
    redeliver_credits,
    remove_method,
    retry_withdrawal,
    revenue,
    review,
    review_queue,
    send_gift,
    show_account,
    show_promotion,
    statement,
    token,
    top,
    verify,
    withdraw,
    withdrawal,
    withdrawals,
)
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.config import SUITE_PLACES


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


REQUEST_ID_HELP = (
    "a changing command's idempotency key: repeat one to retry it safely (reads ignore it)"
)


def _anywhere() -> argparse.ArgumentParser:
    """--request-id, --as and --admin, accepted after the subcommand too (they override the ones
    given before it)."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--request-id",
        help=REQUEST_ID_HELP,
    )
    common.add_argument("--as", dest="acting_user", metavar="USER", help="act for USER")
    common.add_argument("--admin", action="store_true", help="mint tokens with the admin role")
    return common


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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinsctl", description=__doc__, formatter_class=_Help)
    anywhere = _anywhere()
    for service in SUITE_PLACES:
        parser.add_argument(
            f"--{service}",
            default=default_address(service),
            metavar="HOST:PORT",
            help=f"{service} address (COINS_{service.upper()}_ADDRESS)",
        )
    parser.add_argument(
        "--request-id",
        help=REQUEST_ID_HELP,
    )
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
    p.add_argument("--birth-date", type=parse_date, default=dt.date(1995, 1, 1), help="YYYY-MM-DD")
    command("account", show_account, "show an account").add_argument("user")
    p = command("packages", packages, "list the coin packages a user can buy")
    p.add_argument("user")
    p.add_argument(
        "--channel",
        choices=sorted(CHANNELS),
        default="web",
        help="where the coins are bought (prices differ)",
    )
    p = command("buy", buy, "buy a coin package, or a custom amount (sandbox payment)")
    p.add_argument("user")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("package", nargs="?", help="a package id (coinsctl packages USER lists them)")
    what.add_argument(
        "--coins",
        type=int,
        metavar="N",
        help="a custom number of coins instead of a package, at the region's web rate "
        "(WALLET_CUSTOM_MIN_COINS to WALLET_CUSTOM_MAX_COINS)",
    )
    p.add_argument(
        "--token",
        help="sandbox payment token (default: tok_visa_USER, the user's own card: the wallet "
        "limits spending per card and day); tok_decline declines",
    )
    command("balance", balance, "show a user's coins").add_argument("user")
    p = command("ledger", ledger, "show a user's ledger history")
    p.add_argument("user")
    add_limit(p, wallet_pb2.ListLedgerEntriesRequest, default=20)
    add_history_filters(p, KINDS)
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
    p.add_argument("--period", choices=sorted(PERIODS), default="day", help="default: %(default)s")
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
    add_history_filters(p, DIAMOND_KINDS)
    p = command(
        "statement", statement, "opening and closing balance of a period, movements by kind"
    )
    p.add_argument("owner", help="the viewer (coins) or, with --diamonds, the creator")
    p.add_argument("--diamonds", action="store_true", help="the creator's diamonds")
    p.add_argument(
        "--since",
        type=parse_moment,
        help="YYYY-MM-DD[THH:MM] UTC, or with an offset (default: the beginning)",
    )
    p.add_argument(
        "--until",
        type=parse_moment,
        help="YYYY-MM-DD[THH:MM] UTC, or with an offset (default: now)",
    )
    p = command("quote", quote, "what a withdrawal of some diamonds would pay")
    p.add_argument("creator")
    p.add_argument("diamonds", type=int)
    p.add_argument(
        "--method", choices=sorted(METHODS), default="paypal", help="how the withdrawal is paid"
    )
    p = command("withdraw", withdraw, "withdraw diamonds as cash, to the default payout method")
    p.add_argument("creator")
    p.add_argument("diamonds", type=int)
    p.add_argument("--method-id", help="another registered payout method (see `methods`)")
    p.add_argument(
        "--destination",
        help="a one-off processor token instead of a registered method (dest_fail… fails)",
    )
    p.add_argument("--method", choices=sorted(METHODS), help="with --destination (default paypal)")
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
        "--status", choices=sorted(KYC), default="verified", help="the KYC status to set"
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
        choices=sorted(AUDIT_MODES),
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
    p.add_argument("classification", choices=sorted(CLASSIFICATIONS))
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
        type=parse_moment,
        help="YYYY-MM-DD[THH:MM] UTC, or with an offset (instead of --days)",
    )
    p.add_argument(
        "--until",
        type=parse_moment,
        help="YYYY-MM-DD[THH:MM] UTC, or with an offset (default: now)",
    )
    p = command("promote", promote, "promote a video with a coin budget")
    p.add_argument("user")
    p.add_argument("video")
    p.add_argument("budget", type=int)
    p.add_argument("--goal", choices=sorted(GOALS), default="views", help="what the promotion buys")
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
