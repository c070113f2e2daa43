"""coinsctl: drive the coins suite from a terminal.

Every mutating command sends a fresh request id; pass --request-id to retry one safely.
"""

from __future__ import annotations

import re
import shlex
import sys

import grpc

from cli.client import Clients, Refusal
from cli.commands import without_option
from cli.parser import parser
from cli.render import console, errors
from runtime.config import SUITE_PLACES, suite_address
from runtime.status import error_info

_UNCERTAIN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL"}
"""Codes after which a mutating call may or may not have been applied."""
_TRY_LATER = {"OVERLOADED", "RATE_LIMITED"}
"""RESOURCE_EXHAUSTED reasons refused before any work (a definite limit, such as
PURCHASE_LIMIT_EXCEEDED, is an answer: retrying changes nothing)."""


def _worth_retrying(error: grpc.RpcError) -> bool:
    code = error.code().name if hasattr(error, "code") else ""
    if code == "RESOURCE_EXHAUSTED":
        info = error_info(error)
        return info is not None and info.reason in _TRY_LATER
    return code in _UNCERTAIN


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(arguments)
    clients = Clients(
        {service: getattr(args, service) for service in SUITE_PLACES},
        acting_user=args.acting_user,
        # A command whose request names no user (a gift's record, the catalog) acts for this
        # made-up viewer unless --as says whom; an owner's refusal then says to pass --as.
        default_user="coinsctl",
        admin=args.admin,
    )
    args.command_line = arguments  # (a watch that gives up says how to resume)
    try:
        args.run(clients, args)
    except grpc.RpcError as error:
        report_error(error, clients)
        if _worth_retrying(error) and args.request_id:
            again = [
                "coinsctl",
                *without_option(arguments, "--request-id"),
                "--request-id",
                args.request_id,
            ]
            console.print(
                f"It may or may not have been applied. Retry with the same request id (it is "
                f"applied at most once):\n  {shlex.join(again)}",
            )
        return 1
    return 0


_OUR_FLAGS = {
    "after_cursor": "--after",
    "custom_coins": "--coins",
    "AUDIT_MODE_FULL": "--mode full",
    "AUDIT_MODE_INCREMENTAL": "--mode incremental",
}
"""Request fields and values a service's message names, and the coinsctl flag that sets each: a
refusal is shown in coinsctl's terms ("reconnect with --after 41", not "after_cursor=41"; "ask for
--mode full", not AUDIT_MODE_FULL). The service's own message names its fields, for every client."""


def _in_our_terms(text: str) -> str:
    for field, flag in _OUR_FLAGS.items():
        text = re.sub(rf"\b{field}=(?=-?\d)", f"{flag} ", text)
        text = re.sub(rf"\b{field}\b", flag, text)
    return text


_HANDSHAKE_REFUSED = re.compile(r"handshake failed", re.IGNORECASE)
"""The server answered but TLS failed: another authority's certificates, or a plaintext port."""


def report_error(error: grpc.RpcError, clients: Clients | None = None) -> None:
    refusal = Refusal.of(error)
    code, details = refusal.code.name, refusal.message
    if code == "UNAVAILABLE" and not refusal.reason and clients is not None:
        service = clients.last_service
        if _HANDSHAKE_REFUSED.search(details) and service in clients.addresses:
            errors.print(
                f"{service} at {clients.addresses[service]} answers, but the TLS handshake failed: "
                "its certificate is not from the certificate authority in COINS_CERTS_DIR "
                f"({clients.security.certs_dir}/), or the address is not a coins API port (a "
                "health port is plaintext). Point COINS_CERTS_DIR at the certs/ of the checkout "
                f"whose suite runs there, or --{service} / COINS_{service.upper()}_ADDRESS at its "
                f"API port. gRPC said: {details}",
            )
            return
        where = (
            f"{service} at {clients.addresses[service]}: is the suite running (make up)? The "
            f"address comes from --{service} or COINS_{service.upper()}_ADDRESS"
            if service in clients.addresses
            else "the service: is the suite running (make up)? Addresses come from --SERVICE or "
            "COINS_<SERVICE>_ADDRESS"
        )
        errors.print(
            f"cannot reach {where} (default: the suite's, from COINS_PORT_BASE); certificates "
            f"from COINS_CERTS_DIR ({clients.security.certs_dir}/). gRPC said: {details}",
        )
        return
    if code == "UNIMPLEMENTED" and not refusal.reason and clients is not None:
        service = clients.last_service
        if service in clients.addresses:
            errors.print(
                f"the server at {clients.addresses[service]} does not serve {service}'s calls "
                f"(UNIMPLEMENTED: {details}): is --{service} / COINS_{service.upper()}_ADDRESS "
                f"pointing at another service? The suite's {service} is at "
                f"{suite_address(service)}",
            )
            return
    reason = f" [{refusal.reason}]" if refusal.reason else ""
    errors.print(f"{code}{reason} {_in_our_terms(details)}", style="bold red")
    for field_path, description in refusal.violations.items():
        errors.print(f"  {_in_our_terms(field_path)}: {_in_our_terms(description)}")
    # A record named by id (a promotion, a withdrawal): coinsctl cannot tell whose it is.
    if refusal.reason == "NOT_ACCOUNT_OWNER" and clients and not clients.acting_user:
        errors.print(
            "coinsctl acted as 'coinsctl' (no --as): pass --as OWNER, the user the record "
            "belongs to (or --admin --as SOMEONE for an admin)",
        )


if __name__ == "__main__":
    sys.exit(main())
