"""User tokens: signing keys rotate without a restart, and the claims a token must carry are enforced."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import jwt
import pytest

from coins.wallet.v1 import wallet_pb2
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from runtime.status import error_info
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


async def test_a_refused_token_says_what_is_wrong_with_it(suite: Suite, tmp_path: Path) -> None:
    """A client whose clock is off, or whose token lacks a claim, is told so: not the same words
    as a forged signature (all TOKEN_INVALID, `claim` naming the culprit)."""
    user, _ = await funded_user(suite)
    key_id = pki.DEV_KEY_ID
    key = (suite.security.certs_dir / "jwt" / f"{key_id}-key.pem").read_bytes()
    now = dt.datetime.now(dt.UTC)
    claims = {
        "sub": user,
        "iss": suite.security.jwt_issuer,
        "aud": suite.security.jwt_audience,
        "iat": now,
        "exp": now + dt.timedelta(minutes=5),
    }
    ahead = now + dt.timedelta(minutes=50)
    pki.make_signing_key(tmp_path, key_id=key_id)  # another key under the trusted key id
    rogue = TokenIssuer(
        (tmp_path / "jwt" / f"{key_id}-key.pem").read_bytes(),
        key_id=key_id,
        issuer=suite.security.jwt_issuer,
        audience=suite.security.jwt_audience,
    )
    cases = [
        ({**claims, "iat": ahead, "exp": ahead + dt.timedelta(minutes=5)}, "iat", "not valid yet"),
        ({**claims, "nbf": ahead}, "nbf", "not valid yet"),
        ({k: v for k, v in claims.items() if k != "iat"}, "iat", "has no 'iat' claim"),
    ]
    tokens = [
        (jwt.encode(c, key, algorithm="ES256", headers={"kid": key_id}), claim, says)
        for c, claim, says in cases
    ]
    tokens.append((rogue.mint(user), "signature", "does not verify"))
    for token, claim, says in tokens:
        error = await expect_error(
            suite.stub("wallet").GetBalance(
                wallet_pb2.GetBalanceRequest(user_id=user), metadata=tuple(token_metadata(token))
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        )
        assert says in (error.details() or ""), (claim, error.details())
        info = error_info(error)
        assert info is not None and info.metadata["claim"] == claim
