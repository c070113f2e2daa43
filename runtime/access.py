"""Who may call which RPC: one rule per method, declared beside each service's gRPC layer.

Every method a service serves must have a rule (the server refuses to start otherwise), and a call
to a method without one is denied: access is fail-closed. The rule says which platform services may
call (by client certificate), whether a user token is needed, which request field names the account
acted on (it must be the token's user), whether the admin role is needed, and whether the method
moves money (and so is rate limited).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runtime.auth import ADMIN_CALLERS, USER_CALLERS, Principal
from runtime.errors import FieldViolation, InvalidArgument, PermissionDenied


@dataclass(frozen=True)
class Access:
    callers: frozenset[str] | None = None
    """Services allowed to call (certificate common names); None: any platform caller."""
    needs_user: bool = True
    owner_field: str | None = None
    """The request field naming the account acted on; it must equal the token's user."""
    admin: bool = False
    """The admin role is required."""
    audited: bool = False
    """Every call is written to the admin audit trail (admin actions)."""
    admin_may_read: bool = False
    """An admin may name any account in `owner_field` (support reads); such reads are audited."""
    owner_in_record: bool = False
    """A read by id: the handler checks the record's owner (`require_owner`); admins may read any
    record, and every admin call is audited."""
    moves_money: bool = False
    writes: bool = False
    """A user's write that moves no money (opening an account, a LIVE, a payout method): rate
    limited as money is, so no one can flood a service with records."""

    @property
    def rate_limited(self) -> bool:
        return self.moves_money or self.writes

    @property
    def service_to_service(self) -> bool:
        """Only named services call it (`internal`): a user's own rate limit applies where the
        user's request came in (SendGift, EndPromotion), not again to the service's calls it
        makes on the user's behalf, which its caller's limit bounds (a promotion's end re-capturing
        its pending reports must not be refused as the user's)."""
        return self.callers is not None and self.callers.isdisjoint(USER_CALLERS)

    @staticmethod
    def user(
        owner_field: str | None = None,
        *,
        moves_money: bool = False,
        writes: bool = False,
        admin_may_read: bool = False,
    ) -> Access:
        """A user-facing RPC: the callers that carry users' requests (USER_CALLERS), acting for
        the user in the token."""
        return Access(
            callers=USER_CALLERS,
            owner_field=owner_field,
            moves_money=moves_money,
            writes=writes,
            admin_may_read=admin_may_read,
        )

    @staticmethod
    def record_owner(*, writes: bool = False) -> Access:
        """A user-facing call on one record by id: its owner, or an admin (audited)."""
        return Access(callers=USER_CALLERS, owner_in_record=True, writes=writes)

    @staticmethod
    def internal(
        callers: Iterable[str], *, owner_field: str | None = None, moves_money: bool = True
    ) -> Access:
        """A service-to-service RPC: only the listed services; with `owner_field`, it also acts for
        the user whose token the calling service passes on."""
        return Access(
            callers=frozenset(callers),
            needs_user=owner_field is not None,
            owner_field=owner_field,
            moves_money=moves_money,
        )

    @staticmethod
    def admin_only(*, audited: bool = True) -> Access:
        """An admin RPC (catalog, pricing, review, adjustments): admin role, audited, and only through
        the platform's user-facing callers, so a service holding a user's token it was passed on
        cannot use an admin's."""
        return Access(callers=ADMIN_CALLERS, admin=True, audited=audited)

    def check_caller(self, principal: Principal) -> None:
        if self.callers is not None and principal.service not in self.callers:
            raise PermissionDenied(
                "CALLER_NOT_ALLOWED",
                f"service {principal.service!r} may not call this RPC",
                caller=principal.service,
                allowed=",".join(sorted(self.callers)),
            )

    def check_owner(self, principal: Principal, request: Any) -> bool:
        """Refuse a request naming someone else's account; True if the call is an admin's support
        read (to be audited)."""
        if self.owner_in_record:
            return principal.is_admin
        if self.owner_field is None:
            return False
        user = principal.require_user()
        named = getattr(request, self.owner_field)
        if named == user:
            return False
        if self.admin_may_read and principal.is_admin:
            return True
        raise PermissionDenied(
            "NOT_ACCOUNT_OWNER",
            f"the token acts for {user!r}, not for {named!r}",
            field=self.owner_field,
            account=named,
        )


def method_rules(service_full_name: str, rules: Mapping[str, Access]) -> dict[str, Access]:
    """Rules keyed by the gRPC method path (`/coins.wallet.v1.WalletService/GetBalance`)."""
    return {f"/{service_full_name}/{method}": rule for method, rule in rules.items()}


def require_owner(*owners: str, record: str = "") -> None:
    """For calls on a record by id (a withdrawal, a promotion, a LIVE): the token's user must be one
    of the record's owners, or an admin. `record` names it ("LIVE live-1") in the refusal."""
    from runtime.auth import current_principal

    principal = current_principal()
    user = principal.require_user()
    if user not in owners and not principal.is_admin:
        refusal = PermissionDenied(
            "NOT_ACCOUNT_OWNER",
            f"the token acts for {user!r}, who does not own {record or 'this record'}",
        )
        if record:
            refusal.metadata["record"] = record
        raise refusal


def require_reason(owner: str, reason: str, *, record: str) -> None:
    """Someone other than the record's owner (an admin) acting on it says why: for the audit
    trail, and for the owner who finds it changed. INVALID_ARGUMENT REASON_REQUIRED otherwise."""
    from runtime.auth import current_principal

    if current_principal().require_user() != owner and len(reason.strip()) < 3:
        raise InvalidArgument(
            "REASON_REQUIRED",
            f"{record} belongs to {owner!r}: acting on another user's record needs a reason "
            "(3 characters or more) for the audit trail",
            violations=(FieldViolation("reason", "required when acting on another user's record"),),
        )


def require_another_admin(subject: str, action: str) -> None:
    """Separation of duties: an admin never decides on their own money (verifying themself,
    approving their own withdrawal): PERMISSION_DENIED OWN_DECISION, another admin must."""
    from runtime.auth import current_principal

    if current_principal().user_id == subject:
        raise PermissionDenied(
            "OWN_DECISION",
            f"an admin may not {action} for themself ({subject!r}): another admin must",
            subject=subject,
        )
