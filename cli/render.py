"""Rich tables for the suite's messages: what a person reads, not raw protobuf dumps."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.table import Table as RichTable
from rich.text import Text

from coins.common.v1 import ledger_audit_pb2, money_pb2
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2


class Table(RichTable):
    """A table whose cells wrap rather than cut: ids are meant to be copied into the next command
    (a promotion id cut to `a8cbcfc6…` cannot be)."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)


_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """`text` with its control characters written out (`\\x1b`): what a service holds is shown,
    never acted on by the terminal (a LIVE title with escape sequences cleared a viewer's screen and
    forged lines in it, a review). Line breaks stay: tables break cells with them."""
    return _CONTROLS.sub(lambda found: ascii(found.group())[1:-1], text)


class _Console(Console):
    """A console that shows every string it is given, table cells too, with `visible`."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(visible(text), **kwargs)


_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
"""A terminal's width, or COLUMNS; piped into a file or `grep`, wide enough that no table wraps
(rich would assume 80 columns)."""
console = _Console(soft_wrap=True, markup=False, emoji=False, width=_WIDTH)
"""soft_wrap: a long line (a command to copy) is never broken. No markup and no emoji codes: what a
service stores or a user types ("[b]Big[/b] night :x:") is shown as it is; styles are Text's."""
errors = _Console(stderr=True, soft_wrap=True, markup=False, emoji=False)
"""Refusals and unreachable services, on stderr: `coinsctl ... | grep` never swallows them (the exit
code is 1 either way)."""

_SYMBOLS = {"USD": "$", "GBP": "£", "EUR": "€"}


def coin_count(n: int) -> str:
    """`1 coin`, `2,500 coins`."""
    return f"{n:,} coin" if n == 1 else f"{n:,} coins"


def money(value: money_pb2.Money) -> str:
    whole, cents = divmod(value.amount_minor, 100)
    symbol = _SYMBOLS.get(value.currency_code)
    amount = f"{whole:,}.{cents:02d}"
    return f"{symbol}{amount}" if symbol else f"{amount} {value.currency_code}"


def enum_name(enum: object, value: int, prefix: str) -> str:
    name: str = enum.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix).lower().replace("_", " ")


def when(message: object) -> str:
    stamp = message.create_time  # type: ignore[attr-defined]
    return str(stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")) if stamp.seconds else ""


def account(acc: wallet_pb2.Account) -> Table:
    table = Table(title=f"Account {acc.user_id}", show_header=False)
    table.add_row("country", acc.country_code)
    table.add_row("currency", acc.currency_code)
    d = acc.birth_date
    table.add_row("birth date", f"{d.year:04d}-{d.month:02d}-{d.day:02d}")
    table.add_row("coins", f"{acc.balance.coins:,}")
    table.add_row(
        "classification",
        enum_name(wallet_pb2.AccountClassification, acc.classification, "ACCOUNT_CLASSIFICATION_"),
    )
    table.add_row("opened", when(acc))
    return table


def balance(user_id: str, value: wallet_pb2.Balance) -> Table:
    table = Table(title=f"Coins of {user_id}")
    table.add_column("coins", justify="right")
    table.add_column("available", justify="right")
    row = [f"{value.coins:,}", f"{value.available_coins:,}"]
    if value.debt_coins or value.frozen:
        table.add_column("owed", justify="right")
        table.add_column("state")
        row += [f"{value.debt_coins:,}", "frozen until paid" if value.frozen else "ok"]
    table.add_row(*row)
    return table


def packages(items: Iterable[wallet_pb2.CoinPackage]) -> Table:
    table = Table(title="Coin packages")
    for column, justify in (("package", "left"), ("coins", "right"), ("price", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("channel")
    for p in items:
        table.add_row(
            p.package_id,
            f"{p.coins:,}",
            money(p.price),
            enum_name(wallet_pb2.Channel, p.channel, "CHANNEL_"),
        )
    return table


def purchase(p: wallet_pb2.Purchase, after: wallet_pb2.Balance) -> Table:
    table = Table(title=f"Purchase {p.purchase_id}", show_header=False)
    table.add_row("package", p.package.package_id)
    table.add_row("coins", f"{p.package.coins:,}")
    table.add_row("paid", money(p.package.price))
    table.add_row("status", enum_name(wallet_pb2.PurchaseStatus, p.status, "PURCHASE_STATUS_"))
    table.add_row("balance after", f"{after.coins:,}")
    return table


def _when_2_lines(message: object) -> str:
    """Date above time: a narrow column, so the reference beside it stays whole in 80 columns."""
    return when(message).replace(" ", "\n", 1)


def ledger(user_id: str, entries: Iterable[wallet_pb2.LedgerEntry]) -> Table:
    """Each entry on two lines: its kind above its reference (`gift:` + a 32-hex gift id, copied
    into the next command), which a fifth column folded in an 80-column terminal."""
    table = Table(title=f"Ledger of {user_id} (newest first)")
    table.add_column("when", no_wrap=True)
    table.add_column("coins", justify="right", no_wrap=True)
    table.add_column("balance", justify="right", no_wrap=True)
    table.add_column("kind / reference", no_wrap=True, min_width=37)
    for e in entries:
        colour = "green" if e.amount > 0 else "red"
        kind = enum_name(wallet_pb2.EntryKind, e.kind, "ENTRY_KIND_")
        table.add_row(
            _when_2_lines(e),
            Text(f"{e.amount:+,}", style=colour),
            f"{e.balance_after:,}",
            f"{kind}\n{e.reference}",
        )
    return table


def diamond_ledger(creator_id: str, entries: Iterable[payout_pb2.DiamondEntry]) -> Table:
    """As `ledger`: the kind and the bucket above the reference."""
    table = Table(title=f"Diamonds of {creator_id}, movements (newest first)")
    table.add_column("when", no_wrap=True)
    table.add_column("diamonds", justify="right", no_wrap=True)
    table.add_column("after", justify="right", no_wrap=True)
    table.add_column("kind, bucket / reference", no_wrap=True, min_width=37)
    for e in entries:
        colour = "green" if e.diamonds > 0 else "red"
        kind = enum_name(payout_pb2.DiamondEntryKind, e.kind, "DIAMOND_ENTRY_KIND_")
        bucket = enum_name(payout_pb2.DiamondBucket, e.bucket, "DIAMOND_BUCKET_")
        table.add_row(
            _when_2_lines(e),
            Text(f"{e.diamonds:+,}", style=colour),
            f"{e.balance_after:,}",
            f"{kind}, {bucket}\n{e.reference}",
        )
    return table


def statement(
    owner: str,
    unit: str,
    opening: int,
    closing: int,
    lines: Iterable[tuple[str, int, int, int]],
    period: tuple[str, str],
) -> Table:
    """A period statement: (kind, credited, debited, entries) per line."""
    table = Table(title=f"{unit.capitalize()} of {owner}, {period[0]} to {period[1]}")
    table.add_column("")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("entries", justify="right")
    table.add_row("opening balance", f"{opening:,}", "", "")
    for kind, credited, debited, count in lines:
        table.add_row(kind, f"{credited:,}", f"{debited:,}", f"{count:,}")
    table.add_row("closing balance", f"{closing:,}", "", "")
    return table


def payout_methods(creator_id: str, methods: Iterable[payout_pb2.PayoutMethodInfo]) -> Table:
    table = Table(title=f"Payout methods of {creator_id}")
    table.add_column("id")
    table.add_column("method")
    table.add_column("default")
    for m in methods:
        table.add_row(m.payout_method_id, m.display, "yes" if m.is_default else "")
    return table


def quote(creator_id: str, q: payout_pb2.QuoteWithdrawalResponse) -> Table:
    table = Table(title=f"Withdrawal quote for {creator_id}", show_header=False)
    table.add_row("diamonds taken", f"{q.diamonds:,}")
    table.add_row("gross", money(q.gross))
    table.add_row("fee", money(q.fee))
    table.add_row("net", money(q.net))
    table.add_row("available now", f"{q.available_diamonds:,}")
    table.add_row("verdict", q.refusal or "can be requested")
    return table


def gifts(items: Iterable[gifting_pb2.Gift]) -> Table:
    table = Table(title="Gift catalog")
    table.add_column("gift")
    table.add_column("name")
    table.add_column("coins", justify="right")
    table.add_column("streak")
    table.add_column("animation", justify="right")
    table.add_column("regions")
    table.add_column("version", justify="right")
    for g in items:
        table.add_row(
            g.gift_id,
            g.name,
            f"{g.coins:,}",
            "yes" if g.streakable else "",
            f"{g.animation_ms / 1000:g} s",
            ", ".join(g.regions) or "all",
            str(g.version),
        )
    return table


def sent_gift(response: gifting_pb2.SendGiftResponse) -> str:
    g = response.sent_gift
    where = f"LIVE {g.live_id}" if g.HasField("live_id") else f"video {g.video_id}"
    streak = f" (streak x{g.streak.count})" if g.HasField("streak") else ""
    return (
        f"{g.sender_id} sent {g.count} x {g.gift_id} ({coin_count(g.coins)}){streak} to {g.creator_id} "
        f"in {where}; sender has {coin_count(response.sender_balance_coins)} left"
    )


def top_gifters(
    live_id: str, items: Iterable[gifting_pb2.Gifter], *, scope: str = "LIVE "
) -> Table:
    table = Table(title=f"Top gifters of {scope}{live_id}")
    table.add_column("#", justify="right")
    table.add_column("viewer")
    table.add_column("coins", justify="right")
    for g in items:
        table.add_row(str(g.rank), g.user_id, f"{g.coins:,}")
    return table


def diamonds(value: payout_pb2.DiamondBalance) -> Table:
    table = Table(title=f"Diamonds of {value.creator_id}")
    table.add_column("pending", justify="right")
    table.add_column("available", justify="right")
    table.add_column("available worth", justify="right")
    table.add_column("withdrawing", justify="right")
    table.add_column("paid out", justify="right")
    table.add_column("owed", justify="right")
    table.add_column("next available", justify="right")
    upcoming = (
        value.next_available_time.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")
        if value.HasField("next_available_time")
        else "-"
    )
    table.add_row(
        f"{value.pending_diamonds:,}",
        f"{value.available_diamonds:,}",
        money(value.available_value),
        f"{value.held_diamonds:,}",
        f"{value.paid_out_diamonds:,}",
        # Owed back (reversed gifts, a late payment): later diamonds repay it before any withdrawal.
        Text(f"{value.debt_diamonds:,}", style="red") if value.debt_diamonds else "0",
        upcoming,
    )
    return table


def stamp(value: object) -> str:
    """A protobuf Timestamp as UTC date and time; "" when unset."""
    if not value.seconds:  # type: ignore[attr-defined]
        return ""
    return str(value.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"))  # type: ignore[attr-defined]


def withdrawal_status(status: int) -> str:
    return enum_name(payout_pb2.WithdrawalStatus, status, "WITHDRAWAL_STATUS_")


def withdrawal_event(event: payout_pb2.WithdrawalEvent) -> str:
    """A status change names the status it moved to; a parking or a retry says so (the status is
    the one the withdrawal stayed in, processing)."""
    if event.kind in (
        payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED,
        payout_pb2.WITHDRAWAL_EVENT_KIND_RETRIED,
    ):
        return enum_name(payout_pb2.WithdrawalEventKind, event.kind, "WITHDRAWAL_EVENT_KIND_")
    return withdrawal_status(event.status)


def withdrawal(w: payout_pb2.Withdrawal) -> Group:
    """A withdrawal, then its history (oldest first)."""
    table = Table(title="Withdrawal", show_header=False)
    table.add_row("id", w.withdrawal_id)
    table.add_row("creator", w.creator_id)
    table.add_row("diamonds", f"{w.diamonds:,}")
    table.add_row("gross", money(w.gross))
    table.add_row("fee", money(w.fee))
    table.add_row("net", money(w.net))
    table.add_row("method", enum_name(payout_pb2.PayoutMethod, w.method, "PAYOUT_METHOD_"))
    table.add_row("status", withdrawal_status(w.status))
    if w.failure_reason:
        table.add_row("failure", w.failure_reason)
    if w.processor_reference:
        table.add_row("processor item", w.processor_reference)
    if w.attempts or w.parked:
        parked = ", parked: waits for an admin (retry-withdrawal)" if w.parked else ""
        table.add_row("failed attempts", f"{w.attempts}{parked}")
    if w.last_error:
        table.add_row("last error", w.last_error)
    history = Table(title=f"History of withdrawal {w.withdrawal_id}")
    history.add_column("when", no_wrap=True)
    history.add_column("what", no_wrap=True)
    history.add_column("by")
    history.add_column("reason")
    for event in w.history:
        history.add_row(stamp(event.time), withdrawal_event(event), event.actor, event.reason)
    return Group(table, history) if w.history else Group(table)


def withdrawals(
    title: str,
    items: Iterable[payout_pb2.Withdrawal],
    *,
    creators: bool = True,
    errors: bool = False,
) -> Table:
    """Withdrawals, one a row, with their full ids (to pass to `withdrawal`, `review`, ...); the
    reasons are in each one's `withdrawal`, and with `errors` (the parked queue) the processor
    calls failed in a row and the last one's error are shown too."""
    table = Table(title=title)
    table.add_column("id", no_wrap=True, min_width=32)
    if creators:
        table.add_column("creator")
    table.add_column("requested")
    table.add_column("net", justify="right", no_wrap=True)
    table.add_column("status")
    if errors:
        table.add_column("tries", justify="right")
        table.add_column("last error")
    for w in items:
        status = "parked" if w.parked else withdrawal_status(w.status)  # parked: processing
        row = [w.withdrawal_id, w.creator_id] if creators else [w.withdrawal_id]
        failed: list[str | Text] = [f"{w.attempts}", Text(visible(w.last_error))] if errors else []
        table.add_row(*row, when(w), money(w.net), status, *failed)
    return table


def parked_credits(items: Iterable[gifting_pb2.ParkedCredit]) -> Table:
    """Parked gift credits, oldest first: each sent gift's full id (what `redeliver-credits`
    takes) on one line, its creator under it, and the refusal that parked it."""
    table = Table(title="Parked gift credits (oldest first)")
    table.add_column("sent gift / creator", no_wrap=True, min_width=32)
    table.add_column("coins", justify="right", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("last error")
    for credit in items:
        table.add_row(
            Text(f"{credit.sent_gift_id}\n{credit.creator_id}"),
            f"{credit.coins:,}",
            str(credit.attempts),
            credit.last_error,
        )
    return table


def _micros(value: int) -> str:
    """Millionths of a currency unit, shown exactly: 1234500 -> 1.234500."""
    sign = "-" if value < 0 else ""
    units, micros = divmod(abs(value), 1_000_000)
    return f"{sign}{units:,}.{micros:06d}"


def revenue(report: payout_pb2.GetRevenueReportResponse) -> Table:
    """The platform's revenue from gifts per UTC day, with the total. The currency is said once,
    in the title: seven columns of "1,222.214400 USD" do not fit 80 columns, and an amount folded
    onto two lines reads as two numbers."""
    rows = [
        (
            d.day,
            f"{d.gifts:,}",
            f"{d.coins:,}",
            f"{d.diamonds:,}",
            _micros(d.gifts_value_micros),
            _micros(d.creators_value_micros),
            _micros(d.platform_revenue_micros),
        )
        for d in [*report.days, report.total]
    ]
    table = Table(
        title=f"Revenue from gifts in {report.currency_code} (each gift at its own rates)"
    )
    names = ("day", "gifts", "coins", "diamonds", "gifts' value", "creators'", "platform")
    for i, name in enumerate(names):
        widest = max(len(row[i]) for row in rows)  # a header may wrap, a number never
        table.add_column(name, justify="left" if i == 0 else "right", min_width=widest)
    for row in rows:
        table.add_row(*row)
    return table


def mismatches(items: Iterable[payout_pb2.ReconciliationMismatch]) -> Table:
    """A reconciliation's mismatches (amounts in minor units), two lines each: our withdrawal,
    then the processor's item, so that both ids stay whole on a line in 80 columns (they are what
    an operator looks up)."""
    table = Table(title="Mismatches (ours, then the processor's)")
    table.add_column("mismatch")
    table.add_column("withdrawal / processor item", no_wrap=True, min_width=32)
    table.add_column("status", no_wrap=True)
    table.add_column("amount", justify="right", no_wrap=True)
    for m in items:
        ours = withdrawal_status(m.our_status) if m.our_status else "-"
        table.add_row(
            enum_name(payout_pb2.MismatchKind, m.kind, "MISMATCH_KIND_"),
            Text(f"{m.withdrawal_id or '-'}\n{m.processor_reference or '-'}"),
            Text(f"{ours}\n{m.processor_status.lower() or '-'}"),
            f"{m.our_amount_minor:,}\n{m.processor_amount_minor:,}",
        )
    return table


def promotion(p: promotion_pb2.Promotion) -> Table:
    table = Table(title=f"Promotion {p.promotion_id}", show_header=False)
    table.add_row("video", p.video_id)
    table.add_row("goal", enum_name(promotion_pb2.Goal, p.goal, "GOAL_"))
    table.add_row("budget", f"{p.budget_coins:,} coins")
    table.add_row("spent", f"{p.spent_coins:,} coins")
    if p.status == promotion_pb2.PROMOTION_STATUS_ACTIVE:
        table.add_row("held", f"{p.budget_coins - p.spent_coins:,} coins, until delivered or ended")
    table.add_row("days", str(p.duration_days))
    if p.end_time.seconds:
        ending = "ends" if p.status == promotion_pb2.PROMOTION_STATUS_ACTIVE else "ended"
        table.add_row(ending, p.end_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"))
    table.add_row("status", enum_name(promotion_pb2.PromotionStatus, p.status, "PROMOTION_STATUS_"))
    return table


def promotions(user_id: str, items: Iterable[promotion_pb2.Promotion]) -> Table:
    """A user's promotions, newest first, with their full ids (what the other commands take), each
    on one line in 80 columns: so the goal is left to `promotion ID`, and spent and budget share
    a column."""
    table = Table(title=f"Promotions of {user_id} (newest first)")
    table.add_column("promotion", no_wrap=True, min_width=32)
    table.add_column("video")
    table.add_column("spent / budget", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for p in items:
        table.add_row(
            p.promotion_id,
            p.video_id,
            f"{p.spent_coins:,} / {p.budget_coins:,}",
            enum_name(promotion_pb2.PromotionStatus, p.status, "PROMOTION_STATUS_"),
        )
    return table


def live(value: gifting_pb2.Live, summary: gifting_pb2.LiveSummary | None = None) -> Table:
    table = Table(title=f"LIVE {value.live_id}: {value.title}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("creator", value.creator_id)
    table.add_row("started", stamp(value.start_time))
    table.add_row("ended", stamp(value.end_time) if value.HasField("end_time") else "live now")
    table.add_row("gifts", "on" if value.gifts_enabled else "off")
    if summary is not None:
        table.add_row("coins received", f"{summary.coins_received:,}")
        table.add_row("diamonds earned", f"{summary.diamonds_earned:,} (as credited)")
        table.add_row("gifts sent", f"{summary.gifts_sent:,}")
        table.add_row("unique gifters", f"{summary.unique_gifters:,}")
        top = ", ".join(f"{g.rank}. {g.user_id} ({g.coins:,})" for g in summary.top_gifters)
        table.add_row("top gifters", top or "-")
        table.add_row("feed cursor", str(summary.last_cursor))
    return table


def live_event(event: gifting_pb2.WatchLiveResponse) -> str:
    at = event.time.ToDatetime().strftime("%H:%M:%S")
    if event.HasField("gift"):
        g = event.gift
        streak = f", streak x{g.streak_count}" if g.streak_count else ""
        return (
            f"#{event.cursor} {at} {g.sender_id} sent {g.count} x {g.gift_id} ({coin_count(g.coins)}"
            f"{streak})"
        )
    if event.HasField("streak_ended"):
        e = event.streak_ended
        return f"#{event.cursor} {at} {e.sender_id}'s {e.gift_id} streak ended at x{e.count}"
    s = event.ended.summary
    return (
        f"#{event.cursor} {at} the LIVE ended: {s.coins_received:,} coins from "
        f"{s.unique_gifters:,} gifters, {s.gifts_sent:,} gifts"
    )


def rankings(response: gifting_pb2.ListCreatorRankingsResponse) -> Table:
    table = Table(title=f"Creators by coins received, {response.period_key}")
    table.add_column("#", justify="right")
    table.add_column("creator")
    table.add_column("coins", justify="right")
    for c in response.creators:
        table.add_row(str(c.rank), c.creator_id, f"{c.coins:,}")
    return table


def ledger_audit(service: str, r: ledger_audit_pb2.AuditLedgerResponse) -> Group:
    """An audit's report: what it checked, then each finding by kind."""
    mode = enum_name(ledger_audit_pb2.AuditMode, r.mode, "AUDIT_MODE_").lower()
    found = (
        len(r.balance_differences)
        + len(r.held_differences)
        + len(r.negative_balances)
        + len(r.bad_transactions)
        + len(r.broken_chains)
    )
    lines: list[Any] = [
        Text(
            f"{service} ledger audit {r.run_id} ({mode}, {stamp(r.start_time)} to "
            f"{stamp(r.finish_time)}): {'OK' if r.ok else f'{found} FINDINGS'}; "
            f"{r.transactions_checked:,} transactions (every leg, by its digest), "
            f"{r.accounts_checked:,} account chains ({r.entries_checked:,} links) checked; "
            f"total {r.total:,}",
            style="green" if r.ok else "bold red",
        )
    ]
    for title, differences in (
        ("balance differs from its entries", r.balance_differences),
        ("held differs from its holds", r.held_differences),
        ("negative where it may not be", r.negative_balances),
    ):
        if differences:
            table = Table(title=title)
            for column in ("account", "kept", "recomputed"):
                table.add_column(column)
            for d in differences:
                table.add_row(d.account_id, f"{d.kept:,}", f"{d.recomputed:,}")
            lines.append(table)
    for title, findings in (
        ("transactions whose digest does not recompute", r.bad_transactions),
        ("accounts whose hash chain is broken", r.broken_chains),
    ):
        if findings:
            table = Table(title=title)
            table.add_column("id")
            table.add_column("problem")
            for f in findings:
                table.add_row(f.id, f.problem)
            lines.append(table)
    return Group(*lines)
