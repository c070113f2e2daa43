"""The wallet's gRPC layer: protobuf in, domain calls inside idempotent transactions, protobuf out."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from ledger.entry_ids import EntryIds
from ledger.listing import history_query, statement_period, statement_response
from runtime.access import Access, method_rules
from runtime.auth import current_principal
from runtime.idempotency import AnsweredKey
from runtime.pagination import (
    decode_token,
    int64,
    next_page,
    page_size,
    text,
)
from runtime.protos import RpcContext, timestamp
from runtime.server import Runtime
from runtime.sql import Tx
from services.wallet.api_holds import HoldRpcs
from services.wallet.api_payments import PaymentEventRpcs
from services.wallet.convert import (
    CHANNELS,
    CLASSIFICATION_NAMES,
    DEBIT_REASONS,
    ENTRY_KINDS,
    KIND_NAMES,
    account_pb,
    balance_pb,
    hold_pb,
    package_pb,
    to_date,
)
from services.wallet.domain import Coins, Debit, DebitRequest, Wallet
from services.wallet.purchases import PurchaseOrder, Purchases, purchase_scope
from services.wallet.resolving import Resolver
from services.wallet.settings import WalletSettings

SERVICE = wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name
ACCESS = method_rules(
    SERVICE,
    {
        "OpenAccount": Access.user("user_id", writes=True),
        "GetAccount": Access.user("user_id", admin_may_read=True),
        "GetBalance": Access.user("user_id", admin_may_read=True),
        "ListCoinPackages": Access.user("user_id", admin_may_read=True),
        "PurchaseCoins": Access.user("user_id", moves_money=True),
        "ListLedgerEntries": Access.user("user_id", admin_may_read=True),
        "GetCoinStatement": Access.user("user_id", admin_may_read=True),
        "DebitCoins": Access.internal({"gifting", "promotion"}, owner_field="user_id"),
        "SetCoinPackage": Access.admin_only(),
        "SetAccountClassification": Access.admin_only(),
        "PlaceHold": Access.internal({"promotion"}, owner_field="user_id"),
        "CaptureHold": Access.internal({"promotion"}),  # only the hold's owner service, too
        "ReleaseHold": Access.internal({"promotion"}),
        "GetHold": Access.internal({"promotion"}, moves_money=False),
        "RecordPaymentEvent": Access.internal({"payment-webhooks"}),
        "ResolveDebit": Access.internal({"gifting", "promotion"}),
        "ResolveHold": Access.internal({"promotion"}),
    },
)
"""Who may call each RPC (see runtime.access): the account acted on is always the token's user."""


class WalletApi(HoldRpcs, PaymentEventRpcs, wallet_pb2_grpc.WalletServiceServicer):
    def __init__(
        self,
        runtime: Runtime[WalletSettings],
        wallet: Wallet,
        purchases: Purchases,
        entry_ids: EntryIds,
    ) -> None:
        self._rt = runtime
        self._entry_ids = entry_ids
        self._db = runtime.db
        self._idempotency = runtime.idempotency
        self._clock = runtime.clock
        self._wallet = wallet
        self._purchases = purchases
        self._resolver = Resolver(runtime.db, runtime.idempotency, wallet)
        runtime.replay_stored(
            f"/{SERVICE}/PurchaseCoins",
            lambda request: purchase_scope(request.user_id),
            wallet_pb2.PurchaseCoinsResponse,
        )
        runtime.replay_stored(
            f"/{SERVICE}/DebitCoins",
            lambda request: debit_scope(request.user_id),
            wallet_pb2.DebitCoinsResponse,
            fingerprinted=_debit_fingerprinted,
        )

    async def OpenAccount(
        self, request: wallet_pb2.OpenAccountRequest, context: RpcContext
    ) -> wallet_pb2.OpenAccountResponse:
        birth_date = to_date(request.birth_date)

        async def effect(conn: AsyncConnection) -> wallet_pb2.OpenAccountResponse:
            account = await self._wallet.open_account(
                conn, request.user_id, request.country_code, birth_date, self._clock.now()
            )
            balance = await self._wallet.coins(conn, account.user_id)
            return wallet_pb2.OpenAccountResponse(account=account_pb(account, balance))

        return await self._idempotency.once(
            f"OpenAccount:{request.user_id}", request, wallet_pb2.OpenAccountResponse, effect
        )

    async def SetAccountClassification(
        self, request: wallet_pb2.SetAccountClassificationRequest, context: RpcContext
    ) -> wallet_pb2.SetAccountClassificationResponse:
        async def effect(conn: AsyncConnection) -> wallet_pb2.SetAccountClassificationResponse:
            account = await self._wallet.classify(
                conn, request.user_id, CLASSIFICATION_NAMES[request.classification]
            )
            balance = await self._wallet.coins(conn, account.user_id)
            return wallet_pb2.SetAccountClassificationResponse(account=account_pb(account, balance))

        return await self._idempotency.once(
            f"SetAccountClassification:{request.user_id}",
            request,
            wallet_pb2.SetAccountClassificationResponse,
            effect,
        )

    async def SetCoinPackage(
        self, request: wallet_pb2.SetCoinPackageRequest, context: RpcContext
    ) -> wallet_pb2.SetCoinPackageResponse:
        admin = current_principal().require_admin()
        package = self._wallet.price_package(
            package_id=request.package_id,
            region=request.region,
            channel=CHANNELS[request.channel],
            coins=request.coins,
            currency_code=request.price.currency_code,
            price_minor=request.price.amount_minor,
            active=request.active,
        )

        async def effect(conn: AsyncConnection) -> wallet_pb2.SetCoinPackageResponse:
            await self._wallet.put_package(conn, package)
            return wallet_pb2.SetCoinPackageResponse(
                package=package_pb(package), active=package.active
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
        return wallet_pb2.GetAccountResponse(account=account_pb(account, balance))

    async def GetBalance(
        self, request: wallet_pb2.GetBalanceRequest, context: RpcContext
    ) -> wallet_pb2.GetBalanceResponse:
        async with self._db.driver.read() as tx:
            coins = await self._wallet.coins(tx, request.user_id)
        return wallet_pb2.GetBalanceResponse(balance=balance_pb(coins))

    async def ListCoinPackages(
        self, request: wallet_pb2.ListCoinPackagesRequest, context: RpcContext
    ) -> wallet_pb2.ListCoinPackagesResponse:
        size = page_size(request.page_size)
        channel = CHANNELS[request.channel]
        kind = f"packages:{request.user_id}:{channel}"
        after = decode_token(request.page_token, kind, int64, text)
        async with self._db.read() as conn:
            packages = await self._wallet.packages_for(
                conn,
                request.user_id,
                channel,
                limit=size + 1,
                after=(after[0], after[1]) if after else None,
            )
        packages, token = next_page(packages, size, kind, lambda p: (p.coins, p.package_id))
        return wallet_pb2.ListCoinPackagesResponse(
            packages=[package_pb(p) for p in packages], next_page_token=token
        )

    async def PurchaseCoins(
        self, request: wallet_pb2.PurchaseCoinsRequest, context: RpcContext
    ) -> wallet_pb2.PurchaseCoinsResponse:
        order = PurchaseOrder(
            user_id=request.user_id,
            package_id=request.package_id,
            custom_coins=request.custom_coins,
            payment_token=request.payment_token,
            request_id=request.request_id,
        )
        return await self._purchases.buy(request, order)

    async def ListLedgerEntries(
        self, request: wallet_pb2.ListLedgerEntriesRequest, context: RpcContext
    ) -> wallet_pb2.ListLedgerEntriesResponse:
        query = history_query(request, request.user_id, KIND_NAMES, self._entry_ids)
        async with self._db.driver.read() as tx:
            rows = await self._wallet.entries(
                tx,
                request.user_id,
                limit=query.size + 1,
                cursor=query.cursor,
                kinds=query.kinds,
                since=query.since,
                until=query.until,
            )
        return wallet_pb2.ListLedgerEntriesResponse(
            entries=[
                wallet_pb2.LedgerEntry(
                    entry_id=self._entry_ids.public(row.entry_id),
                    transaction_id=row.transaction_id,
                    kind=ENTRY_KINDS.get(row.kind, wallet_pb2.ENTRY_KIND_UNSPECIFIED),
                    amount=row.amount,
                    balance_after=row.balance_after or 0,
                    reference=row.reference,
                    create_time=timestamp(row.created_at),
                )
                for row in rows[: query.size]
            ],
            next_page_token=query.next_token(rows),
        )

    async def GetCoinStatement(
        self, request: wallet_pb2.GetCoinStatementRequest, context: RpcContext
    ) -> wallet_pb2.GetCoinStatementResponse:
        since, until = statement_period(request, self._clock.now())
        async with self._db.driver.snapshot() as tx:  # opening, lines, closing: one moment
            period = await self._wallet.statement(tx, request.user_id, since, until)
        return statement_response(
            wallet_pb2.GetCoinStatementResponse,
            wallet_pb2.CoinStatementLine,
            ENTRY_KINDS,
            period,
            since,
            until,
        )

    async def DebitCoins(
        self, request: wallet_pb2.DebitCoinsRequest, context: RpcContext
    ) -> wallet_pb2.DebitCoinsResponse:
        what = DebitRequest(
            user_id=request.user_id,
            coins=request.coins,
            reason=DEBIT_REASONS[request.reason],
            reference=request.reference,
            request_id=f"{debit_scope(request.user_id)}/{request.request_id}",
            caller=current_principal().service,
            recipient_id=request.recipient_id,
            offered_in=frozenset(request.offered_in),
        )

        def answer(debit: Debit) -> wallet_pb2.DebitCoinsResponse:
            return wallet_pb2.DebitCoinsResponse(
                transaction_id=debit.transaction_id,
                balance=balance_pb(Coins(debit.balance, debit.available)),
            )

        async def at_once(key: AnsweredKey) -> wallet_pb2.DebitCoinsResponse | None:
            debit = await self._wallet.debit_at_once(
                self._db.driver, key, what, answer=lambda d: answer(d).SerializeToString()
            )
            return None if debit is None else answer(debit)

        async def effect(tx: Tx) -> wallet_pb2.DebitCoinsResponse:
            return answer(await self._wallet.debit(tx, what))

        async def on_record() -> wallet_pb2.DebitCoinsResponse | None:
            kept = await self._wallet.debit_kept(self._db.driver, what)
            return None if kept is None else answer(kept)

        return await self._idempotency.once_direct(
            debit_scope(request.user_id),
            _debit_fingerprinted(request),
            wallet_pb2.DebitCoinsResponse,
            effect,
            at_once=at_once,
            on_record=on_record,
        )

    async def ResolveDebit(
        self, request: wallet_pb2.ResolveDebitRequest, context: RpcContext
    ) -> wallet_pb2.ResolveDebitResponse:
        resolved = await self._resolver.debit(
            debit_scope(request.user_id),
            request,
            caller=current_principal().service,
            user_id=request.user_id,
        )
        if resolved.kept is not None:
            debit = resolved.kept
            return wallet_pb2.ResolveDebitResponse(
                outcome=wallet_pb2.DEBIT_OUTCOME_DEBITED,
                debit=wallet_pb2.DebitCoinsResponse(
                    transaction_id=debit.transaction_id,
                    balance=balance_pb(Coins(debit.balance, debit.available)),
                ),
            )
        if resolved.answer is not None:
            return wallet_pb2.ResolveDebitResponse(
                outcome=wallet_pb2.DEBIT_OUTCOME_DEBITED,
                debit=wallet_pb2.DebitCoinsResponse.FromString(resolved.answer),
            )
        if resolved.voided:
            return wallet_pb2.ResolveDebitResponse(outcome=wallet_pb2.DEBIT_OUTCOME_VOIDED)
        return wallet_pb2.ResolveDebitResponse(
            outcome=wallet_pb2.DEBIT_OUTCOME_REFUSED, reason=resolved.reason
        )

    async def ResolveHold(
        self, request: wallet_pb2.ResolveHoldRequest, context: RpcContext
    ) -> wallet_pb2.ResolveHoldResponse:
        scope = f"PlaceHold:{current_principal().service}:{request.user_id}"
        resolved = await self._resolver.hold(scope, request, user_id=request.user_id)
        if resolved.kept is not None:
            hold, coins = resolved.kept
            return wallet_pb2.ResolveHoldResponse(
                outcome=wallet_pb2.HOLD_OUTCOME_PLACED,
                placed=wallet_pb2.PlaceHoldResponse(hold=hold_pb(hold), balance=balance_pb(coins)),
            )
        if resolved.answer is not None:
            return wallet_pb2.ResolveHoldResponse(
                outcome=wallet_pb2.HOLD_OUTCOME_PLACED,
                placed=wallet_pb2.PlaceHoldResponse.FromString(resolved.answer),
            )
        if resolved.voided:
            return wallet_pb2.ResolveHoldResponse(outcome=wallet_pb2.HOLD_OUTCOME_VOIDED)
        return wallet_pb2.ResolveHoldResponse(
            outcome=wallet_pb2.HOLD_OUTCOME_REFUSED, reason=resolved.reason
        )


def debit_scope(user_id: str) -> str:
    """Where a user's DebitCoins request ids are kept (runtime.idempotency; the ledger's request
    id of a debit is this scope, "/" and the caller's request id)."""
    return f"DebitCoins:{user_id}"


def _debit_fingerprinted(request: wallet_pb2.DebitCoinsRequest) -> wallet_pb2.DebitCoinsRequest:
    """The request as its id's fingerprint sees it: without `offered_in`, the catalog's say, which
    a caller of another version may send or not on a retry of the same debit; a retry that
    differed only there must replay, never be refused as a reused id (a gift would then be failed
    after its coins were taken)."""
    fingerprinted = wallet_pb2.DebitCoinsRequest()
    fingerprinted.CopyFrom(request)
    fingerprinted.ClearField("offered_in")
    return fingerprinted
