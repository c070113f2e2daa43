"""Random sequences of purchases, refunds, chargebacks, debits, holds, captures and releases on the
wallet's domain, checked after every step against a model and against the ledger's audit:

- balances equal the sum of entries and the grand total is zero;
- held amounts equal what active holds reserve, and a hold resolves exactly once;
- no account but a clawback debt ever goes below zero;
- a frozen account spends nothing until purchases have paid its debt off;
- every user's (balance, available, debt, frozen) is what the model says.

Driven directly against a real database of the session's backend (no gRPC: hypothesis runs many
hundreds of steps), with the wallet's own migrations and domain code.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ledger import Ledger
from runtime.clock import FixedClock
from runtime.db import Database
from runtime.errors import FailedPrecondition
from services.wallet import storage
from services.wallet.domain import Coins, DebitRequest, Wallet
from services.wallet.settings import WalletSettings
from tests.helpers import run_state_machine

SERVICES = Path(__file__).resolve().parents[1] / "services"
START = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


@dataclass
class UserModel:
    balance: int = 0
    debt: int = 0
    holds: dict[str, list[int]] = field(default_factory=dict)
    """Active holds: id -> [amount, captured]."""

    @property
    def held(self) -> int:
        return sum(amount - captured for amount, captured in self.holds.values())

    @property
    def frozen(self) -> bool:
        return self.debt > 0

    @property
    def spendable(self) -> int:
        return 0 if self.frozen else self.balance - self.held


class WalletMachine(RuleBasedStateMachine):
    db: Database
    run: Callable[[Coroutine[Any, Any, Any]], Any]

    def __init__(self) -> None:
        super().__init__()
        self.clock = FixedClock(START)
        self.wallet = Wallet(WalletSettings(), Ledger(self.clock, unit="coins"))
        self.users = [f"seq-{uuid.uuid4().hex[:10]}" for _ in range(2)]
        self.model = {user: UserModel() for user in self.users}
        self.purchases: list[tuple[storage.PurchaseRecord, bool]] = []  # (purchase, reversed)
        for user in self.users:
            self.run(self._open(user))

    async def _open(self, user: str) -> None:
        async with self.db.transaction() as conn:
            await self.wallet.open_account(conn, user, "US", dt.date(1990, 1, 1), self.clock.now())

    async def _buy(self, user: str, coins: int) -> storage.PurchaseRecord:
        now = self.clock.now()
        purchase = storage.PurchaseRecord(
            purchase_id=uuid.uuid4().hex,
            user_id=user,
            package_id="custom",
            region="US",
            channel="web",
            coins=coins,
            price_minor=coins,
            currency_code="USD",
            payment_token="tok_visa",
            status="completed",
            provider_transaction_id=f"sbx_{uuid.uuid4().hex}",
            created_at=now,
            updated_at=now,
        )
        async with self.db.transaction() as conn:
            await storage.insert_purchase(conn, purchase)
            await self.wallet.credit_purchase(conn, purchase, f"buy:{purchase.purchase_id}")
        return purchase

    async def _in_transaction(self, work: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        async with self.db.transaction() as conn:
            return await work(conn)

    @rule(user=st.integers(0, 1), coins=st.integers(1, 400))
    def buy(self, user: int, coins: int) -> None:
        name = self.users[user]
        self.purchases.append((self.run(self._buy(name, coins)), False))
        m = self.model[name]
        m.balance += coins
        if m.frozen:
            paid = min(m.debt, m.balance - m.held)
            m.balance -= paid
            m.debt -= paid

    @precondition(lambda self: any(not done for _, done in self.purchases))
    @rule(data=st.data(), chargeback=st.booleans())
    def reverse(self, data: st.DataObject, chargeback: bool) -> None:
        open_ = [i for i, (_, done) in enumerate(self.purchases) if not done]
        index = open_[data.draw(st.integers(0, len(open_) - 1))]
        purchase, _ = self.purchases[index]
        kind, status = ("chargeback", "charged_back") if chargeback else ("refund", "refunded")

        async def work(conn: Any) -> Coins:
            assert await storage.reverse_purchase(conn, purchase.purchase_id, status, START)
            return await self.wallet.reverse_purchase(conn, purchase, kind, uuid.uuid4().hex)

        self.run(self._in_transaction(work))
        self.purchases[index] = (purchase, True)
        m = self.model[purchase.user_id]
        taken = min(purchase.coins, m.balance - m.held)
        m.balance -= taken
        m.debt += purchase.coins - taken

    @rule(user=st.integers(0, 1), coins=st.integers(1, 300))
    def debit(self, user: int, coins: int) -> None:
        name = self.users[user]
        m = self.model[name]

        async def work(conn: Any) -> Any:
            return await self.wallet.debit(
                conn,
                DebitRequest(
                    user_id=name,
                    coins=coins,
                    reason="gift",
                    reference="r",
                    request_id=uuid.uuid4().hex,
                    caller="gifting",
                ),
            )

        try:
            self.run(self._in_transaction(work))
        except FailedPrecondition as error:
            expected = "ACCOUNT_FROZEN" if m.frozen else "INSUFFICIENT_FUNDS"
            assert coins > m.spendable and error.reason == expected, error
            return
        assert coins <= m.spendable, "a debit spent held, owed or missing coins"
        m.balance -= coins

    @rule(user=st.integers(0, 1), coins=st.integers(1, 300))
    def place(self, user: int, coins: int) -> None:
        name = self.users[user]
        m = self.model[name]

        async def work(conn: Any) -> Any:
            return await self.wallet.place_hold(
                conn,
                user_id=name,
                coins=coins,
                reason="promotion",
                reference="p",
                owner="promotion",
                expire_after=None,
            )

        try:
            hold = self.run(self._in_transaction(work))
        except FailedPrecondition as error:
            assert coins > m.spendable, error
            return
        assert coins <= m.spendable, "a hold reserved held, owed or missing coins"
        m.holds[hold.hold_id] = [coins, 0]

    def _pick_hold(self, data: st.DataObject) -> tuple[str, str]:
        active = [(u, h) for u in self.users for h in self.model[u].holds]
        return active[data.draw(st.integers(0, len(active) - 1))]

    @precondition(lambda self: any(m.holds for m in self.model.values()))
    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        user, hold_id = self._pick_hold(data)
        amount, captured = self.model[user].holds[hold_id]
        coins = data.draw(st.integers(1, amount - captured))

        async def work(conn: Any) -> Any:
            return await self.wallet.holds.capture(
                conn, hold_id, coins, owner="promotion", request_id=uuid.uuid4().hex, caller="p"
            )

        hold, _ = self.run(self._in_transaction(work))
        m = self.model[user]
        m.balance -= coins
        if hold.status == "captured":
            del m.holds[hold_id]
        else:
            m.holds[hold_id][1] += coins

    @precondition(lambda self: any(m.holds for m in self.model.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        user, hold_id = self._pick_hold(data)

        async def work(conn: Any) -> Any:
            return await self.wallet.holds.release(conn, hold_id, owner="promotion")

        assert self.run(self._in_transaction(work)).status == "released"
        del self.model[user].holds[hold_id]
        try:
            self.run(self._in_transaction(work))
            raise AssertionError("a hold was released twice")
        except FailedPrecondition as error:
            assert error.reason == "HOLD_RELEASED"

    @invariant()
    def books_and_model_agree(self) -> None:
        async def check() -> None:
            async with self.db.read() as conn:
                report = await self.wallet.ledger.audit(conn)
                assert report.ok, report
                for user in self.users:
                    m = self.model[user]
                    assert await self.wallet.coins(conn, user) == Coins(
                        m.balance, m.spendable, m.debt, m.frozen
                    ), user

        self.run(check())


def test_random_wallet_sequences_keep_the_books_exact(backend: str, tmp_path: Path) -> None:
    """The machine runs on a database of its own and on an event loop of its own (hypothesis
    drives synchronous steps; each step runs the wallet's coroutines to completion)."""
    run_state_machine(WalletMachine, backend, tmp_path, max_examples=8, steps=30)
