"""Where creators' money goes, and who may take it out: payout methods and verification (KYC).

A payout method is PayPal (an email, shown masked) or a bank account (the processor's token and the
last four digits; a full account number is refused and never stored or logged). A creator's first
method is their default. A creator must be verified by an admin before any withdrawal.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    enum_name,
)
from runtime.ids import time_ordered_id
from services.payout import storage

MAX_PAYOUT_METHODS = 20
"""Payout methods one creator keeps (ListPayoutMethods answers them all, unpaged)."""

_DIGIT_RUN = re.compile(r"\d(?:[ ./_-]?\d){7,}")
"""Eight digits or more in a row, perhaps grouped ("1234 5678"): an account number, never a
processor's token."""


def refuse_account_number(token: str, field: str) -> None:
    """BANK_ACCOUNT_NUMBER_REFUSED for a bank destination holding what looks like the account's
    number: account numbers never reach payout, only the processor's token for them."""
    if _DIGIT_RUN.search(token):
        raise _account_number_refused(field)


@dataclass(frozen=True)
class NewMethod:
    kind: str
    """"paypal" or "bank"."""
    paypal_email: str = ""
    bank_token: str = ""
    bank_last4: str = ""


def mask_email(email: str) -> str:
    """ava.smith@example.com -> a********@example.com: enough to recognise, not to use."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}{'*' * max(len(local) - 1, 1)}@{domain}"


def _account_number_refused(field: str) -> InvalidArgument:
    return InvalidArgument(
        "BANK_ACCOUNT_NUMBER_REFUSED",
        f"{field} looks like a bank account number: send the processor's token for the account and "
        "its last four digits, never the number",
        violations=(FieldViolation(field, "must be a processor token, not an account number"),),
    )


def _same(kept: str, given: str) -> bool:
    """One destination: an email's case does not matter (PayPal treats them as one), a token's does."""
    if "@" in kept:
        return kept.casefold() == given.casefold()
    return kept == given


class PayoutMethods:
    async def add(
        self,
        conn: AsyncConnection,
        creator_id: str,
        method: NewMethod,
        *,
        make_default: bool,
        now: dt.datetime,
    ) -> storage.PayoutMethodRecord:
        if method.kind == "bank":
            refuse_account_number(method.bank_token, "bank.processor_token")
            destination, display = method.bank_token, f"bank ····{method.bank_last4}"
        else:
            destination, display = method.paypal_email, f"PayPal {mask_email(method.paypal_email)}"
        # One creator's additions one at a time: two adding the same destination at once both
        # found it absent and both added it.
        await storage.lock_creator_methods(conn, creator_id)
        existing = await storage.payout_methods_of(conn, creator_id)
        for kept in existing:
            if kept.kind == method.kind and _same(kept.destination_token, destination):
                raise AlreadyExists(
                    "PAYOUT_METHOD_EXISTS",
                    f"{kept.display} is already one of {creator_id}'s payout methods "
                    f"({kept.method_id}); SetDefaultPayoutMethod makes it the default",
                    method_id=kept.method_id,
                )
        if len(existing) >= MAX_PAYOUT_METHODS:
            raise FailedPrecondition(
                "TOO_MANY_PAYOUT_METHODS",
                f"{creator_id} has {len(existing)} payout methods, the most a creator may keep: "
                "remove one (RemovePayoutMethod) first",
                creator_id=creator_id,
                limit=str(MAX_PAYOUT_METHODS),
            )
        record = storage.PayoutMethodRecord(
            method_id=time_ordered_id(),
            creator_id=creator_id,
            kind=method.kind,
            destination_token=destination,
            display=display,
            is_default=False,
            created_at=now,
        )
        await storage.insert_payout_method(conn, record)
        if make_default or not existing:
            await storage.set_default_method(conn, creator_id, record.method_id)
            record = storage.PayoutMethodRecord(**{**record.__dict__, "is_default": True})
        return record

    async def of(self, conn: AsyncConnection, creator_id: str) -> list[storage.PayoutMethodRecord]:
        return await storage.payout_methods_of(conn, creator_id)

    async def one(
        self,
        conn: AsyncConnection,
        creator_id: str,
        method_id: str,
        *,
        lock: storage.Lock = None,
    ) -> storage.PayoutMethodRecord:
        """A method of this creator in use; NOT_FOUND PAYOUT_METHOD_NOT_FOUND otherwise."""
        for method in await storage.payout_methods_of(conn, creator_id, lock=lock):
            if method.method_id == method_id:
                return method
        raise NotFound(
            "PAYOUT_METHOD_NOT_FOUND",
            f"creator {creator_id} has no payout method {method_id!r}",
            method_id=method_id,
        )

    async def set_default(
        self, conn: AsyncConnection, creator_id: str, method_id: str
    ) -> storage.PayoutMethodRecord:
        method = await self.one(conn, creator_id, method_id)
        await storage.set_default_method(conn, creator_id, method_id)
        return storage.PayoutMethodRecord(**{**method.__dict__, "is_default": True})

    async def remove(
        self, conn: AsyncConnection, creator_id: str, method_id: str, now: dt.datetime
    ) -> None:
        """Remove a method; not while a withdrawal on it is on its way (METHOD_IN_USE). When the
        default goes, the oldest remaining method becomes the default."""
        # Locked first: a withdrawal paying through it (which holds it in share) commits before
        # the check below, or finds it removed.
        method = await self.one(conn, creator_id, method_id, lock="update")
        if await storage.open_withdrawals_on(conn, method_id):
            raise FailedPrecondition(
                "METHOD_IN_USE",
                f"a withdrawal to {method.display} is still on its way; remove it once it has "
                "ended (paid, failed, or cancelled: one the processor cannot be reached about is "
                "parked for support to retry or give up)",
                method_id=method_id,
            )
        await storage.remove_method(conn, method_id, now)
        if method.is_default:
            left = await storage.payout_methods_of(conn, creator_id)
            if left:
                await storage.set_default_method(conn, creator_id, left[0].method_id)

    async def for_withdrawal(
        self,
        conn: AsyncConnection,
        creator_id: str,
        method_id: str,
    ) -> storage.PayoutMethodRecord | None:
        """The method a withdrawal pays: the one named, else the creator's default (None: the
        creator has none); held in share until the withdrawal is written, so it cannot be removed
        meanwhile (RemovePayoutMethod would not see the withdrawal on its way)."""
        if method_id:
            return await self.one(conn, creator_id, method_id, lock="share")
        methods = await storage.payout_methods_of(conn, creator_id, lock="share")
        return next((m for m in methods if m.is_default), None)

    async def verification(self, conn: AsyncConnection, creator_id: str) -> tuple[str, str]:
        return await storage.verification_of(conn, creator_id)

    async def set_verification(
        self,
        conn: AsyncConnection,
        creator_id: str,
        status: str,
        reason: str,
        now: dt.datetime,
        *,
        time_zone: str = "",
    ) -> None:
        await storage.set_verification(conn, creator_id, status, reason, now, time_zone)

    async def time_zone(self, conn: AsyncConnection, creator_id: str) -> str:
        """The IANA time zone whose calendar day the creator's daily cap counts."""
        return await storage.time_zone_of(conn, creator_id)

    async def require_verified(self, conn: AsyncConnection, creator_id: str) -> None:
        """FAILED_PRECONDITION KYC_REQUIRED unless an admin verified the creator; the verification
        is held in share until the withdrawal is written (a revocation waits for it, or it sees the
        revocation)."""
        status, reason = await storage.verification_of(conn, creator_id, lock="share")
        if status != "verified":
            why = f" ({reason})" if reason and status == "rejected" else ""
            raise FailedPrecondition(
                "KYC_REQUIRED",
                f"creator {creator_id} must be verified before withdrawing; verification is "
                f"{status}{why}",
                creator_id=creator_id,
                kyc_status=enum_name("KYC_STATUS", status),
            )
