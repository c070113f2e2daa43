"""Wallet rules: who may buy what, and how coins move in the ledger. No gRPC, no protobuf here."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from ledger import Hold, Holds, Ledger, Posted, Posting
from ledger.history import HistoryEntry, Period, entries_page, period
from runtime import countries
from runtime.access import require_another_admin
from runtime.errors import (
    DEBIT_VOIDED,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    enum_name,
    request_id_reused,
)
from runtime.idempotency import AnsweredKey
from runtime.protos import money_text
from runtime.sql import Driver, Tx, as_tx
from services.wallet import storage
from services.wallet.settings import WalletSettings

COIN_SALES = "system:coin_sales"
RECIPIENTS_REMEMBERED = 100_000
"""Eligible recipients a wallet process remembers, so the gift path skips their lookup."""
MAX_AGE_YEARS = 130
"""A birth date further back is a typo (year 1, 1026), not a user."""
MAX_PACKAGE_PRICE_MINOR = 100_000_000
"""1,000,000.00 in the two-decimal currencies coins are sold in: a price above is a typo."""
SPEND_ACCOUNTS = {"gift": "system:gift_spend", "promotion": "system:promotion_spend"}


def _not_personal(
    user_id: str, party: storage.Party, reason: str, cannot: str
) -> FailedPrecondition | None:
    """Government and political accounts neither send nor receive gifts nor pay for promotions:
    `reason` and what they `cannot` do, or None for a person's account."""
    if party.classification == "personal":
        return None
    return FailedPrecondition(
        reason,
        f"user {user_id} is a {party.classification} account: government and political "
        f"accounts cannot {cannot}",
        user_id=user_id,
        classification=enum_name("ACCOUNT_CLASSIFICATION", party.classification),
    )


def user_account(user_id: str) -> str:
    """The ledger account that holds a user's coins."""
    return f"user:{user_id}"


def user_of(account_id: str) -> str:
    """The user whose coins a `user:` ledger account holds (a hold names its account)."""
    return account_id.removeprefix("user:")


def debt_account(user_id: str) -> str:
    """The ledger account that records what a user owes after a clawback (never positive)."""
    return f"debt:{user_id}"


@dataclass(frozen=True)
class Coins:
    """A user's coins as the API reports them."""

    balance: int
    available: int
    """What can be spent now: the balance less active holds, and nothing while frozen."""
    debt: int = 0
    frozen: bool = False


def age_on(birth_date: dt.date, day: dt.date) -> int:
    before_birthday = (day.month, day.day) < (birth_date.month, birth_date.day)
    return day.year - birth_date.year - before_birthday


@dataclass(frozen=True)
class DebitRequest:
    """Coins to take for a gift or a promotion (`reason`), under the ledger request id given."""

    user_id: str
    coins: int
    reason: str
    reference: str
    request_id: str
    caller: str
    recipient_id: str = ""
    """Who receives what the coins pay for (a gift's creator), when someone does."""
    offered_in: frozenset[str] = frozenset()
    """Countries where what the coins pay for is offered (a gift's regions); empty: everywhere."""

    def postings(self) -> list[Posting]:
        return [
            Posting(user_account(self.user_id), -self.coins),
            Posting(SPEND_ACCOUNTS[self.reason], self.coins),
        ]


def voided(request_id: str) -> FailedPrecondition:
    """The answer given to a debit or hold request that its caller reconciled before it arrived: it
    will never take effect (see ResolveDebit)."""
    return FailedPrecondition(
        DEBIT_VOIDED,
        "this request id was voided by a reconciliation: it will never take effect",
        request_id=request_id,
    )


@dataclass(frozen=True)
class Debit:
    transaction_id: str
    balance: int
    available: int


class Wallet:
    """The wallet's operations, each run inside a transaction the caller owns."""

    def __init__(self, settings: WalletSettings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.holds = Holds(ledger)
        self._eligible: dict[str, tuple[float, str]] = {}
        """Users known eligible to send and receive gifts: until when, and their country."""
        """Users known eligible for gifts, until (monotonic time)."""

    def price_package(
        self,
        *,
        package_id: str,
        region: str,
        channel: str,
        coins: int,
        currency_code: str,
        price_minor: int,
        active: bool,
    ) -> storage.PackageRecord:
        """A package as an admin prices it: only where coins are sold, in that region's currency."""
        self.require_sold_in(region)
        currency = self.settings.regions[region]
        if currency_code != currency:
            raise FailedPrecondition(
                "CURRENCY_MISMATCH",
                f"{region} buys coins in {currency}, not {currency_code}",
                violations=(FieldViolation("price.currency_code", f"must be {currency}"),),
                region=region,
                currency_code=currency,
            )
        if price_minor < 1:
            raise InvalidArgument(
                "PRICE_NOT_POSITIVE",
                "a package must cost at least one minor unit",
                violations=(FieldViolation("price.amount_minor", "must be at least 1"),),
            )
        if price_minor > MAX_PACKAGE_PRICE_MINOR:
            raise InvalidArgument(
                "PRICE_TOO_HIGH",
                f"a package costs at most {money_text(currency, MAX_PACKAGE_PRICE_MINOR)}; "
                f"{money_text(currency, price_minor)} is likely a mistyped price",
                violations=(
                    FieldViolation(
                        "price.amount_minor", f"must be at most {MAX_PACKAGE_PRICE_MINOR:,}"
                    ),
                ),
            )
        return storage.PackageRecord(
            package_id=package_id,
            region=region,
            channel=channel,
            currency_code=currency_code,
            coins=coins,
            price_minor=price_minor,
            active=active,
        )

    async def put_package(self, conn: AsyncConnection, package: storage.PackageRecord) -> None:
        """Create a package, or change an existing one's price or whether it is on sale (priced by
        `price_package`). What a package is (its region, channel and coins, which its id names:
        `us-web-1400`) does not change: PACKAGE_IS_FIXED, use a new id."""
        existing = await storage.get_package(conn, package.package_id)
        if existing is not None:
            was = (existing.region, existing.channel, existing.coins)
            if was != (package.region, package.channel, package.coins):
                raise FailedPrecondition(
                    "PACKAGE_IS_FIXED",
                    f"package {package.package_id} is {existing.coins:,} coins on "
                    f"{existing.channel} in {existing.region}: its price and whether it is on sale "
                    "may change, not what it is; give the new package an id of its own",
                    package_id=package.package_id,
                )
        await storage.put_package(conn, package)

    async def packages_for(
        self,
        conn: AsyncConnection,
        user_id: str,
        channel: str,
        *,
        limit: int,
        after: tuple[int, str] | None,
    ) -> list[storage.PackageRecord]:
        """The active packages a user may buy on `channel`: their account's region, cheapest first
        (REGION_UNSUPPORTED where coins are not sold: an empty shop says nothing)."""
        account = await self.account(conn, user_id)
        self.require_sold_in(account.country_code)
        return await storage.list_packages(
            conn, account.country_code, channel, limit=limit, after=after
        )

    async def classify(
        self, conn: AsyncConnection, user_id: str, classification: str
    ) -> storage.AccountRecord:
        """Set an account's classification (personal, government, political); NOT_FOUND for a
        user without an account. Every process honours it within its eligibility cache time. An
        admin never classifies themself (OWN_DECISION): one classified political could lift it."""
        require_another_admin(user_id, "set the classification")
        if not await storage.set_classification(conn, user_id, classification):
            raise NotFound(
                "ACCOUNT_NOT_FOUND", f"user {user_id} has no wallet account", user_id=user_id
            )
        self._eligible.pop(user_id, None)
        account = await storage.get_account(conn, user_id)
        assert account is not None
        return account

    async def open_account(
        self,
        conn: AsyncConnection,
        user_id: str,
        country_code: str,
        birth_date: dt.date,
        now: dt.datetime,
    ) -> storage.AccountRecord:
        if birth_date > now.date():
            raise InvalidArgument(
                "INVALID_REQUEST",
                "birth_date is in the future",
                violations=(FieldViolation("birth_date", "must not be in the future"),),
            )
        if birth_date < now.date().replace(year=now.year - MAX_AGE_YEARS, day=1):
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"birth_date {birth_date.isoformat()} would make the user older than "
                f"{MAX_AGE_YEARS}: check the year",
                violations=(
                    FieldViolation("birth_date", f"must be within the last {MAX_AGE_YEARS} years"),
                ),
            )
        countries.check_assigned("country_code", country_code)
        account = storage.AccountRecord(
            user_id=user_id,
            country_code=country_code,
            currency_code=self.settings.regions.get(country_code, "USD"),
            birth_date=birth_date,
            created_at=now,
        )
        # Insert-or-nothing, then compare: two concurrent opens of one user cannot both insert.
        if await storage.insert_account(conn, account):
            await self.ledger.open_account(conn, user_account(user_id))
            return account
        existing = await storage.get_account(conn, user_id)
        assert existing is not None
        if (existing.country_code, existing.birth_date) == (country_code, birth_date):
            return existing
        raise AlreadyExists(
            "ACCOUNT_EXISTS",
            f"user {user_id} already has an account with other details",
            user_id=user_id,
        )

    async def account(self, conn: AsyncConnection, user_id: str) -> storage.AccountRecord:
        account = await storage.get_account(conn, user_id)
        if account is None:
            raise NotFound(
                "ACCOUNT_NOT_FOUND",
                f"user {user_id} has no wallet account; open one first",
                user_id=user_id,
            )
        return account

    async def coins(self, conn: AsyncConnection | Tx, user_id: str) -> Coins:
        """A user's balance, available coins and debt (one read); ACCOUNT_NOT_FOUND without an account."""
        state = await storage.coin_state(
            conn, user_id, user_account(user_id), debt_account(user_id)
        )
        if state is None:
            raise NotFound(
                "ACCOUNT_NOT_FOUND",
                f"user {user_id} has no wallet account; open one first",
                user_id=user_id,
            )
        if not state.frozen:
            return Coins(state.balance, state.balance - state.held)
        return Coins(state.balance, 0, -state.debt_balance, True)

    async def entries(
        self,
        tx: Tx,
        user_id: str,
        *,
        limit: int,
        cursor: tuple[dt.datetime, int] | None,
        kinds: Sequence[str],
        since: dt.datetime | None,
        until: dt.datetime | None,
    ) -> list[HistoryEntry]:
        """A user's coin entries, newest first (ACCOUNT_NOT_FOUND without an account)."""
        await self.coins(tx, user_id)
        return await entries_page(
            tx,
            user_account(user_id),
            limit=limit,
            cursor=cursor,
            kinds=kinds,
            since=since,
            until=until,
        )

    async def statement(
        self, tx: Tx, user_id: str, since: dt.datetime, until: dt.datetime
    ) -> Period:
        """A user's coins over [since, until): opening, each kind's movements, closing."""
        await self.coins(tx, user_id)
        return await period(tx, user_account(user_id), since, until)

    async def release_hold(self, conn: AsyncConnection, hold_id: str, *, owner: str) -> Hold:
        """Give back what the hold did not capture; coins that come back to an account frozen by a
        debt pay the debt first (and thaw it once paid), as a purchase's coins do."""
        hold = await self.holds.release(conn, hold_id, owner=owner)
        await self.settle_debt(conn, user_of(hold.account_id), f"release:{hold_id}")
        return hold

    async def expire_holds(self, conn: AsyncConnection, *, limit: int) -> int:
        """Expire holds past their time (their rest comes back, paying debts first, as on
        release); returns how many."""
        expired = await self.holds.expire_due(conn, limit=limit)
        for hold in expired:
            await self.settle_debt(conn, user_of(hold.account_id), f"expiry:{hold.hold_id}")
        return len(expired)

    async def place_hold(
        self,
        conn: AsyncConnection,
        *,
        user_id: str,
        coins: int,
        reason: str,
        reference: str,
        owner: str,
        expire_after: dt.timedelta | None,
        placed_under: str | None = None,
    ) -> Hold:
        """Reserve coins for what `reason` will pay for; captures go to that spend account. The hold
        keeps `placed_under`, the request that placed it (see `Holds.place`). Government and
        political accounts cannot pay for promotions (paid reach), as they cannot send gifts."""
        if reason == "promotion":
            await _may_pay_for_promotions(conn, user_id, "held")
        try:
            return await self.holds.place(
                conn,
                user_account(user_id),
                coins,
                counter_account_id=SPEND_ACCOUNTS[reason],
                owner=owner,
                kind=reason,
                reference=reference,
                expires_at=self.ledger.clock.now() + expire_after if expire_after else None,
                placed_under=placed_under,
            )
        except DomainError as error:
            raise _in_users_terms(error, user_id) from None

    def check_can_buy(
        self, account: storage.AccountRecord, package: storage.PackageRecord, today: dt.date
    ) -> None:
        """Age and region gating; raises FailedPrecondition with the rule that refused."""
        age = age_on(account.birth_date, today)
        minimum = self.minimum_age_in(account.country_code)
        if age < minimum:
            raise FailedPrecondition(
                "AGE_RESTRICTED",
                f"users under {minimum} cannot buy coins in {account.country_code}",
                minimum_age=minimum,
            )
        self.require_sold_in(account.country_code)
        if (
            not package.active
            or package.region != account.country_code
            or package.currency_code != account.currency_code
        ):
            why = (
                "is off sale"
                if not package.active
                else f"is not sold in {account.country_code} ({account.currency_code})"
            )
            raise FailedPrecondition(
                "PACKAGE_NOT_AVAILABLE",
                f"package {package.package_id} {why}; list the packages for this account",
                package_id=package.package_id,
            )

    def require_sold_in(self, country_code: str) -> None:
        """REGION_UNSUPPORTED for a country where coins are not sold (an account's, a package's)."""
        if country_code not in self.settings.regions:
            raise FailedPrecondition(
                "REGION_UNSUPPORTED",
                f"coins are not sold in {country_code} (they are in "
                f"{', '.join(sorted(self.settings.regions))})",
                country_code=country_code,
            )

    async def check_limits(
        self,
        conn: AsyncConnection,
        account: storage.AccountRecord,
        package: storage.PackageRecord,
        token: str,
        now: dt.datetime,
    ) -> None:
        """Refuse a purchase that would pass a limit (RESOURCE_EXHAUSTED PURCHASE_LIMIT_EXCEEDED,
        naming the limit and what remains). The caller holds the account's row lock."""
        s = self.settings
        hour, day = now - dt.timedelta(hours=1), now - dt.timedelta(days=1)
        hour_coins, hour_minor = await storage.purchased_since(conn, hour, user_id=account.user_id)
        day_coins, day_minor = await storage.purchased_since(conn, day, user_id=account.user_id)
        # A card's daily money, in this account's currency (a card used in USD and in GBP has a
        # window in each: cents and pence do not add up).
        _, method_minor = await storage.purchased_since(
            conn, day, token=token, currency=account.currency_code
        )
        checks = [
            ("hourly_coins", s.limit_hourly_coins, hour_coins, package.coins, "coins"),
            ("daily_coins", s.limit_daily_coins, day_coins, package.coins, "coins"),
            ("hourly_money", s.limit_hourly_minor, hour_minor, package.price_minor, "minor"),
            ("daily_money", s.limit_daily_minor, day_minor, package.price_minor, "minor"),
            (
                "payment_method_daily_money",
                s.limit_payment_method_daily_minor,
                method_minor,
                package.price_minor,
                "minor",
            ),
        ]
        for name, limit, used, adding, unit in checks:
            if used + adding > limit:
                remaining = max(0, limit - used)
                shown, limit_shown = (
                    (f"{remaining:,} coins", f"{limit:,} coins")
                    if unit == "coins"
                    else (
                        money_text(account.currency_code, remaining),
                        money_text(account.currency_code, limit),
                    )
                )
                raise ResourceExhausted(
                    "PURCHASE_LIMIT_EXCEEDED",
                    f"this purchase would pass the {name.replace('_', ' ')} limit of "
                    f"{limit_shown}; {shown} remain",
                    limit=name,
                    limit_value=limit,
                    used=used,
                    remaining=remaining,
                    unit=unit if unit == "coins" else account.currency_code,
                )

    async def what_to_buy(
        self,
        conn: AsyncConnection,
        account: storage.AccountRecord,
        package_id: str,
        custom_coins: int,
    ) -> storage.PackageRecord:
        """The package a purchase names, or a custom amount's; exactly one must be given."""
        if bool(package_id) == bool(custom_coins):
            which = "both are set" if package_id else "neither is set"
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"set exactly one of package_id (a package from ListCoinPackages) and custom_coins "
                f"(a custom amount); {which}",
                violations=(
                    FieldViolation(
                        "package_id", f"exactly one of package_id, custom_coins: {which}"
                    ),
                    FieldViolation(
                        "custom_coins", f"exactly one of package_id, custom_coins: {which}"
                    ),
                ),
            )
        if package_id:
            return await self.package(conn, package_id)
        return self.custom_package(account, custom_coins)

    def custom_package(self, account: storage.AccountRecord, coins: int) -> storage.PackageRecord:
        """A web package of `coins` at the region's custom rate, the price rounded up to the minor
        unit (the buyer gets exactly the coins asked; no fraction of a cent is lost or invented)."""
        s = self.settings
        if not s.custom_min_coins <= coins <= s.custom_max_coins:
            raise InvalidArgument(
                "CUSTOM_AMOUNT_OUT_OF_BOUNDS",
                f"a custom amount is {s.custom_min_coins} to {s.custom_max_coins} coins",
                violations=(
                    FieldViolation(
                        "custom_coins", f"between {s.custom_min_coins} and {s.custom_max_coins}"
                    ),
                ),
                minimum=s.custom_min_coins,
                maximum=s.custom_max_coins,
            )
        self.require_sold_in(account.country_code)  # no package to advise there either
        rate = s.custom_price_per_100_coins_minor.get(account.country_code)
        if rate is None:
            raise FailedPrecondition(
                "CUSTOM_AMOUNT_UNAVAILABLE",
                f"custom amounts are not sold in {account.country_code}; buy a package",
                country_code=account.country_code,
            )
        return storage.PackageRecord(
            package_id="custom",
            region=account.country_code,
            channel="web",
            currency_code=account.currency_code,
            coins=coins,
            price_minor=-(-coins * rate // 100),
            active=True,
        )

    async def package(self, conn: AsyncConnection, package_id: str) -> storage.PackageRecord:
        package = await storage.get_package(conn, package_id)
        if package is None:
            raise NotFound(
                "PACKAGE_NOT_FOUND", f"no coin package {package_id!r}", package_id=package_id
            )
        return package

    async def credit_purchase(
        self, conn: AsyncConnection, purchase: storage.PurchaseRecord, request_id: str
    ) -> Coins:
        """Issue the purchased coins (coin sales -> the buyer), then let them pay off any clawback
        debt first. Returns the buyer's coins afterwards."""
        await self.ledger.post(
            conn,
            [
                Posting(COIN_SALES, -purchase.coins),
                Posting(user_account(purchase.user_id), purchase.coins),
            ],
            kind="purchase",
            reference=purchase.purchase_id,
            request_id=request_id,
            caller="wallet",
            policy_version=self.settings.policy_version,
        )
        await self.settle_debt(conn, purchase.user_id, purchase.purchase_id)
        return await self.coins(conn, purchase.user_id)

    async def settle_debt(self, conn: AsyncConnection, user_id: str, reference: str) -> None:
        """Move coins from a frozen account to its debt until the debt is paid; thaw it when it is."""
        account, debt = user_account(user_id), debt_account(user_id)
        if not await self.ledger.is_frozen(conn, account):
            return
        await self.ledger.lock(conn, account)
        owed = -(await self.ledger.balance(conn, debt) or 0)
        found = await self.ledger.available(conn, account)
        assert found is not None
        _, available = found
        paid = min(owed, available)
        if paid > 0:
            await self.ledger.post(
                conn,
                [Posting(account, -paid, forced=True), Posting(debt, paid)],
                kind="debt_settlement",
                reference=reference,
                request_id=f"settle:{reference}",
                caller="wallet",
                policy_version=self.settings.policy_version,
            )
        if paid == owed:
            await self.ledger.set_frozen(conn, account, False)

    async def reverse_purchase(
        self, conn: AsyncConnection, purchase: storage.PurchaseRecord, kind: str, event_id: str
    ) -> Coins:
        """Take a refunded or charged-back purchase's coins back: what is available now, and the rest
        as a debt that freezes the account for spending until purchases pay it off. Coins reserved by
        holds stay reserved (their owners may still capture them); the debt covers them instead."""
        account, debt = user_account(purchase.user_id), debt_account(purchase.user_id)
        await self.ledger.lock(conn, account)  # what is available stays so until the posting
        found = await self.ledger.available(conn, account)
        assert found is not None
        _, available = found
        taken = min(purchase.coins, available)
        owed = purchase.coins - taken
        postings = [Posting(COIN_SALES, purchase.coins)]
        if taken:
            postings.append(Posting(account, -taken, forced=True))
        if owed:
            await self.ledger.open_account(conn, debt, kind="debt", allow_negative=True)
            postings.append(Posting(debt, -owed))
        await self.ledger.post(
            conn,
            postings,
            kind=kind,
            reference=purchase.purchase_id,
            request_id=f"reverse:{event_id}",
            caller="payment-webhooks",
            policy_version=self.settings.policy_version,
        )
        if owed:
            await self.ledger.set_frozen(conn, account, True)
        return await self.coins(conn, purchase.user_id)

    async def reversed_by(self, conn: AsyncConnection, event_id: str) -> bool:
        """Whether the payment provider's event `event_id` reversed a purchase (its posting is kept
        for good, unlike the event's request id)."""
        posted = await self.ledger.transaction_under(
            as_tx(conn), caller="payment-webhooks", request_id=f"reverse:{event_id}"
        )
        return posted is not None

    async def check_recipient(self, conn: AsyncConnection | Tx, what: DebitRequest) -> None:
        """Coins for a gift move only between users who may send and receive: the creator has a
        wallet account, and neither side is a government or political account, under the minimum
        age of their country, or in a region without gifts; no one gifts themself. Each refusal has
        its own reason. An eligible user is remembered by each process for
        `WALLET_ELIGIBILITY_CACHE_SECONDS`, so the hot path reads nothing."""
        if what.reason == "promotion":  # a budget paid up front: as PlaceHold refuses
            await _may_pay_for_promotions(conn, what.user_id, "debited")
        recipient = what.recipient_id
        if recipient == what.user_id and recipient:
            raise InvalidArgument(
                "SELF_GIFTING",
                "users cannot send gifts to themselves",
                violations=(FieldViolation("recipient_id", "must not be the user debited"),),
                user_id=recipient,
            )
        today = self.ledger.clock.now().date()
        country = self._remembered_country(what.user_id)
        if (what.reason == "gift" or what.offered_in) and country is None:
            sender = await storage.party(conn, what.user_id)
            if sender is not None:  # no account: the ledger says ACCOUNT_NOT_FOUND
                refused = self._ineligible(what.user_id, sender, today, receiving=False)
                if refused is not None:
                    raise refused
                self._remember(what.user_id, sender.country_code)
                country = sender.country_code
        if what.offered_in and country is not None and country not in what.offered_in:
            raise FailedPrecondition(
                "NOT_OFFERED_IN_REGION",
                f"this gift is not offered in {country} (offered in "
                f"{', '.join(sorted(what.offered_in))}); nothing was debited",
                user_id=what.user_id,
                country_code=country,
            )
        if not recipient or self._remembered(recipient):
            return
        party = await storage.party(conn, recipient)
        if party is None:
            raise NotFound(
                "RECIPIENT_NOT_FOUND",
                f"user {recipient} has no wallet account, so cannot receive; nothing was debited",
                recipient_id=recipient,
            )
        refused = self._ineligible(recipient, party, today, receiving=True)
        if refused is not None:
            raise refused
        self._remember(recipient, party.country_code)

    def minimum_age_in(self, country_code: str) -> int:
        return self.settings.minimum_age_by_country.get(country_code, self.settings.minimum_age)

    def _ineligible(
        self, user_id: str, party: storage.Party, today: dt.date, *, receiving: bool
    ) -> FailedPrecondition | None:
        """Why `user_id` may not send (or, `receiving`, receive) gifts; None if they may."""
        refused = _not_personal(
            user_id,
            party,
            "RECIPIENT_GOVERNMENT_ACCOUNT" if receiving else "GOVERNMENT_ACCOUNT",
            f"{'receive' if receiving else 'send'} gifts; nothing was debited",
        )
        if refused is not None:
            return refused
        minimum = self.minimum_age_in(party.country_code)
        of_age = age_on(party.birth_date, today) >= minimum
        if receiving and not (of_age and party.country_code in self.settings.regions):
            # The sender learns only that the creator cannot receive: an age rule or a country
            # named here told any viewer that a creator is a minor, or where they live (review r13).
            return FailedPrecondition(
                "RECIPIENT_NOT_ELIGIBLE",
                f"user {user_id} cannot receive gifts; nothing was debited",
                user_id=user_id,
            )
        if not of_age:
            return FailedPrecondition(
                "AGE_RESTRICTED",
                f"user {user_id} cannot send gifts: users in {party.country_code} must be "
                f"{minimum} or older; nothing was debited",
                user_id=user_id,
                rule="minimum_age",
                minimum_age=minimum,
            )
        if party.country_code not in self.settings.regions:
            return FailedPrecondition(
                "REGION_UNSUPPORTED",
                f"user {user_id} cannot send gifts: gifts are not offered in "
                f"{party.country_code}; nothing was debited",
                user_id=user_id,
                country_code=party.country_code,
            )
        return None

    def _remembered(self, user_id: str) -> bool:
        return self._remembered_country(user_id) is not None

    def _remembered_country(self, user_id: str) -> str | None:
        """The country of a user known eligible (None: not known, or no longer)."""
        known = self._eligible.get(user_id)
        return known[1] if known is not None and known[0] > time.monotonic() else None

    def _remember(self, user_id: str, country_code: str) -> None:
        if len(self._eligible) >= RECIPIENTS_REMEMBERED:
            self._eligible.pop(next(iter(self._eligible)))
        until = time.monotonic() + self.settings.eligibility_cache_seconds
        self._eligible[user_id] = (until, country_code)

    def knows_recipient(self, what: DebitRequest) -> bool:
        """Whether `check_recipient` would pass without a read (both sides known eligible)."""
        if what.recipient_id and what.recipient_id == what.user_id:
            return False
        if what.reason == "promotion":
            return False  # its payer's classification is read
        country = self._remembered_country(what.user_id)
        if (what.reason == "gift" or what.offered_in) and country is None:
            return False
        if what.offered_in and country not in what.offered_in:
            return False  # the transactional path refuses it
        return not what.recipient_id or self._remembered(what.recipient_id)

    async def debit(self, conn: AsyncConnection | Tx, what: DebitRequest) -> Debit:
        """Take coins for a gift or a promotion; INSUFFICIENT_FUNDS if the balance is too low, and
        nothing if the recipient may not receive (`check_recipient`).

        An unknown user fails in the ledger (ACCOUNT_NOT_FOUND) without an extra lookup on this hot path.
        """
        await self.check_recipient(conn, what)
        account = user_account(what.user_id)
        try:
            posted = await self.ledger.post(
                conn,
                what.postings(),
                kind=what.reason,
                reference=what.reference,
                request_id=what.request_id,
                caller=what.caller,
                policy_version=self.settings.policy_version,
            )
        except DomainError as error:
            raise _in_users_terms(error, what.user_id) from None
        return _debit(posted, account)

    async def debit_on_record(
        self, tx: Tx, *, caller: str, user_id: str, request_id: str, coins: int | None = None
    ) -> Debit | None:
        """A debit the ledger holds under `request_id` (as `DebitRequest.request_id` builds it),
        whatever became of its request-id record: those are purged after
        `WALLET_IDEMPOTENCY_RETENTION_HOURS`, the ledger's transactions never are. The balance is
        the one right after it (holds at that moment are not on record: available = balance).
        With `coins`: REQUEST_ID_REUSED if it took other coins."""
        found = await self.ledger.posted_under(
            tx, caller=caller, request_id=request_id, account_id=user_account(user_id)
        )
        if found is None:
            return None
        transaction_id, balance, moved = found
        if coins is not None and moved != -coins:
            raise request_id_reused(request_id.rsplit("/", 1)[-1], f"it debited {-moved} coins")
        return Debit(transaction_id, balance, balance)

    async def debit_kept(self, driver: Driver, what: DebitRequest) -> Debit | None:
        """`debit_on_record` for a `DebitCoins` sent again after its request id was purged."""
        async with driver.read() as tx:
            return await self.debit_on_record(
                tx,
                caller=what.caller,
                user_id=what.user_id,
                request_id=what.request_id,
                coins=what.coins,
            )

    async def debit_at_once(
        self,
        driver: Driver,
        key: AnsweredKey,
        what: DebitRequest,
        *,
        answer: Callable[[Debit], bytes],
    ) -> Debit | None:
        """`debit` and the request's answer as one optimistic statement (see `Ledger.post_at_once`);
        None if it did not apply (or the recipient is not known yet), and `debit` in a transaction
        decides."""
        if not self.knows_recipient(what):
            return None
        account = user_account(what.user_id)
        posted = await self.ledger.post_at_once(
            driver,
            what.postings(),
            kind=what.reason,
            reference=what.reference,
            request_id=what.request_id,
            caller=what.caller,
            policy_version=self.settings.policy_version,
            key=key,
            answer=lambda posted: answer(_debit(posted, account)),
        )
        return None if posted is None else _debit(posted, account)


async def _may_pay_for_promotions(conn: AsyncConnection | Tx, user_id: str, nothing: str) -> None:
    """Government and political accounts cannot pay for promotions (paid reach), as they cannot
    send gifts: GOVERNMENT_ACCOUNT, nothing `nothing` (held, debited). No account: the ledger says
    ACCOUNT_NOT_FOUND."""
    party = await storage.party(conn, user_id)
    refused = (
        None
        if party is None
        else _not_personal(
            user_id, party, "GOVERNMENT_ACCOUNT", f"pay for promotions; nothing was {nothing}"
        )
    )
    if refused is not None:
        raise refused


def _debit(posted: Posted, account: str) -> Debit:
    return Debit(posted.transaction_id, posted.balances[account], posted.available[account])


def _in_users_terms(error: DomainError, user_id: str) -> DomainError:
    """The ledger's refusal about the user's own account as the caller knows it: the user, not the
    ledger's account id (`user:<id>`), which callers never send and gifting and promotion pass on
    to theirs. Any other refusal as it is."""
    if error.metadata.get("account_id") != user_account(user_id):
        return error
    if error.reason == "ACCOUNT_NOT_FOUND":
        return NotFound(
            "ACCOUNT_NOT_FOUND",
            f"user {user_id} has no wallet account; open one first",
            user_id=user_id,
        )
    if error.reason == "ACCOUNT_FROZEN":
        error = FailedPrecondition(
            "ACCOUNT_FROZEN",
            f"user {user_id}'s coins are frozen until their clawback debt is paid off",
        )
    error.metadata.pop("account_id", None)
    error.metadata["user_id"] = user_id
    return error
