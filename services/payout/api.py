"""The payout service's gRPC layer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from ledger.entry_ids import EntryIds
from ledger.listing import history_query, statement_period, statement_response
from runtime.access import (
    Access,
    method_rules,
    require_another_admin,
    require_owner,
    require_reason,
)
from runtime.auth import current_principal
from runtime.idempotency import acting_scope, caller_scope, fingerprints
from runtime.pagination import decode_token, instant, next_page, page_size, text
from runtime.protos import RpcContext, money, timestamp, to_datetime
from runtime.server import Runtime
from runtime.sql import as_tx
from services.payout import policy
from services.payout.callbacks import Callbacks
from services.payout.domain import CreatorDiamonds, GiftCredit, Payouts, bucket_of
from services.payout.methods import NewMethod
from services.payout.reconciliation import Reconciler
from services.payout.settings import PayoutSettings
from services.payout.storage import PayoutMethodRecord, WithdrawalEvent, WithdrawalRecord
from services.payout.withdrawals import Withdrawals, check_one_off_destination, time_zone

_METHODS = {payout_pb2.PAYOUT_METHOD_PAYPAL: "paypal", payout_pb2.PAYOUT_METHOD_BANK: "bank"}
_METHOD_ENUM = {name: value for value, name in _METHODS.items()}
_STATUS = {
    "requested": payout_pb2.WITHDRAWAL_STATUS_REQUESTED,
    "in_review": payout_pb2.WITHDRAWAL_STATUS_IN_REVIEW,
    "approved": payout_pb2.WITHDRAWAL_STATUS_APPROVED,
    "processing": payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
    "paid": payout_pb2.WITHDRAWAL_STATUS_PAID,
    "failed": payout_pb2.WITHDRAWAL_STATUS_FAILED,
    "returned": payout_pb2.WITHDRAWAL_STATUS_RETURNED,
    "rejected": payout_pb2.WITHDRAWAL_STATUS_REJECTED,
    "cancelled": payout_pb2.WITHDRAWAL_STATUS_CANCELLED,
}
_EVENT_KINDS = {
    "status_changed": payout_pb2.WITHDRAWAL_EVENT_KIND_STATUS_CHANGED,
    "parked": payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED,
    "retried": payout_pb2.WITHDRAWAL_EVENT_KIND_RETRIED,
}
_QUEUES = {
    payout_pb2.WITHDRAWAL_QUEUE_IN_REVIEW: "in_review",
    payout_pb2.WITHDRAWAL_QUEUE_PARKED: "parked",
    payout_pb2.WITHDRAWAL_QUEUE_PROCESSING: "processing",
}
_MISMATCHES = {
    "paid_there_not_here": payout_pb2.MISMATCH_KIND_PAID_THERE_NOT_HERE,
    "paid_here_not_there": payout_pb2.MISMATCH_KIND_PAID_HERE_NOT_THERE,
    "amount_differs": payout_pb2.MISMATCH_KIND_AMOUNT_DIFFERS,
    "unknown_at_processor": payout_pb2.MISMATCH_KIND_UNKNOWN_AT_PROCESSOR,
    "paid_more_than_once": payout_pb2.MISMATCH_KIND_PAID_MORE_THAN_ONCE,
}


SERVICE = payout_pb2.DESCRIPTOR.services_by_name["PayoutService"].full_name
ACCESS = method_rules(
    SERVICE,
    {
        "GetDiamondBalance": Access.user("creator_id", admin_may_read=True),
        "CreditDiamonds": Access.internal({"gifting"}),
        "BatchCreditDiamonds": Access.internal({"gifting"}),
        "RequestWithdrawal": Access.user("creator_id", moves_money=True),
        "QuoteWithdrawal": Access.user("creator_id", admin_may_read=True),
        "ReverseGiftCredits": Access.admin_only(),
        "ListReversedCredits": Access.internal({"gifting"}),
        "AddPayoutMethod": Access.user("creator_id", writes=True),
        "ListPayoutMethods": Access.user("creator_id", admin_may_read=True),
        "SetDefaultPayoutMethod": Access.user("creator_id", writes=True),
        "RemovePayoutMethod": Access.user("creator_id", writes=True),
        "SetCreatorVerification": Access.admin_only(),
        "GetWithdrawal": Access.record_owner(),
        "CancelWithdrawal": Access.record_owner(writes=True),
        "ReviewWithdrawal": Access.admin_only(),
        "ListWithdrawalQueue": Access.admin_only(),
        "RetryWithdrawal": Access.admin_only(),
        "HandleProcessorEvent": Access.internal({"payout-webhooks"}),
        "ReconcileWithdrawals": Access.admin_only(),
        "ListWithdrawals": Access.user("creator_id", admin_may_read=True),
        "ListDiamondEntries": Access.user("creator_id", admin_may_read=True),
        "GetDiamondStatement": Access.user("creator_id", admin_may_read=True),
        "GetRevenueReport": Access.admin_only(),
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
        self,
        runtime: Runtime[PayoutSettings],
        payouts: Payouts,
        withdrawals: Withdrawals,
        callbacks: Callbacks,
        reconciler: Reconciler,
        wake_worker: Callable[[], None],
        processor_has: Callable[[str], Awaitable[bool]],
        entry_ids: EntryIds,
    ) -> None:
        self._db = runtime.db
        self._entry_ids = entry_ids
        self._idempotency = runtime.idempotency
        self._clock = runtime.clock
        self._settings = runtime.settings
        self._payouts = payouts
        self._withdrawals = withdrawals
        self._callbacks = callbacks
        self._reconciler = reconciler
        self._wake_worker = wake_worker
        self._processor_has = processor_has
        runtime.replay_stored(
            f"/{SERVICE}/RequestWithdrawal",
            lambda request: withdrawal_scope(request.creator_id),
            payout_pb2.RequestWithdrawalResponse,
        )

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

    def _withdrawal(
        self, w: WithdrawalRecord, history: Sequence[WithdrawalEvent] = ()
    ) -> payout_pb2.Withdrawal:
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
            payout_method_id=w.method_id or "",
            history=[
                payout_pb2.WithdrawalEvent(
                    status=_STATUS[e.status],
                    actor=e.actor,
                    reason=e.reason,
                    time=timestamp(e.at),
                    kind=_EVENT_KINDS[e.kind],
                )
                for e in history
            ],
            processor_reference=w.processor_reference or "",
            attempts=w.attempts,
            parked=w.parked,
            last_error=w.last_error,
        )

    async def _with_history(
        self, conn: AsyncConnection, rows: Sequence[WithdrawalRecord]
    ) -> list[payout_pb2.Withdrawal]:
        events = await self._withdrawals.histories(conn, [w.withdrawal_id for w in rows])
        return [self._withdrawal(w, events.get(w.withdrawal_id, ())) for w in rows]

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
                key=f"{caller_scope(f'CreditDiamonds:{r.creator_id}')}/{r.request_id}",
                request=f"{caller_scope('CreditDiamonds')}/{r.request_id}",
                fingerprint=prints[0],
                creator_id=r.creator_id,
                coins=r.coins,
                reference=r.reference,
                also=prints[1:],
            )
            for r in requests
            for prints in (fingerprints(r),)
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
        scope = withdrawal_scope(request.creator_id)
        method = _METHODS.get(request.method, "")
        check_one_off_destination(method, request.destination_token)  # bad input: nothing claimed

        async def effect(conn: AsyncConnection) -> payout_pb2.RequestWithdrawalResponse:
            withdrawal, balance = await self._withdrawals.request(
                conn,
                creator_id=request.creator_id,
                diamonds=request.diamonds,
                method=method,
                destination_token=request.destination_token,
                request_id=f"{scope}/{request.request_id}",
                now=self._clock.now(),
                payout_method_id=request.payout_method_id,
            )
            (answer,) = await self._with_history(conn, [withdrawal])
            return payout_pb2.RequestWithdrawalResponse(
                withdrawal=answer, balance=self._balance(request.creator_id, balance)
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
            withdrawal = await self._withdrawals.get(conn, request.withdrawal_id)
            require_owner(withdrawal.creator_id, record=f"withdrawal {withdrawal.withdrawal_id}")
            (answer,) = await self._with_history(conn, [withdrawal])
        return payout_pb2.GetWithdrawalResponse(withdrawal=answer)

    async def CancelWithdrawal(
        self, request: payout_pb2.CancelWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.CancelWithdrawalResponse:
        async with self._db.read() as conn:  # the owner is checked before anything is written
            withdrawal = await self._withdrawals.get(conn, request.withdrawal_id)
        owner = withdrawal.creator_id
        require_owner(owner, record=f"withdrawal {request.withdrawal_id}")
        require_reason(owner, request.reason, record=f"withdrawal {request.withdrawal_id}")
        never_received = await self._withdrawals.gives_up(withdrawal, self._processor_has)

        async def effect(conn: AsyncConnection) -> payout_pb2.CancelWithdrawalResponse:
            cancelled = await self._withdrawals.cancel(
                conn,
                request.withdrawal_id,
                actor=current_principal().actor,
                reason=request.reason,
                now=self._clock.now(),
                never_received=never_received,
            )
            (answer,) = await self._with_history(conn, [cancelled])
            return payout_pb2.CancelWithdrawalResponse(withdrawal=answer)

        return await self._idempotency.once(
            f"CancelWithdrawal:{owner}",
            request,
            payout_pb2.CancelWithdrawalResponse,
            effect,
        )

    async def ReviewWithdrawal(
        self, request: payout_pb2.ReviewWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.ReviewWithdrawalResponse:
        async def effect(conn: AsyncConnection) -> payout_pb2.ReviewWithdrawalResponse:
            reviewed = await self._withdrawals.review(
                conn,
                request.withdrawal_id,
                approve=request.decision == payout_pb2.REVIEW_DECISION_APPROVE,
                reason=request.reason,
                reviewer=current_principal().actor,
                now=self._clock.now(),
            )
            (answer,) = await self._with_history(conn, [reviewed])
            return payout_pb2.ReviewWithdrawalResponse(withdrawal=answer)

        response = await self._idempotency.once(
            acting_scope("ReviewWithdrawal"),
            request,
            payout_pb2.ReviewWithdrawalResponse,
            effect,
        )
        self._wake_worker()
        return response

    async def ListWithdrawalQueue(
        self, request: payout_pb2.ListWithdrawalQueueRequest, context: RpcContext
    ) -> payout_pb2.ListWithdrawalQueueResponse:
        size = page_size(request.page_size)
        queue = _QUEUES[request.queue]
        kind = f"withdrawal-queue:{queue}"
        after = decode_token(request.page_token, kind, instant, text)
        async with self._db.read() as conn:
            rows = await self._withdrawals.queue(
                conn, queue, limit=size + 1, after=(after[0], after[1]) if after else None
            )
            rows, token = next_page(rows, size, kind, lambda w: _queue_key(queue, w))
            withdrawals = await self._with_history(conn, rows)
        return payout_pb2.ListWithdrawalQueueResponse(
            withdrawals=withdrawals, next_page_token=token
        )

    async def RetryWithdrawal(
        self, request: payout_pb2.RetryWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.RetryWithdrawalResponse:
        scope = acting_scope("RetryWithdrawal")
        # A repeat gets its first answer, before the resend check asks anyone anything (it was
        # re-checked: KYC_REQUIRED for a retry that had been answered OK, review r5).
        answered = await self._idempotency.twin_answer(scope, request)
        if answered is not None:
            return answered.replay(payout_pb2.RetryWithdrawalResponse)
        async with self._db.read() as conn:
            await self._withdrawals.check_resend(conn, request.withdrawal_id, self._processor_has)

        async def effect(conn: AsyncConnection) -> payout_pb2.RetryWithdrawalResponse:
            retried = await self._withdrawals.retry(
                conn,
                request.withdrawal_id,
                actor=current_principal().actor,
                reason=request.reason,
                now=self._clock.now(),
            )
            (answer,) = await self._with_history(conn, [retried])
            return payout_pb2.RetryWithdrawalResponse(withdrawal=answer)

        response = await self._idempotency.once(
            scope,
            request,
            payout_pb2.RetryWithdrawalResponse,
            effect,
        )
        self._wake_worker()
        return response

    async def HandleProcessorEvent(
        self, request: payout_pb2.HandleProcessorEventRequest, context: RpcContext
    ) -> payout_pb2.HandleProcessorEventResponse:
        handled = await self._callbacks.handle(request.body, request.signature)
        return payout_pb2.HandleProcessorEventResponse(
            event_id=handled.event_id,
            duplicate=handled.duplicate,
            withdrawal_id=handled.withdrawal_id,
            status=_STATUS.get(handled.status, payout_pb2.WITHDRAWAL_STATUS_UNSPECIFIED),
        )

    async def ReconcileWithdrawals(
        self, request: payout_pb2.ReconcileWithdrawalsRequest, context: RpcContext
    ) -> payout_pb2.ReconcileWithdrawalsResponse:
        report = await (self._reconciler.run() if request.run_now else self._reconciler.latest())
        response = payout_pb2.ReconcileWithdrawalsResponse(
            run_id=report.run_id,
            checked=report.checked,
            mismatches=[
                payout_pb2.ReconciliationMismatch(
                    kind=_MISMATCHES[m.kind],
                    withdrawal_id=m.withdrawal_id,
                    processor_reference=m.processor_reference,
                    our_status=_STATUS.get(m.our_status, payout_pb2.WITHDRAWAL_STATUS_UNSPECIFIED),
                    processor_status=m.processor_status,
                    our_amount_minor=m.our_amount_minor,
                    processor_amount_minor=m.processor_amount_minor,
                )
                for m in report.mismatches
            ],
        )
        if report.started_at is not None and report.finished_at is not None:
            response.start_time.CopyFrom(timestamp(report.started_at))
            response.finish_time.CopyFrom(timestamp(report.finished_at))
        return response

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
            rows, token = next_page(
                rows, size, kind, lambda w: (w.created_at.isoformat(), w.withdrawal_id)
            )
            withdrawals = await self._with_history(conn, rows)
        return payout_pb2.ListWithdrawalsResponse(withdrawals=withdrawals, next_page_token=token)

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
            zone = await self._payouts.methods.time_zone(conn, request.creator_id)
        return payout_pb2.ListPayoutMethodsResponse(
            payout_methods=[_method_info(m) for m in methods],
            kyc_status=_KYC[status],
            time_zone=zone,
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
        require_another_admin(request.creator_id, "set the verification")
        if request.time_zone:
            time_zone(request.time_zone)  # INVALID_ARGUMENT before anything is written

        async def effect(conn: AsyncConnection) -> payout_pb2.SetCreatorVerificationResponse:
            await self._payouts.methods.set_verification(
                conn,
                request.creator_id,
                _KYC_NAMES[request.status],
                request.reason,
                self._clock.now(),
                time_zone=request.time_zone,
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
            # request.reason is kept by the admin audit trail, not here.
            done = await self._payouts.reverse_gifts(
                as_tx(conn), request.gift_ids, now=self._clock.now()
            )
            found = {r.gift_id for r in done}
            return payout_pb2.ReverseGiftCreditsResponse(
                reversals=[
                    payout_pb2.GiftReversal(
                        gift_id=r.gift_id,
                        creator_id=r.creator_id,
                        diamonds=r.diamonds,
                        diamonds_taken=r.taken,
                        from_pending=r.from_pending,
                        from_available=r.from_available,
                        to_debt=r.to_debt,
                        to_available=r.to_available,
                        already_reversed=r.already_reversed,
                    )
                    for r in done
                ],
                not_found=[g for g in request.gift_ids if g not in found],
            )

        return await self._idempotency.once(
            "ReverseGiftCredits", request, payout_pb2.ReverseGiftCreditsResponse, effect
        )

    async def ListReversedCredits(
        self, request: payout_pb2.ListReversedCreditsRequest, context: RpcContext
    ) -> payout_pb2.ListReversedCreditsResponse:
        async with self._db.driver.read() as tx:
            found = await self._payouts.reversed_credits(
                tx, request.after_sequence, page_size(request.page_size, 100, 1000)
            )
        return payout_pb2.ListReversedCreditsResponse(
            credits=[
                payout_pb2.ReversedCredit(
                    sequence=r.sequence,
                    gift_id=r.gift_id,
                    creator_id=r.creator_id,
                    diamonds=r.diamonds,
                    diamonds_taken=r.taken,
                )
                for r in found
            ]
        )

    async def QuoteWithdrawal(
        self, request: payout_pb2.QuoteWithdrawalRequest, context: RpcContext
    ) -> payout_pb2.QuoteWithdrawalResponse:
        async with self._db.read() as conn:
            quote, standing, refusal = await self._withdrawals.quote(
                conn, request.creator_id, request.diamonds, self._clock.now()
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
        query = history_query(request, request.creator_id, _KIND_NAMES, self._entry_ids)
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
                    entry_id=self._entry_ids.public(row.entry_id),
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
        async with self._db.driver.snapshot() as tx:  # opening, lines, closing: one moment
            period = await self._payouts.statement(tx, request.creator_id, since, until)
        return statement_response(
            payout_pb2.GetDiamondStatementResponse,
            payout_pb2.DiamondStatementLine,
            _ENTRY_KINDS,
            period,
            since,
            until,
        )

    async def GetRevenueReport(
        self, request: payout_pb2.GetRevenueReportRequest, context: RpcContext
    ) -> payout_pb2.GetRevenueReportResponse:
        since = to_datetime(request.start_time, "start_time")
        until = (
            to_datetime(request.end_time, "end_time")
            if request.HasField("end_time")
            else self._clock.now()
        )
        async with self._db.driver.read() as tx:
            days = await self._payouts.revenue(tx, since, until)
        total = payout_pb2.RevenueDay(
            day="total",
            gifts=sum(d.gifts for d in days),
            coins=sum(d.coins for d in days),
            diamonds=sum(d.diamonds for d in days),
            gifts_value_micros=sum(d.gifts_value for d in days),
            creators_value_micros=sum(d.creators_value for d in days),
            platform_revenue_micros=sum(d.platform for d in days),
        )
        return payout_pb2.GetRevenueReportResponse(
            currency_code=self._settings.currency_code,
            days=[
                payout_pb2.RevenueDay(
                    day=d.day,
                    gifts=d.gifts,
                    coins=d.coins,
                    diamonds=d.diamonds,
                    gifts_value_micros=d.gifts_value,
                    creators_value_micros=d.creators_value,
                    platform_revenue_micros=d.platform,
                )
                for d in days
            ],
            total=total,
        )


def withdrawal_scope(creator_id: str) -> str:
    """Where a creator's RequestWithdrawal request ids are kept (runtime.idempotency)."""
    return f"RequestWithdrawal:{creator_id}"


def _queue_key(queue: str, withdrawal: WithdrawalRecord) -> tuple[str, str]:
    """A queue's sort key: when it was parked (the parked queue) or made (the others)."""
    at = withdrawal.parked_at if queue == "parked" else withdrawal.created_at
    assert at is not None
    return at.isoformat(), withdrawal.withdrawal_id
