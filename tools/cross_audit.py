"""The cross-service audit: do the four services' books tell one story?

Each service keeps its own database and only its own; this job (an operator's, with read access to
each) reads all of them and checks, gift by gift and promotion by promotion:

- every gift gifting recorded as sent was debited once in the wallet (kind `gift`, referenced by the
  gift's id, the same coins from the same sender), and the wallet debited no gift gifting does not know;
- every sent gift was credited once in payout (`gift_credits`, the same creator and coins), unless its
  credit is still on its way in gifting's outbox, and payout credited no gift gifting does not know;
- every promotion's spend in the wallet (captures of its hold, or the debit that paid it up front)
  equals what the promotion service counts (`spent_coins`, or the budget for a debit-paid one).

Usage: `python -m tools.cross_audit` with the services' usual <SVC>_DATABASE_URL variables (or their
SQLite defaults under <SVC>_DATA_DIR). It prints a JSON report and exits 1 when anything differs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text

from runtime.db import Database
from services.gifting.settings import GiftingSettings
from services.payout.settings import PayoutSettings
from services.promotion.settings import PromotionSettings
from services.wallet.settings import WalletSettings

_SENT_GIFTS = "SELECT sent_gift_id, sender_id, creator_id, coins, status FROM sent_gifts"
_IN_FLIGHT = "SELECT sent_gift_id FROM credit_outbox WHERE delivered_at IS NULL"
_GIFT_DEBITS = (
    "SELECT t.reference, e.account_id, -e.amount FROM ledger_transactions t "
    "JOIN ledger_entries e ON e.transaction_id = t.transaction_id "
    "WHERE t.kind = 'gift' AND e.account_id LIKE 'user:%'"
)
_GIFT_CREDITS = "SELECT credit_key, creator_id, coins FROM gift_credits"
_PROMOTION_SPEND = (
    "SELECT t.reference, sum(e.amount) FROM ledger_transactions t "
    "JOIN ledger_entries e ON e.transaction_id = t.transaction_id "
    "WHERE t.kind = 'promotion' AND e.account_id = 'system:promotion_spend' GROUP BY t.reference"
)
_PROMOTIONS = "SELECT promotion_id, funding, status, budget_coins, spent_coins FROM promotions"


@dataclass
class Report:
    gifts_checked: int = 0
    promotions_checked: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)
    """One entry per difference: what, and the ids and amounts involved."""
    in_flight: list[str] = field(default_factory=list)
    """Gifts whose credit is still in gifting's outbox (not a difference, yet)."""

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


async def cross_audit(urls: dict[str, str]) -> Report:
    """Compare the books of the services whose database URLs are given (wallet, gifting, payout,
    promotion)."""
    report = Report()
    gifts = {
        str(g[0]): (str(g[1]), str(g[2]), int(g[3]), str(g[4]))
        for g in await _rows(urls["gifting"], _SENT_GIFTS)
    }
    sent = {gift_id: g for gift_id, g in gifts.items() if g[3] == "debited"}
    report.gifts_checked = len(sent)
    debits: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for reference, account, coins in await _rows(urls["wallet"], _GIFT_DEBITS):
        debits[str(reference)].append((str(account).removeprefix("user:"), int(coins)))
    for gift_id, (sender, _, coins, _) in sent.items():
        found = debits.get(gift_id, [])
        if found != [(sender, coins)]:
            report.differ(
                "gift sent but not debited once",
                sent_gift_id=gift_id,
                expected=[sender, coins],
                wallet=found,
            )
    for gift_id, found in debits.items():
        if gift_id not in sent:
            status = gifts[gift_id][3] if gift_id in gifts else "unknown to gifting"
            report.differ(
                "wallet debited a gift gifting did not send",
                sent_gift_id=gift_id,
                gifting_status=status,
                wallet=found,
            )
    in_flight = {str(r[0]) for r in await _rows(urls["gifting"], _IN_FLIGHT)}
    credits: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, creator, coins in await _rows(urls["payout"], _GIFT_CREDITS):
        credits[str(key).rsplit("/gift:", 1)[-1]].append((str(creator), int(coins)))
    for gift_id, (_, creator, coins, _) in sent.items():
        if gift_id in in_flight:
            report.in_flight.append(gift_id)
        elif credits.get(gift_id) != [(creator, coins)]:
            report.differ(
                "gift sent but not credited once",
                sent_gift_id=gift_id,
                expected=[creator, coins],
                payout=credits.get(gift_id, []),
            )
    for gift_id, found in credits.items():
        if gift_id not in sent:
            report.differ(
                "payout credited a gift gifting did not send", sent_gift_id=gift_id, payout=found
            )
    spend = {str(r[0]): int(r[1]) for r in await _rows(urls["wallet"], _PROMOTION_SPEND)}
    for promotion_id, funding, status, budget, spent in await _rows(urls["promotion"], _PROMOTIONS):
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
    return report


def _urls() -> dict[str, str]:
    settings = {
        "wallet": WalletSettings(),
        "gifting": GiftingSettings(),
        "payout": PayoutSettings(),
        "promotion": PromotionSettings(),
    }
    return {name: s.resolved_database_url() for name, s in settings.items()}


def main() -> int:
    report = asyncio.run(cross_audit(_urls()))
    print(json.dumps({"ok": report.ok, **asdict(report)}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
