"""The wallet's gRPC layer: protobuf in, domain calls inside idempotent transactions, protobuf out."""

from __future__ import annotations

import datetime as dt
import uuid

from google.type import date_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from runtime.access import Access, method_rules
from runtime.auth import current_principal
from runtime.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument
from runtime.pagination import decode_token, encode_token, int64, page_size, text
from runtime.protos import RpcContext, money, timestamp
from runtime.server import Runtime
from services.wallet import storage
from services.wallet.api_holds import HoldRpcs
from services.wallet.domain import Wallet, user_account
from services.wallet.payments import PaymentProvider
from services.wallet.settings import WalletSettings

_CHANNELS = {wallet_pb2.CHANNEL_IN_APP: "in_app", wallet_pb2.CHANNEL_WEB: "web"}
_CHANNEL_ENUM = {name: value for value, name in _CHANNELS.items()}
_DEBIT_REASONS = {
    wallet_pb2.DEBIT_REASON_GIFT: "gift",
    wallet_pb2.DEBIT_REASON_PROMOTION: "promotion",
}
_ENTRY_KINDS = {
    "purchase": wallet_pb2.ENTRY_KIND_PURCHASE,
    "gift": wallet_pb2.ENTRY_KIND_GIFT,
    "promotion": wallet_pb2.ENTRY_KIND_PROMOTION,
    "refund": wallet_pb2.ENTRY_KIND_REFUND,
    "chargeback": wallet_pb2.ENTRY_KIND_CHARGEBACK,
    "debt_settlement": wallet_pb2.ENTRY_KIND_DEBT_SETTLEMENT,
}
_KIND_NAMES = {value: name for name, value in _ENTRY_KINDS.items()}
_PURCHASE_STATUS = {
    "pending": wallet_pb2.PURCHASE_STATUS_PENDING,
    "completed": wallet_pb2.PURCHASE_STATUS_COMPLETED,
    "failed": wallet_pb2.PURCHASE_STATUS_FAILED,
}


def _to_date(value: date_pb2.Date) -> dt.date:
    try:
        return dt.date(value.year, value.month, value.day)
    except ValueError:
        raise InvalidArgument(
            "INVALID_REQUEST",
            "birth_date is not a calendar date",
            violations=(FieldViolation("birth_date", "not a valid calendar date"),),
        ) from None


def _account_pb(account: storage.AccountRecord, balance: tuple[int, int]) -> wallet_pb2.Account:
    return wallet_pb2.Account(
        user_id=account.user_id,
        country_code=account.country_code,
        currency_code=account.currency_code,
        birth_date=date_pb2.Date(
            year=account.birth_date.year,
            month=account.birth_date.month,
            day=account.birth_date.day,
        ),
        balance=_balance(balance),
        create_time=timestamp(account.created_at),
    )


def _package_pb(package: storage.PackageRecord) -> wallet_pb2.CoinPackage:
    return wallet_pb2.CoinPackage(
        package_id=package.package_id,
        coins=package.coins,
        price=money(package.currency_code, package.price_minor),
        channel=_CHANNEL_ENUM[package.channel],
        region=package.region,
    )


def _purchase_pb(purchase: storage.PurchaseRecord) -> wallet_pb2.Purchase:
    return wallet_pb2.Purchase(
        purchase_id=purchase.purchase_id,
        user_id=purchase.user_id,
        package=wallet_pb2.CoinPackage(
            package_id=purchase.package_id,
            coins=purchase.coins,
            price=money(purchase.currency_code, purchase.price_minor),
            channel=_CHANNEL_ENUM[purchase.channel],
            region=purchase.region,
        ),
        status=_PURCHASE_STATUS[purchase.status],
        provider_transaction_id=purchase.provider_transaction_id or "",
        create_time=timestamp(purchase.created_at),
    )


def _balance(coins: tuple[int, int]) -> wallet_pb2.Balance:
    """A Balance from (balance, available)."""
    return wallet_pb2.Balance(coins=coins[0], available_coins=coins[1])


ACCESS = method_rules(
    wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
    {
        "OpenAccount": Access.user("user_id"),
        "GetAccount": Access.user("user_id", admin_may_read=True),
        "GetBalance": Access.user("user_id", admin_may_read=True),
        "ListCoinPackages": Access.user("user_id"),
        "PurchaseCoins": Access.user("user_id", moves_money=True),
        "ListLedgerEntries": Access.user("user_id", admin_may_read=True),
        "DebitCoins": Access.internal({"gifting", "promotion"}, owner_field="user_id"),
        "SetCoinPackage": Access.admin_only(),
        "PlaceHold": Access.internal({"promotion"}, owner_field="user_id"),
        "CaptureHold": Access.internal({"promotion"}),  # only the hold's owner service, too
        "ReleaseHold": Access.internal({"promotion"}),
        "GetHold": Access.internal({"promotion"}, moves_money=False),
    },
)
"""Who may call each RPC (see runtime.access): the account acted on is always the token's user."""


class WalletApi(HoldRpcs, wallet_pb2_grpc.WalletServiceServicer):
    def __init__(
        self, runtime: Runtime[WalletSettings], wallet: Wallet, payments: PaymentProvider
    ) -> None:
        self._rt = runtime
        self._db = runtime.db
        self._idempotency = runtime.idempotency
        self._clock = runtime.clock
        self._wallet = wallet
        self._payments = payments

    async def OpenAccount(
        self, request: wallet_pb2.OpenAccountRequest, context: RpcContext
    ) -> wallet_pb2.OpenAccountResponse:
        birth_date = _to_date(request.birth_date)

        async def effect(conn: AsyncConnection) -> wallet_pb2.OpenAccountResponse:
            account = await self._wallet.open_account(
                conn, request.user_id, request.country_code, birth_date, self._clock.now()
            )
            balance = await self._wallet.coins(conn, account.user_id)
            return wallet_pb2.OpenAccountResponse(account=_account_pb(account, balance))

        return await self._idempotency.once(
            f"OpenAccount:{request.user_id}", request, wallet_pb2.OpenAccountResponse, effect
        )

    async def SetCoinPackage(
        self, request: wallet_pb2.SetCoinPackageRequest, context: RpcContext
    ) -> wallet_pb2.SetCoinPackageResponse:
        admin = current_principal().require_admin()
        package = self._wallet.price_package(
            package_id=request.package_id,
            region=request.region,
            channel=_CHANNELS[request.channel],
            coins=request.coins,
            currency_code=request.price.currency_code,
            price_minor=request.price.amount_minor,
            active=request.active,
        )

        async def effect(conn: AsyncConnection) -> wallet_pb2.SetCoinPackageResponse:
            await storage.put_package(conn, package)
            return wallet_pb2.SetCoinPackageResponse(
                package=_package_pb(package), active=package.active
            )

        return await self._idempotency.once(
            f"SetCoinPackage:{admin}", request, wallet_pb2.SetCoinPackageResponse, effect
        )

    async def GetAccount(
        self, request: wallet_pb2.GetAccountRequest, context: RpcContext
    ) -> wallet_pb2.GetAccountResponse:
        async with self._db.read() as conn:
            account = await self._wallet.account(conn, request.user_id)
            balance = await self._wallet.coins(conn, request.user_id)
        return wallet_pb2.GetAccountResponse(account=_account_pb(account, balance))

    async def GetBalance(
        self, request: wallet_pb2.GetBalanceRequest, context: RpcContext
    ) -> wallet_pb2.GetBalanceResponse:
        async with self._db.read() as conn:
            coins = await self._wallet.coins(conn, request.user_id)
        return wallet_pb2.GetBalanceResponse(balance=_balance(coins))

    async def ListCoinPackages(
        self, request: wallet_pb2.ListCoinPackagesRequest, context: RpcContext
    ) -> wallet_pb2.ListCoinPackagesResponse:
        size = page_size(request.page_size)
        channel = _CHANNELS[request.channel]
        after = decode_token(
            request.page_token, f"packages:{request.user_id}:{channel}", int64, text
        )
        async with self._db.read() as conn:
            account = await self._wallet.account(conn, request.user_id)
            packages = await storage.list_packages(
                conn,
                account.country_code,
                channel,
                limit=size + 1,
                after=(after[0], after[1]) if after else None,
            )
        token = ""
        if len(packages) > size:
            packages = packages[:size]
            last = packages[-1]
            token = encode_token(
                f"packages:{request.user_id}:{channel}", last.coins, last.package_id
            )
        return wallet_pb2.ListCoinPackagesResponse(
            packages=[_package_pb(p) for p in packages], next_page_token=token
        )

    async def PurchaseCoins(
        self, request: wallet_pb2.PurchaseCoinsRequest, context: RpcContext
    ) -> wallet_pb2.PurchaseCoinsResponse:
        scope = f"PurchaseCoins:{request.user_id}"

        async def start(conn: AsyncConnection) -> str:
            now = self._clock.now()
            account = await self._wallet.account(conn, request.user_id)
            package = await self._wallet.package(conn, request.package_id)
            self._wallet.check_can_buy(account, package, now.date())
            purchase_id = uuid.uuid4().hex
            await storage.insert_purchase(
                conn,
                storage.PurchaseRecord(
                    purchase_id=purchase_id,
                    user_id=account.user_id,
                    package_id=package.package_id,
                    region=package.region,
                    channel=package.channel,
                    coins=package.coins,
                    price_minor=package.price_minor,
                    currency_code=package.currency_code,
                    payment_token=request.payment_token,
                    status="pending",
                    provider_transaction_id=None,
                    created_at=now,
                    updated_at=now,
                ),
            )
            return purchase_id

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(wallet_pb2.PurchaseCoinsResponse)
        assert claim.resource_id is not None
        return await self._complete_purchase(scope, request, claim.resource_id)

    async def _complete_purchase(
        self, scope: str, request: wallet_pb2.PurchaseCoinsRequest, purchase_id: str
    ) -> wallet_pb2.PurchaseCoinsResponse:
        """Charge (idempotently, keyed by the purchase id), then settle and credit in one transaction."""
        async with self._db.read() as conn:
            purchase = await storage.get_purchase(conn, purchase_id)
        assert purchase is not None
        charge = await self._payments.charge(
            idempotency_key=purchase.purchase_id,
            token=purchase.payment_token,
            amount_minor=purchase.price_minor,
            currency=purchase.currency_code,
        )
        async with self._db.transaction() as conn:
            settled = await storage.settle_purchase(
                conn,
                purchase_id,
                status="completed" if charge.approved else "failed",
                provider_transaction_id=charge.provider_transaction_id,
                now=self._clock.now(),
            )
            if not settled:
                raise Aborted(
                    "CONCURRENT_RETRY",
                    "another attempt with this request_id is completing the purchase; retry",
                )
            purchase = await storage.get_purchase(conn, purchase_id)
            assert purchase is not None
            if charge.approved:
                balance = await self._wallet.credit_purchase(
                    conn, purchase, f"{scope}/{request.request_id}"
                )
                response = wallet_pb2.PurchaseCoinsResponse(
                    purchase=_purchase_pb(purchase), balance=_balance(balance)
                )
                await self._idempotency.complete(conn, scope, request, response=response)
                return response
            declined = FailedPrecondition(
                "PAYMENT_DECLINED",
                f"the payment provider declined the payment ({charge.decline_reason})",
                decline_reason=charge.decline_reason,
                purchase_id=purchase_id,
            )
            await self._idempotency.complete(conn, scope, request, error=declined)
        raise declined

    async def ListLedgerEntries(
        self, request: wallet_pb2.ListLedgerEntriesRequest, context: RpcContext
    ) -> wallet_pb2.ListLedgerEntriesResponse:
        size = page_size(request.page_size)
        kinds = sorted(_KIND_NAMES[k] for k in request.kinds)
        since = request.start_time.ToDatetime(dt.UTC) if request.HasField("start_time") else None
        until = request.end_time.ToDatetime(dt.UTC) if request.HasField("end_time") else None
        # The filters are part of the token's kind: a token only continues the listing it came from.
        kind = f"ledger:{request.user_id}:{','.join(kinds)}:{since}:{until}"
        before = decode_token(request.page_token, kind, int64)
        async with self._db.read() as conn:
            await self._wallet.account(conn, request.user_id)
            rows = await self._wallet.ledger.history(
                conn,
                user_account(request.user_id),
                limit=size + 1,
                before_entry_id=before[0] if before else None,
                kinds=kinds,
                since=since,
                until=until,
            )
        token = encode_token(kind, rows[size - 1].entry_id) if len(rows) > size else ""
        return wallet_pb2.ListLedgerEntriesResponse(
            entries=[
                wallet_pb2.LedgerEntry(
                    entry_id=str(row.entry_id),
                    transaction_id=row.transaction_id,
                    kind=_ENTRY_KINDS.get(row.kind, wallet_pb2.ENTRY_KIND_UNSPECIFIED),
                    amount=row.amount,
                    balance_after=row.balance_after or 0,
                    reference=row.reference,
                    create_time=timestamp(row.created_at),  # type: ignore[arg-type]
                )
                for row in rows[:size]
            ],
            next_page_token=token,
        )

    async def DebitCoins(
        self, request: wallet_pb2.DebitCoinsRequest, context: RpcContext
    ) -> wallet_pb2.DebitCoinsResponse:
        async def effect(conn: AsyncConnection) -> wallet_pb2.DebitCoinsResponse:
            debit = await self._wallet.debit(
                conn,
                user_id=request.user_id,
                coins=request.coins,
                reason=_DEBIT_REASONS[request.reason],
                reference=request.reference,
                request_id=f"DebitCoins:{request.user_id}/{request.request_id}",
                caller="internal",
            )
            return wallet_pb2.DebitCoinsResponse(
                transaction_id=debit.transaction_id,
                balance=_balance((debit.balance, debit.available)),
            )

        return await self._idempotency.once(
            f"DebitCoins:{request.user_id}", request, wallet_pb2.DebitCoinsResponse, effect
        )
