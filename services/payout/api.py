"""The payout service's gRPC layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from ledger.listing import history_query, statement_period, statement_response
from runtime.access import Access, method_rules, require_owner
from runtime.idempotency import fingerprint, scoped_scope
from runtime.pagination import decode_token, encode_token, instant, page_size, text
from runtime.protos import RpcContext, money, timestamp
from runtime.server import Runtime
from runtime.sql import as_tx
from services.payout import policy
from services.payout.domain import CreatorDiamonds, GiftCredit, Payouts, bucket_of
from services.payout.methods import NewMethod
from services.payout.settings import PayoutSettings
from services.payout.storage import PayoutMethodRecord, WithdrawalRecord

_METHODS = {payout_pb2.PAYOUT_METHOD_PAYPAL: "paypal", payout_pb2.PAYOUT_METHOD_BANK: "bank"}
_METHOD_ENUM = {name: value for value, name in _METHODS.items()}
_STATUS = {
    "pending": payout_pb2.WITHDRAWAL_STATUS_PENDING,
    "processing": payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
    "paid": payout_pb2.WITHDRAWAL_STATUS_PAID,
    "failed": payout_pb2.WITHDRAWAL_STATUS_FAILED,
}


ACCESS = method_rules(
    payout_pb2.DESCRIPTOR.services_by_name["PayoutService"].full_name,
    {
        "GetDiamondBalance": Access.user("creator_id", admin_may_read=True),
        "CreditDiamonds": Access.internal({"gifting"}),
        "BatchCreditDiamonds": Access.internal({"gifting"}),
        "RequestWithdrawal": Access.user("creator_id", moves_money=True),
        "QuoteWithdrawal": Access.user("creator_id", admin_may_read=True),
        "ReverseGiftCredits": Access.admin_only(),
        "AddPayoutMethod": Access.user("creator_id"),
        "ListPayoutMethods": Access.user("creator_id", admin_may_read=True),
        "SetDefaultPayoutMethod": Access.user("creator_id"),
        "RemovePayoutMethod": Access.user("creator_id"),
        "SetCreatorVerification": Access.admin_only(),
        "GetWithdrawal": Access.record_owner(),
        "ListWithdrawals": Access.user("creator_id", admin_may_read=True),
        "ListDiamondEntries": Access.user("creator_id", admin_may_read=True),
        "GetDiamondStatement": Access.user("creator_id", admin_may_read=True),
    },
)
"""Who may call each RPC (see runtime.access): the account acted on is always the token's user."""

_ENTRY_KINDS = {
    "gift": payout_pb2.DIAMOND_ENTRY_KIND_GIFT,
    "withdrawal": payout_pb2.DIAMOND_ENTRY_KIND_WITHDRAWAL,
    "withdrawal_returned": payout_pb2.DIAMOND_ENTRY_KIND_WITHDRAWAL_RETURNED,
    "maturation": payout_pb2.DIAMOND_ENTRY_KIND_MATURATION,
    "reversal": payout_pb2.DIAMOND_ENTRY_KIND_REVERSAL,
    "debt_repayment": payout_pb2.DIAMOND_ENTRY_KIND_DEBT_REPAYMENT,
}
_BUCKETS = {
    "pending": payout_pb2.DIAMOND_BUCKET_PENDING,
    "available": payout_pb2.DIAMOND_BUCKET_AVAILABLE,
    "debt": payout_pb2.DIAMOND_BUCKET_DEBT,
}
_KIND_NAMES = {value: name for name, value in _ENTRY_KINDS.items()}
_KYC = {
    "unverified": payout_pb2.KYC_STATUS_UNVERIFIED,
    "pending": payout_pb2.KYC_STATUS_PENDING,
    "verified": payout_pb2.KYC_STATUS_VERIFIED,
    "rejected": payout_pb2.KYC_STATUS_REJECTED,
}
_KYC_NAMES = {value: name for name, value in _KYC.items()}


def _method_info(m: PayoutMethodRecord) -> payout_pb2.PayoutMethodInfo:
    return payout_pb2.PayoutMethodInfo(
        payout_method_id=m.method_id,
        method=_METHOD_ENUM[m.kind],
        display=m.display,
        is_default=m.is_default,
        create_time=timestamp(m.created_at),
    )


class PayoutApi(payout_pb2_grpc.PayoutServiceServicer):
    def __init__(
        self, runtime: Runtime[PayoutSettings], payouts: Payouts, wake_worker: Callable[[], None]
    ) -> None:
        self._db = runtime.db
        self._idempotency = runtime.idempotency
        self._clock = runtime.clock
        self._settings = runtime.settings
        self._payouts = payouts
        self._wake_worker = wake_worker

    def _balance(self, creator_id: str, diamonds: CreatorDiamonds) -> payout_pb2.DiamondBalance:
        balance = payout_pb2.DiamondBalance(
            creator_id=creator_id,
            diamonds=diamonds.total,
            available_diamonds=diamonds.available,
            available_value=money(
                self._settings.currency_code, policy.cash_value(diamonds.available, self._settings)
            ),
            pending_diamonds=diamonds.pending,
            held_diamonds=diamonds.held,
            paid_out_diamonds=diamonds.paid_out,
            debt_diamonds=diamonds.debt,
        )
        if diamonds.next_available_at is not None:
            balance.next_available_time.CopyFrom(timestamp(diamonds.next_available_at))
        return balance

    def _withdrawal(self, w: WithdrawalRecord) -> payout_pb2.Withdrawal:
        currency = w.currency_code
        return payout_pb2.Withdrawal(
            withdrawal_id=w.withdrawal_id,
            creator_id=w.creator_id,
            diamonds=w.diamonds,
            gross=money(currency, w.gross_minor),
            fee=money(currency, w.fee_minor),
            net=money(currency, w.gross_minor - w.fee_minor),
            method=_METHOD_ENUM[w.method],
            status=_STATUS[w.status],
            failure_reason=w.failure_reason,
            create_time=timestamp(w.created_at),
            update_time=timestamp(w.updated_at),
        )

    async def GetDiamondBalance(
        self, request: payout_pb2.GetDiamondBalanceRequest, context: RpcContext
    ) -> payout_pb2.GetDiamondBalanceResponse:
        async with self._db.driver.read() as tx:
            diamonds = await self._payouts.diamonds(tx, request.creator_id)
        return payout_pb2.GetDiamondBalanceResponse(
            balance=self._balance(request.creator_id, diamonds)
        )

    async def CreditDiamonds(
        self, request: payout_pb2.CreditDiamondsRequest, context: RpcContext
    ) -> payout_pb2.CreditDiamondsResponse:
        (response,) = await self._credit([request])
        return response

    async def BatchCreditDiamonds(
        self, request: payout_pb2.BatchCreditDiamondsRequest, context: RpcContext
    ) -> payout_pb2.BatchCreditDiamondsResponse:
        return payout_pb2.BatchCreditDiamondsResponse(
            responses=await self._credit(request.requests)
        )

    async def _credit(
        self, requests: Sequence[payout_pb2.CreditDiamondsRequest]
    ) -> list[payout_pb2.CreditDiamondsResponse]:
        credits = (  # built when payout takes the batch (see Payouts.credit)
            GiftCredit(
                key=f"{scoped_scope(f'CreditDiamonds:{r.creator_id}')}/{r.request_id}",
                fingerprint=fingerprint(r),
                creator_id=r.creator_id,
                coins=r.coins,
                reference=r.reference,
            )
            for r in requests
        )

        def answer(creator_id: str, diamonds: int, balance: CreatorDiamonds) -> bytes:
            return payout_pb2.CreditDiamondsResponse(
                diamonds_credited=diamonds, balance=self._balance(creator_id, balance)
            ).SerializeToString()

        answers = await self._payouts.credit(self._db.driver, credits, self._clock.now(), answer)
        return [payout_pb2.CreditDiamondsResponse.FromString(a) for a in answers]

    async def RequestWithdrawal(
        self, request: payout_pb2.RequestWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.RequestWithdrawalResponse:
        scope = f"RequestWithdrawal:{request.creator_id}"

        async def effect(conn: AsyncConnection) -> payout_pb2.RequestWithdrawalResponse:
            withdrawal, balance = await self._payouts.request_withdrawal(
                conn,
                creator_id=request.creator_id,
                diamonds=request.diamonds,
                method=_METHODS.get(request.method, ""),
                destination_token=request.destination_token,
                request_id=f"{scope}/{request.request_id}",
                now=self._clock.now(),
                payout_method_id=request.payout_method_id,
            )
            return payout_pb2.RequestWithdrawalResponse(
                withdrawal=self._withdrawal(withdrawal),
                balance=self._balance(request.creator_id, balance),
            )

        response = await self._idempotency.once(
            scope, request, payout_pb2.RequestWithdrawalResponse, effect
        )
        self._wake_worker()
        return response

    async def GetWithdrawal(
        self, request: payout_pb2.GetWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.GetWithdrawalResponse:
        async with self._db.read() as conn:
            withdrawal = await self._payouts.withdrawal(conn, request.withdrawal_id)
        require_owner(withdrawal.creator_id)
        return payout_pb2.GetWithdrawalResponse(withdrawal=self._withdrawal(withdrawal))

    async def ListWithdrawals(
        self, request: payout_pb2.ListWithdrawalsRequest, context: RpcContext
    ) -> payout_pb2.ListWithdrawalsResponse:
        size = page_size(request.page_size)
        kind = f"withdrawals:{request.creator_id}"
        before = decode_token(request.page_token, kind, instant, text)
        async with self._db.read() as conn:
            rows = await self._payouts.withdrawals_of(
                conn,
                request.creator_id,
                limit=size + 1,
                before=(before[0], before[1]) if before else None,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = encode_token(kind, rows[-1].created_at.isoformat(), rows[-1].withdrawal_id)
        return payout_pb2.ListWithdrawalsResponse(
            withdrawals=[self._withdrawal(w) for w in rows], next_page_token=token
        )

    async def AddPayoutMethod(
        self, request: payout_pb2.AddPayoutMethodRequest, context: RpcContext
    ) -> payout_pb2.AddPayoutMethodResponse:
        if request.HasField("bank"):
            method = NewMethod(
                "bank", bank_token=request.bank.processor_token, bank_last4=request.bank.last4
            )
        else:
            method = NewMethod("paypal", paypal_email=request.paypal.email)

        async def effect(conn: AsyncConnection) -> payout_pb2.AddPayoutMethodResponse:
            added = await self._payouts.methods.add(
                conn,
                request.creator_id,
                method,
                make_default=request.make_default,
                now=self._clock.now(),
            )
            return payout_pb2.AddPayoutMethodResponse(payout_method=_method_info(added))

        return await self._idempotency.once(
            f"AddPayoutMethod:{request.creator_id}",
            request,
            payout_pb2.AddPayoutMethodResponse,
            effect,
        )

    async def ListPayoutMethods(
        self, request: payout_pb2.ListPayoutMethodsRequest, context: RpcContext
    ) -> payout_pb2.ListPayoutMethodsResponse:
        async with self._db.read() as conn:
            methods = await self._payouts.methods.of(conn, request.creator_id)
            status, _ = await self._payouts.methods.verification(conn, request.creator_id)
        return payout_pb2.ListPayoutMethodsResponse(
            payout_methods=[_method_info(m) for m in methods], kyc_status=_KYC[status]
        )

    async def SetDefaultPayoutMethod(
        self, request: payout_pb2.SetDefaultPayoutMethodRequest, context: RpcContext
    ) -> payout_pb2.SetDefaultPayoutMethodResponse:
        async def effect(conn: AsyncConnection) -> payout_pb2.SetDefaultPayoutMethodResponse:
            method = await self._payouts.methods.set_default(
                conn, request.creator_id, request.payout_method_id
            )
            return payout_pb2.SetDefaultPayoutMethodResponse(payout_method=_method_info(method))

        return await self._idempotency.once(
            f"SetDefaultPayoutMethod:{request.creator_id}",
            request,
            payout_pb2.SetDefaultPayoutMethodResponse,
            effect,
        )

    async def RemovePayoutMethod(
        self, request: payout_pb2.RemovePayoutMethodRequest, context: RpcContext
    ) -> payout_pb2.RemovePayoutMethodResponse:
        async def effect(conn: AsyncConnection) -> payout_pb2.RemovePayoutMethodResponse:
            methods = self._payouts.methods
            await methods.remove(
                conn, request.creator_id, request.payout_method_id, self._clock.now()
            )
            left = await methods.of(conn, request.creator_id)
            return payout_pb2.RemovePayoutMethodResponse(
                payout_methods=[_method_info(m) for m in left]
            )

        return await self._idempotency.once(
            f"RemovePayoutMethod:{request.creator_id}",
            request,
            payout_pb2.RemovePayoutMethodResponse,
            effect,
        )

    async def SetCreatorVerification(
        self, request: payout_pb2.SetCreatorVerificationRequest, context: RpcContext
    ) -> payout_pb2.SetCreatorVerificationResponse:
        async def effect(conn: AsyncConnection) -> payout_pb2.SetCreatorVerificationResponse:
            await self._payouts.methods.set_verification(
                conn,
                request.creator_id,
                _KYC_NAMES[request.status],
                request.reason,
                self._clock.now(),
            )
            return payout_pb2.SetCreatorVerificationResponse(kyc_status=request.status)

        return await self._idempotency.once(
            "SetCreatorVerification",
            request,
            payout_pb2.SetCreatorVerificationResponse,
            effect,
        )

    async def ReverseGiftCredits(
        self, request: payout_pb2.ReverseGiftCreditsRequest, context: RpcContext
    ) -> payout_pb2.ReverseGiftCreditsResponse:
        async def effect(conn: AsyncConnection) -> payout_pb2.ReverseGiftCreditsResponse:
            done = await self._payouts.reverse_gifts(
                as_tx(conn), request.gift_ids, reason=request.reason, now=self._clock.now()
            )
            found = {r.gift_id for r in done}
            return payout_pb2.ReverseGiftCreditsResponse(
                reversals=[
                    payout_pb2.GiftReversal(
                        gift_id=r.gift_id,
                        creator_id=r.creator_id,
                        diamonds=r.diamonds,
                        from_pending=r.from_pending,
                        from_available=r.from_available,
                        to_debt=r.to_debt,
                        already_reversed=r.already_reversed,
                    )
                    for r in done
                ],
                not_found=[g for g in request.gift_ids if g not in found],
            )

        return await self._idempotency.once(
            "ReverseGiftCredits", request, payout_pb2.ReverseGiftCreditsResponse, effect
        )

    async def QuoteWithdrawal(
        self, request: payout_pb2.QuoteWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.QuoteWithdrawalResponse:
        async with self._db.driver.read() as tx:
            quote, standing, refusal = await self._payouts.quote(
                tx, request.creator_id, request.diamonds
            )
        currency = self._settings.currency_code
        return payout_pb2.QuoteWithdrawalResponse(
            diamonds=quote.diamonds,
            gross=money(currency, quote.gross_minor),
            fee=money(currency, quote.fee_minor),
            net=money(currency, quote.net_minor),
            minimum=money(currency, self._settings.min_withdrawal_minor),
            available_diamonds=standing.available,
            refusal=refusal,
        )

    async def ListDiamondEntries(
        self, request: payout_pb2.ListDiamondEntriesRequest, context: RpcContext
    ) -> payout_pb2.ListDiamondEntriesResponse:
        query = history_query(request, request.creator_id, _KIND_NAMES)
        async with self._db.driver.read() as tx:
            rows = await self._payouts.entries(
                tx,
                request.creator_id,
                limit=query.size + 1,
                cursor=query.cursor,
                kinds=query.kinds,
                since=query.since,
                until=query.until,
            )
        return payout_pb2.ListDiamondEntriesResponse(
            entries=[
                payout_pb2.DiamondEntry(
                    entry_id=str(row.entry_id),
                    transaction_id=row.transaction_id,
                    kind=_ENTRY_KINDS.get(row.kind, payout_pb2.DIAMOND_ENTRY_KIND_UNSPECIFIED),
                    diamonds=row.amount,
                    balance_after=row.balance_after or 0,
                    reference=row.reference,
                    create_time=timestamp(row.created_at),
                    bucket=_BUCKETS[bucket_of(row.account_id)],
                )
                for row in rows[: query.size]
            ],
            next_page_token=query.next_token(rows),
        )

    async def GetDiamondStatement(
        self, request: payout_pb2.GetDiamondStatementRequest, context: RpcContext
    ) -> payout_pb2.GetDiamondStatementResponse:
        since, until = statement_period(request, self._clock.now())
        async with self._db.driver.read() as tx:
            period = await self._payouts.statement(tx, request.creator_id, since, until)
        return statement_response(
            payout_pb2.GetDiamondStatementResponse,
            payout_pb2.DiamondStatementLine,
            _ENTRY_KINDS,
            period,
            since,
            until,
        )
