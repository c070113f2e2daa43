"""The access rules as the README's "Security model" table states them, transcribed as data.

The security matrix (tests/test_security.py) derives every refusal it expects from this table, not from
the services' own ACCESS rules under test; and it checks that the rules the services enforce are
exactly these, so a drift in either the code or the documentation fails, naming the RPC. Every RPC
the services serve must be here.

Where the table is silent, the entry says what the code did when it was transcribed:
- CaptureHold, ReleaseHold, GetHold ("`promotion` only") and RecordPaymentEvent ("`payment-webhooks`
  only"): no user token (the table says "no user token" only for ReportDelivery, ResolveDebit,
  ResolveHold and the credits);
- ListParkedCredits: audited like every admin call (the table says only "redelivery audited");
- ListAdminActions: not audited (the table says nothing; the README's Audit paragraph says every admin
  call is).
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN_CALLERS = frozenset({"gateway", "admin-console"})
USER_CALLERS = frozenset({"gateway", "admin-console"})
"""The table's "`gateway`, `admin-console` only, with a user token": the callers that carry users'
requests."""


@dataclass(frozen=True)
class Documented:
    callers: frozenset[str] | None
    """Services that may call (certificate common names); None: every platform caller."""
    needs_user: bool
    """A user token is required."""
    owner_field: str | None = None
    """The request field naming the account acted on (the token's user, or an admin's read)."""
    owner_in_record: bool = False
    """A record named by id (a read, or EndPromotion): its owner, or an admin (audited)."""
    admin: bool = False
    """Admin role required."""
    audited: bool = False
    """Every call is written to the admin audit trail (the admin actions)."""
    admin_may_read: bool = False
    """An admin may read any account named in `owner_field` (audited)."""


def _user_reads(owner: str) -> Documented:
    return Documented(USER_CALLERS, True, owner_field=owner, admin_may_read=True)


def _user_writes(owner: str) -> Documented:
    return Documented(USER_CALLERS, True, owner_field=owner)


_RECORD = Documented(USER_CALLERS, True, owner_in_record=True)
_PUBLIC = Documented(USER_CALLERS, True)
_ADMIN = Documented(ADMIN_CALLERS, True, admin=True, audited=True)
_AUDIT_TRAIL = Documented(ADMIN_CALLERS, True, admin=True)
"""ListAdminActions: the table says only "that service's audit trail", not "audited"; reading the
trail is not itself recorded (the code's rule), though the README's Audit paragraph says "every admin
call" writes a record."""


def _only(*callers: str, owner_field: str | None = None) -> Documented:
    return Documented(frozenset(callers), owner_field is not None, owner_field=owner_field)


_W, _G, _P, _PR = (
    "/coins.wallet.v1.WalletService/",
    "/coins.gifting.v1.GiftingService/",
    "/coins.payout.v1.PayoutService/",
    "/coins.promotion.v1.PromotionService/",
)
_AUDIT = "/coins.common.v1.AdminAuditService/ListAdminActions"
_LEDGER = "/coins.common.v1.LedgerAuditService/AuditLedger"

DOCUMENTED: dict[str, dict[str, Documented]] = {
    "wallet": {
        _W + "OpenAccount": _user_writes("user_id"),
        _W + "GetAccount": _user_reads("user_id"),
        _W + "GetBalance": _user_reads("user_id"),
        _W + "ListCoinPackages": _user_reads("user_id"),
        _W + "PurchaseCoins": _user_writes("user_id"),
        _W + "ListLedgerEntries": _user_reads("user_id"),
        _W + "GetCoinStatement": _user_reads("user_id"),
        _W + "DebitCoins": _only("gifting", "promotion", owner_field="user_id"),
        _W + "PlaceHold": _only("promotion", owner_field="user_id"),
        _W + "CaptureHold": _only("promotion"),
        _W + "ReleaseHold": _only("promotion"),
        _W + "GetHold": _only("promotion"),
        _W + "RecordPaymentEvent": _only("payment-webhooks"),
        _W + "ResolveDebit": _only("gifting", "promotion"),
        _W + "ResolveHold": _only("promotion"),
        _W + "SetCoinPackage": _ADMIN,
        _W + "SetAccountClassification": _ADMIN,
        _AUDIT: _AUDIT_TRAIL,
        _LEDGER: _ADMIN,
    },
    "gifting": {
        _G + "ListGifts": _PUBLIC,
        _G + "SendGift": _user_writes("sender_id"),
        _G + "GetGift": _RECORD,
        _G + "ListTopGifters": _PUBLIC,
        _G + "SetGift": _ADMIN,
        _G + "StartLive": _user_writes("creator_id"),
        _G + "EndLive": _RECORD,
        _G + "SetLiveGifts": _RECORD,
        _G + "GetLive": _PUBLIC,
        _G + "ListGiftVersions": _PUBLIC,
        _G + "WatchLive": _PUBLIC,
        _G + "ListCreatorRankings": _PUBLIC,
        _G + "ListCreatorTopGifters": _PUBLIC,
        _G + "ListParkedCredits": _ADMIN,
        _G + "RedeliverParkedCredits": _ADMIN,
        _AUDIT: _AUDIT_TRAIL,
    },
    "payout": {
        _P + "GetDiamondBalance": _user_reads("creator_id"),
        _P + "RequestWithdrawal": _user_writes("creator_id"),
        _P + "GetWithdrawal": _RECORD,
        _P + "CancelWithdrawal": _RECORD,
        _P + "ReviewWithdrawal": _ADMIN,
        _P + "ListWithdrawalQueue": _ADMIN,
        _P + "RetryWithdrawal": _ADMIN,
        _P + "ReconcileWithdrawals": _ADMIN,
        _P + "GetRevenueReport": _ADMIN,
        _P + "HandleProcessorEvent": _only("payout-webhooks"),
        _P + "ListWithdrawals": _user_reads("creator_id"),
        _P + "ListDiamondEntries": _user_reads("creator_id"),
        _P + "QuoteWithdrawal": _user_reads("creator_id"),
        _P + "ReverseGiftCredits": _ADMIN,
        _P + "SetCreatorVerification": _ADMIN,
        _P + "AddPayoutMethod": _user_writes("creator_id"),
        _P + "ListPayoutMethods": _user_reads("creator_id"),
        _P + "SetDefaultPayoutMethod": _user_writes("creator_id"),
        _P + "RemovePayoutMethod": _user_writes("creator_id"),
        _P + "GetDiamondStatement": _user_reads("creator_id"),
        _P + "CreditDiamonds": _only("gifting"),
        _P + "BatchCreditDiamonds": _only("gifting"),
        _P + "ListReversedCredits": _only("gifting"),
        _AUDIT: _AUDIT_TRAIL,
        _LEDGER: _ADMIN,
    },
    "promotion": {
        _PR + "CreatePromotion": _user_writes("user_id"),
        _PR + "GetPromotion": _RECORD,
        _PR + "ListPromotions": _user_reads("user_id"),
        _PR + "EndPromotion": _RECORD,
        _PR + "ReportDelivery": _only("ad-delivery"),
        _AUDIT: _AUDIT_TRAIL,
    },
}
"""Per service, per method path: who may call it and for whom, as the README documents."""
