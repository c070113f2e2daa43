"""The cross-service audit: do the four services' books tell one story?

Each service keeps its own database and only its own; this job (an operator's, with read access to
each) reads all of them and checks, gift by gift and promotion by promotion:

- every gift gifting recorded as sent was debited once in the wallet (kind `gift`, referenced by the
  gift's id, the same coins from the same sender), and the wallet debited no gift gifting does not know;
- every sent gift was credited once in payout (`gift_credits`, the same creator and coins), unless its
  credit is still on its way in gifting's outbox, and payout credited no gift gifting does not know;
- every promotion's spend in the wallet (captures of its hold, or the debit that paid it up front)
  equals what the promotion service counts (`spent_coins`, or the budget for a debit-paid one);
- every gift credit's value adds up (coins x coin value = diamonds x diamond value + the platform's
  share, in millionths, exactly), and each creator's diamonds are what the policy gives for the
  coins they keep: floor(coins x rate) over each of their rate segments (a rate applies to the
  coins received while it is in force), the fraction carried from gift to gift, less the coins of
  gifts reversed since and the diamonds taken back with them;
- with the processor's payout items (the sandbox's file: the only processor today),
  every paid withdrawal was paid exactly once, for its net amount, and nothing else was paid: an
  item the processor failed or returned is no payment (a failed attempt and one successful resend
  are one payment), an item it paid for a withdrawal that gave its diamonds back (failed, returned,
  rejected, cancelled) is a difference, and so is a paid withdrawal whose items all failed.

Usage: `python -m tools.cross_audit` with the services' usual <SVC>_DATABASE_URL variables (or their
SQLite defaults under <SVC>_DATA_DIR); the sandbox processor's file (PAYOUT_SANDBOX_FILE) is read when
it exists. It prints a JSON report and exits 1 when anything differs, 2 when it cannot judge: a
service's settings are refused (one line per variable, as the service itself says), a SQLite file is
not there, a database has none of the services' tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from runtime.clock import utc
from runtime.db import Database
from runtime.outages import DatabaseRefused
from runtime.startup import settings_or_exit
from services.gifting.settings import GiftingSettings
from services.payout.processor import ItemStatus, outcome_of
from services.payout.sandbox import recorded_payments
from services.payout.settings import PayoutSettings
from services.payout.storage import NOT_COUNTED
from services.promotion.settings import PromotionSettings
from services.wallet.settings import WalletSettings

_SENT_GIFTS = (
    "SELECT sent_gift_id, sender_id, creator_id, coins, status, updated_at FROM sent_gifts"
)
_IN_FLIGHT = "SELECT sent_gift_id, dead FROM credit_outbox WHERE delivered_at IS NULL"
_GIFT_DEBITS = (
    "SELECT t.reference, e.account_id, -e.amount, t.created_at FROM ledger_transactions t "
    "JOIN ledger_entries e ON e.transaction_id = t.transaction_id "
    "WHERE t.kind = 'gift' AND e.account_id LIKE 'user:%'"
)
_GIFT_CREDITS = "SELECT credit_key, creator_id, coins, created_at FROM gift_credits"
_PROMOTION_SPEND = (
    "SELECT t.reference, sum(e.amount), max(t.created_at) FROM ledger_transactions t "
    "JOIN ledger_entries e ON e.transaction_id = t.transaction_id "
    "WHERE t.kind = 'promotion' AND e.account_id = 'system:promotion_spend' GROUP BY t.reference"
)
_PROMOTIONS = (
    "SELECT promotion_id, funding, status, budget_coins, spent_coins, updated_at, "
    "(SELECT max(c.created_at) FROM pending_captures c "
    "WHERE c.promotion_id = promotions.promotion_id) FROM promotions"
)
_CREDIT_VALUES = (
    "SELECT credit_key, creator_id, coins, diamonds, rate_numerator, rate_denominator, "
    "coin_value_micros, diamond_value_micros, platform_micros, coalesce(reversed_coins, 0), "
    "reversed_diamonds, rate_segment FROM gift_credits "
    "ORDER BY creator_id, created_at, credit_key"
)
_WITHDRAWALS = "SELECT withdrawal_id, status, gross_minor - fee_minor, updated_at FROM withdrawals"
_SENT_STATUSES = ("processing", "paid", "failed", "returned")
"""Withdrawals that were sent to the processor (the only ones it may have items for)."""
_GIVEN_BACK = NOT_COUNTED
"""Withdrawals whose diamonds went back to the creator (failed, returned, rejected, cancelled): the
processor must not have paid them."""


@dataclass
class Report:
    gifts_checked: int = 0
    promotions_checked: int = 0
    credits_checked: int = 0
    creators_checked: int = 0
    creators_with_rate_changes: int = 0
    """Creators whose credits carry more than one rate (each run at one rate is checked on its own)."""
    withdrawals_checked: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)
    """One entry per difference: what, and the ids and amounts involved."""
    in_flight: list[str] = field(default_factory=list)
    """Gifts whose credit is still in gifting's outbox (not a difference, yet)."""
    recent: int = 0
    """Records changed after `settled_before` (gifts, debits, credits, promotions, withdrawals,
    processor items): still on their way between services, left for the next run."""
    parked: list[str] = field(default_factory=list)
    """Of those, the gifts whose credit payout refused for good, parked for an operator: owed, in
    the books, but going nowhere until someone looks (ListParkedCredits, RedeliverParkedCredits)."""

    @property
    def ok(self) -> bool:
        return not self.differences

    def differ(self, what: str, **facts: Any) -> None:
        self.differences.append({"what": what, **facts})


async def _rows(url: str, query: str) -> Sequence[Any]:
    db = Database(url)
    try:
        async with db.read() as conn:
            return (await conn.execute(text(query))).all()
    finally:
        await db.close()


ProcessorItems = Mapping[str, Sequence[ItemStatus | int]]
"""The processor's items: sender item id (the withdrawal id) -> each item it created for it, in
order, as it has them now (`ItemStatus`: amount and status), or its amount alone for a payment known
to have been made (an export of payments)."""


async def cross_audit(
    urls: dict[str, str],
    processor_items: ProcessorItems | None = None,
    *,
    settled_before: dt.datetime | None = None,
) -> Report:
    """Compare the books of the services whose database URLs are given (wallet, gifting, payout,
    promotion); and payout's withdrawals with `processor_items` when given.

    The databases are read one after another, so while the suite serves, a gift recorded between
    two reads is in one and not the other. With `settled_before`, what changed at or after it is
    not judged (counted in `recent`): run against live traffic, a cut-off a minute back compares
    only what has had time to settle everywhere (each read comes after the cut-off)."""
    report = Report()

    def recent(at: Any) -> bool:
        if settled_before is None or at is None or utc(at) < settled_before:
            return False
        report.recent += 1
        return True

    gift_rows = await _rows(urls["gifting"], _SENT_GIFTS)
    gifts = {str(g[0]): (str(g[1]), str(g[2]), int(g[3]), str(g[4])) for g in gift_rows}
    changed = {str(g[0]) for g in gift_rows if recent(g[5])}
    sent = {
        gift_id: g
        for gift_id, g in gifts.items()
        if g[3] in ("debited", "reversed") and gift_id not in changed
    }
    report.gifts_checked = len(sent)
    debits: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for reference, account, coins, at in await _rows(urls["wallet"], _GIFT_DEBITS):
        if str(reference) in changed or recent(at):
            changed.add(str(reference))
            continue
        debits[str(reference)].append((str(account).removeprefix("user:"), int(coins)))
    for gift_id, (sender, _, coins, _) in sent.items():
        found = debits.get(gift_id, [])
        if gift_id not in changed and found != [(sender, coins)]:
            report.differ(
                "gift sent but not debited once",
                sent_gift_id=gift_id,
                expected=[sender, coins],
                wallet=found,
            )
    for gift_id, found in debits.items():
        if gift_id not in sent and gift_id not in changed:
            status = gifts[gift_id][3] if gift_id in gifts else "unknown to gifting"
            report.differ(
                "wallet debited a gift gifting did not send",
                sent_gift_id=gift_id,
                gifting_status=status,
                wallet=found,
            )
    outbox = await _rows(urls["gifting"], _IN_FLIGHT)
    in_flight = {str(r[0]) for r in outbox}
    report.parked = sorted(str(r[0]) for r in outbox if r[1])
    credits: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, creator, coins, at in await _rows(urls["payout"], _GIFT_CREDITS):
        gift_id = str(key).rsplit("/gift:", 1)[-1]
        if gift_id in changed or recent(at):
            changed.add(gift_id)
            continue
        credits[gift_id].append((str(creator), int(coins)))
    for gift_id, (_, creator, coins, _) in sent.items():
        if gift_id in in_flight:
            report.in_flight.append(gift_id)
        elif gift_id not in changed and credits.get(gift_id) != [(creator, coins)]:
            report.differ(
                "gift sent but not credited once",
                sent_gift_id=gift_id,
                expected=[creator, coins],
                payout=credits.get(gift_id, []),
            )
    for gift_id, found in credits.items():
        if gift_id not in sent and gift_id not in changed:
            report.differ(
                "payout credited a gift gifting did not send", sent_gift_id=gift_id, payout=found
            )
    spend_rows = await _rows(urls["wallet"], _PROMOTION_SPEND)
    spend = {str(r[0]): int(r[1]) for r in spend_rows}
    spent_lately = {str(r[0]) for r in spend_rows if recent(r[2])}
    for row in await _rows(urls["promotion"], _PROMOTIONS):
        promotion_id, funding, status, budget, spent, at, last_report_pending = row
        if recent(at) or recent(last_report_pending) or str(promotion_id) in spent_lately:
            continue  # a delivery report or its end on its way between the two services
        report.promotions_checked += 1
        expected = (
            0
            if status in ("pending", "rejected")
            else (int(spent) if funding == "hold" else int(budget))
        )
        if spend.get(str(promotion_id), 0) != expected:
            report.differ(
                "promotion spend differs from the wallet's",
                promotion_id=str(promotion_id),
                promotion=expected,
                wallet=spend.get(str(promotion_id), 0),
            )
    await _check_diamonds(report, urls["payout"])
    if processor_items is not None:
        await _check_payouts(report, urls["payout"], processor_items, recent)
    return report


async def _check_diamonds(report: Report, payout_url: str) -> None:
    # Per creator, the rate segments: each converts the coins received while its rate is in force
    # (payout's `policy.segment_for`), so its diamonds are floor(its coins x its rate), the fraction
    # carried from gift to gift. Numbered segments (migration 0033) are payout's own; credits of the
    # rule before (-1, or none: a database not migrated yet) are runs at one rate in the order they
    # were applied. A reversal takes a gift's coins off its segment with the diamonds it took back
    # (`reversed_coins` 0: reversed by its own share, the old rule: its coins stay in the run).
    runs: dict[str, list[list[int]]] = defaultdict(list)  # creator -> [[num, den, coins, diamonds]]
    numbered: dict[tuple[str, int], list[int]] = {}
    legacy: dict[str, list[int]] = {}  # each creator's last run of credits before segments
    for row in await _rows(payout_url, _CREDIT_VALUES):
        key, creator, coins, diamonds, num, den, coin_value, diamond_value, platform = row[:9]
        coins_off = int(row[9])
        diamonds_off = int(row[10]) if coins_off else 0
        segment = -1 if row[11] is None else int(row[11])
        report.credits_checked += 1
        if int(coins) * int(coin_value) != int(diamonds) * int(diamond_value) + int(platform):
            report.differ(
                "gift credit's value does not add up",
                credit_key=str(key),
                coins=int(coins),
                diamonds=int(diamonds),
                coin_value_micros=int(coin_value),
                diamond_value_micros=int(diamond_value),
                platform_micros=int(platform),
            )
        creator_runs = runs[str(creator)]
        if segment >= 0 and (str(creator), segment) in numbered:
            run = numbered[(str(creator), segment)]
        elif segment < 0 and legacy.get(str(creator), [0, 0])[:2] == [int(num), int(den)]:
            # Old-rule credits all committed before any numbered one (migration 0033 refuses older
            # payouts): a numbered credit dated among them (a clock ahead) does not end their run.
            run = legacy[str(creator)]
        else:
            run = [int(num), int(den), 0, 0]
            creator_runs.append(run)
            if segment >= 0:
                numbered[(str(creator), segment)] = run
            else:
                legacy[str(creator)] = run
        run[2] += int(coins) - coins_off
        run[3] += int(diamonds) - diamonds_off
    for creator, creator_runs in runs.items():
        report.creators_checked += 1
        if len(creator_runs) > 1:
            report.creators_with_rate_changes += 1
        for num, den, coins, diamonds in creator_runs:
            if diamonds != coins * num // den:
                report.differ(
                    "creator's diamonds differ from the policy in force",
                    creator_id=creator,
                    coins=coins,
                    diamonds=diamonds,
                    policy=coins * num // den,
                    rate=f"{num}/{den}",
                )


def _outcome(item: ItemStatus | int) -> tuple[int, str, str | None]:
    """(amount, the processor's status, our outcome: "paid", "failed", "returned", None while in
    flight) of an item; an amount alone was paid."""
    if isinstance(item, int):
        return item, "SUCCESS", "paid"
    return item.amount_minor, item.status, outcome_of(item)


async def _check_payouts(
    report: Report,
    payout_url: str,
    items: ProcessorItems,
    recent: Callable[[Any], bool],
) -> None:
    """Each withdrawal against the items the processor has for it. An item the processor failed or
    returned moved no money; one still in flight (pending, unclaimed, on hold) may yet, so it counts
    as a payment wherever one more would be too many, and is normal for a withdrawal still in flight
    here. A withdrawal or item changed lately (`recent`) is not judged."""
    rows = await _rows(payout_url, _WITHDRAWALS)
    withdrawals = {str(w[0]): (str(w[1]), int(w[2])) for w in rows}
    changed = {str(w[0]) for w in rows if recent(w[3])}
    changed |= {
        withdrawal_id
        for withdrawal_id, found in items.items()
        if any(not isinstance(i, int) and recent(i.updated_at) for i in found)
    }
    for withdrawal_id, (status, net) in withdrawals.items():
        if withdrawal_id in changed:
            continue
        report.withdrawals_checked += 1
        found = [_outcome(i) for i in items.get(withdrawal_id, [])]
        paid = [amount for amount, _, outcome in found if outcome == "paid"]
        pending = [amount for amount, _, outcome in found if outcome is None]
        facts = {
            "withdrawal_id": withdrawal_id,
            "status": status,
            "processor": [amount for amount, _, _ in found],
            "processor_status": [s for _, s, _ in found],
        }
        if status == "paid":
            if paid == [net] and not pending:
                continue
            what = (
                "withdrawal paid here, failed at the processor"
                if found and not paid and not pending
                else "withdrawal paid here, not paid once for its amount by the processor"
            )
            report.differ(what, net_minor=net, **facts)
        elif status in _GIVEN_BACK and paid:
            report.differ("processor paid a withdrawal payout failed", net_minor=net, **facts)
        elif len(paid) + len(pending) > 1:
            report.differ("withdrawal paid more than once by the processor", **facts)
        elif (paid or pending) and status not in _SENT_STATUSES:
            report.differ("processor paid a withdrawal never sent to it", **facts)
        elif pending and status in _GIVEN_BACK:
            report.differ("processor may still pay a withdrawal payout failed", **facts)
    for withdrawal_id, unknown in items.items():
        if withdrawal_id not in withdrawals and withdrawal_id not in changed:
            found = [_outcome(i) for i in unknown]
            report.differ(
                "processor paid a withdrawal payout does not know",
                withdrawal_id=withdrawal_id,
                processor=[amount for amount, _, _ in found],
                processor_status=[s for _, s, _ in found],
            )


def sandbox_items(
    path: Path, settings: PayoutSettings | None = None, now: dt.datetime | None = None
) -> dict[str, list[ItemStatus]]:
    """The sandbox processor's items from its file: sender item id -> each item created for it, in
    order, with its amount and its status as the sandbox answers at `now` (default: now). The
    sandbox stores no status (only what a test set): it follows from the receiver and the item's
    age under the payout service's `settings` (default: PayoutSettings() from the environment)."""
    found: dict[str, list[ItemStatus]] = defaultdict(list)
    for item in recorded_payments(
        path, settings or PayoutSettings(), now or dt.datetime.now(dt.UTC)
    ):
        found[item.sender_item_id].append(item)
    return dict(found)


def _urls() -> dict[str, str]:
    settings = {
        name: settings_or_exit(settings_type, name, code=2)
        for name, settings_type in (
            ("wallet", WalletSettings),
            ("gifting", GiftingSettings),
            ("payout", PayoutSettings),
            ("promotion", PromotionSettings),
        )
    }
    return {name: s.resolved_database_url() for name, s in settings.items()}


def _exit_unless_every_file_is_there(urls: Mapping[str, str]) -> None:
    """A SQLite database that is not there is another folder than the suite's (opening it would
    make an empty file, and a traceback about a missing table)."""
    missing = [
        f"{name}: no database at {path}"
        for name, url in urls.items()
        if make_url(url).get_backend_name() == "sqlite"
        and not (path := Path(make_url(url).database or "").resolve()).exists()
    ]
    if missing:
        print(
            "\n".join(missing)
            + "\nset COINS_DATA_DIR (or <SVC>_DATA_DIR / <SVC>_DATABASE_URL) as the suite runs "
            "with, relative to where it runs",
            file=sys.stderr,
        )
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.cross_audit",
        description="Check that the four services' books tell one story (gift by gift, promotion "
        "by promotion, credit by credit, creator by creator, and withdrawals against the payout "
        "processor's items); reads each service's database from its usual <SVC>_DATABASE_URL. "
        "Prints a JSON report; exits 1 if anything differs.",
    )
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=60.0,
        help="leave out what changed in the last N seconds (default 60): the databases are read "
        "one after another, so under traffic the newest records are in some and not yet in "
        "others; 0 judges everything (a quiet suite)",
    )
    settle = parser.parse_args(argv).settle_seconds
    now = dt.datetime.now(dt.UTC)
    payout = settings_or_exit(PayoutSettings, "payout", code=2)
    sandbox = payout.sandbox_file or payout.data_dir / "sandbox-payouts.sqlite3"
    items = sandbox_items(sandbox, payout, now) if Path(sandbox).exists() else None
    if items is None:
        print(
            f"the processor's items are not at {Path(sandbox).resolve()}: withdrawals are NOT "
            "checked (set PAYOUT_SANDBOX_FILE, or COINS_DATA_DIR / PAYOUT_DATA_DIR as the suite "
            "runs with, relative to where it runs)",
            file=sys.stderr,
        )
    cutoff = now - dt.timedelta(seconds=settle) if settle > 0 else None
    urls = _urls()
    _exit_unless_every_file_is_there(urls)
    try:
        report = asyncio.run(cross_audit(urls, items, settled_before=cutoff))
    except (DBAPIError, DatabaseRefused, OSError) as error:
        # A server that refuses us or cannot be reached, a database with none of our tables: the
        # books cannot be read, which is no difference in them (exit 2, not 1).
        text = str(error.orig) if isinstance(error, DBAPIError) else str(error) or repr(error)
        cause = re.sub(r"^<class '[\w.]+'>: ", "", text.strip()).splitlines()[0]
        print(
            f"cannot read the books: {cause}. Point <SVC>_DATABASE_URL (or COINS_DATA_DIR) at the "
            "suite's migrated databases, as the services run with",
            file=sys.stderr,
        )
        return 2
    print(
        json.dumps(
            {
                "ok": report.ok,
                **asdict(report),
                "processor_items": str(Path(sandbox).resolve()) if items is not None else None,
            },
            indent=2,
        )
    )
    if report.recent:
        print(
            f"{report.recent} records changed in the last {settle:g} s were left out (still on "
            "their way between services); --settle-seconds 0 judges them too, on a quiet suite",
            file=sys.stderr,
        )
    if report.parked:
        print(
            f"{len(report.parked)} gift credits are parked: payout refused them and they wait "
            "for an operator (gifting's ListParkedCredits says why; RedeliverParkedCredits "
            "sends them again once the cause is fixed)",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
