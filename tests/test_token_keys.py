"""User tokens: signing keys rotate without a restart, and the claims a token must carry are enforced."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from coins.wallet.v1 import wallet_pb2
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from tests.helpers import eventually, expect_error, funded_user
from tests.suite import Suite


async def test_a_new_signing_key_is_trusted_without_a_restart(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    kid = f"rotated-{suite.backend}"
    pki.make_signing_key(suite.security.certs_dir, key_id=kid)
    issuer = TokenIssuer(
        (suite.security.certs_dir / "jwt" / f"{kid}-key.pem").read_bytes(),
        key_id=kid,
        issuer=suite.security.jwt_issuer,
        audience=suite.security.jwt_audience,
    )
    request = wallet_pb2.GetBalanceRequest(user_id=user)
    stub = suite.stub("wallet")

    async def accepted() -> bool:  # the key folder is re-read at most once a second
        try:
            response = await stub.GetBalance(
                request, metadata=tuple(token_metadata(issuer.mint(user)))
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False
        assert response.balance.coins == coins
        return True

    await eventually(accepted, "a token signed with the new key accepted")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": None}, "TOKEN_INVALID"),
        ({"sub": ""}, "TOKEN_INVALID"),
        ({"iss": "someone-else"}, "TOKEN_INVALID"),
        ({"roles": "admin"}, "TOKEN_INVALID"),
    ],
    ids=["no-expiry", "no-subject", "other-issuer", "roles-not-a-list"],
)
async def test_tokens_missing_required_claims_are_refused(
    suite: Suite, claims: dict[str, object], reason: str
) -> None:
    user, _ = await funded_user(suite)
    token = suite.issuer.mint(user, claims=claims)
    await expect_error(
        suite.stub("wallet").GetBalance(
            wallet_pb2.GetBalanceRequest(user_id=user), metadata=tuple(token_metadata(token))
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        reason,
    )


async def test_long_lived_tokens_are_refused(suite: Suite) -> None:
    user, _ = await funded_user(suite)
    token = suite.issuer.mint(user, ttl=dt.timedelta(days=30))
    await expect_error(
        suite.stub("wallet").GetBalance(
            wallet_pb2.GetBalanceRequest(user_id=user), metadata=tuple(token_metadata(token))
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_INVALID",
    )
