"""Consumer contracts: what each service expects of the services it calls, checked against the real ones.

Each consumer keeps its expectations as data in `services/<consumer>/contracts/<provider>.json`: the
requests it sends (built by the consumer's own code, so the file cannot drift from it), the response fields
it reads and the error reasons it relies on. Each interaction runs, in order, against the real provider, so
a change that breaks a consumer's meaning fails here even when `buf breaking` passes.

An interaction may first put the provider in a state ("given", see `_STATES`), through its public API; a
state may define values the provider chose (a hold's id), which the interaction names as {name}.
"""

from __future__ import annotations

import importlib
import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, symbol_database
from google.type import date_pb2

from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info
from tests.suite import Suite

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = sorted(ROOT.glob("services/*/contracts/*.json"))


def _load(path: Path) -> dict[str, Any]:
    run = uuid.uuid4().hex[:10]
    data: dict[str, Any] = json.loads(path.read_text().replace("{run}", run))
    return data


def _matches(expected: Any, actual: Any, where: str = "response") -> None:
    """Every expected field is present with that value ("*" = any non-empty value), in lists item by
    item; fields the consumer does not name may be added by the provider."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} is missing (got {sorted(actual)})"
            _matches(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (
            f"{where}: expected {len(expected)} items, got {actual!r}"
        )
        for i, (item, got) in enumerate(zip(expected, actual, strict=True)):
            _matches(item, got, f"{where}[{i}]")
    elif expected == "*":
        assert actual not in (None, "", 0), f"{where} is empty"
    else:
        assert actual == expected, f"{where}: expected {expected!r}, got {actual!r}"


async def _user_with_coins(suite: Suite, params: dict[str, Any]) -> dict[str, str]:
    """A wallet account that bought `package_id`."""
    await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=uuid.uuid4().hex,
            user_id=params["user_id"],
            country_code="US",
            birth_date=date_pb2.Date(year=1990, month=1, day=1),
        )
    )
    await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=uuid.uuid4().hex,
            user_id=params["user_id"],
            package_id=params["package_id"],
            payment_token="tok_visa",
        )
    )
    return {}


async def _account(suite: Suite, params: dict[str, Any]) -> dict[str, str]:
    """A wallet account of an adult (`user_id`), without coins: a creator, say."""
    await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=uuid.uuid4().hex,
            user_id=params["user_id"],
            country_code="US",
            birth_date=date_pb2.Date(year=1990, month=1, day=1),
        )
    )
    return {}


async def _promotion_hold(suite: Suite, params: dict[str, Any]) -> dict[str, str]:
    """A user with coins (`user_id`, `package_id`) and a hold of `coins` that the promotion service
    placed on them (`reference`), of which `captured` coins were captured, and then `released` if
    set. Defines {hold_id}."""
    await _user_with_coins(suite, params)
    promotion = suite.as_caller("promotion").wallet
    placed = await promotion.PlaceHold(
        wallet_pb2.PlaceHoldRequest(
            request_id=uuid.uuid4().hex,
            user_id=params["user_id"],
            coins=params["coins"],
            reason=wallet_pb2.DEBIT_REASON_PROMOTION,
            reference=params["reference"],
        )
    )
    hold_id = placed.hold.hold_id
    if params.get("captured"):
        await promotion.CaptureHold(
            wallet_pb2.CaptureHoldRequest(
                request_id=uuid.uuid4().hex, hold_id=hold_id, coins=params["captured"]
            )
        )
    if params.get("released"):
        await promotion.ReleaseHold(
            wallet_pb2.ReleaseHoldRequest(request_id=uuid.uuid4().hex, hold_id=hold_id)
        )
    return {"hold_id": hold_id}


async def _reversed_credit(suite: Suite, params: dict[str, Any]) -> dict[str, str]:
    """A gift credited by payout (`gift_id`, `creator_id`, `coins`) and then reversed by an admin.
    Defines {after}: the last reversal number before it, and {sequence}: its own."""
    payout = suite.as_caller("gifting").payout

    async def credited_and_reversed(gift_id: str) -> None:
        await payout.CreditDiamonds(
            payout_pb2.CreditDiamondsRequest(
                request_id=f"gift:{gift_id}",
                creator_id=params["creator_id"],
                coins=params["coins"],
                reference=gift_id,
            )
        )
        await suite.payout.ReverseGiftCredits(
            payout_pb2.ReverseGiftCreditsRequest(
                request_id=uuid.uuid4().hex, gift_ids=[gift_id], reason="contract state"
            ),
            metadata=suite.token("contract-admin", admin=True),
        )

    await credited_and_reversed(f"{params['gift_id']}-before")  # so {after} is never 0 (unset)
    after = 0
    while page := (
        await payout.ListReversedCredits(
            payout_pb2.ListReversedCreditsRequest(after_sequence=after, page_size=1000)
        )
    ).credits:
        after = page[-1].sequence
    await credited_and_reversed(params["gift_id"])
    return {"after": str(after), "sequence": str(after + 1)}


_STATES = {
    "user_with_coins": _user_with_coins,
    "account": _account,
    "promotion_hold": _promotion_hold,
    "reversed_credit": _reversed_credit,
}


async def _given(suite: Suite, state: dict[str, Any]) -> dict[str, str]:
    """Provider states, set up through the provider's public API. Returns the values they define,
    which the interaction names as {name} (a hold's id, say)."""
    defined: dict[str, str] = {}
    for name, params in state.items():
        if name not in _STATES:
            raise AssertionError(f"unknown provider state {name!r}")
        defined |= await _STATES[name](suite, params)
    return defined


def _define(interaction: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The interaction with every {name} the provider states defined replaced by its value."""
    text = json.dumps(interaction)
    for name, value in values.items():
        text = text.replace(f"{{{name}}}", value)
    defined: dict[str, Any] = json.loads(text)
    return defined


def test_every_cross_service_call_has_a_contract() -> None:
    pairs = {(p.parent.parent.name, p.stem) for p in CONTRACTS}
    assert pairs == {("gifting", "wallet"), ("gifting", "payout"), ("promotion", "wallet")}


def _acting_user(suite: Suite, request: Any) -> tuple[tuple[str, str], ...]:
    """The token the consumer passes on: the user the request acts for, when it names one."""
    user = getattr(request, "user_id", "") or getattr(request, "sender_id", "")
    return suite.token(user) if user else ()


@pytest.mark.parametrize(
    "path", CONTRACTS, ids=[f"{p.parent.parent.name}->{p.stem}" for p in CONTRACTS]
)
async def test_provider_honours_consumer_contract(suite: Suite, path: Path) -> None:
    contract = _load(path)
    builders = importlib.import_module(f"services.{contract['consumer']}.clients")
    service = descriptor_pool.Default().FindServiceByName(contract["service"])
    for recorded in contract["interactions"]:
        interaction = _define(recorded, await _given(suite, recorded.get("given", {})))
        what = interaction["description"]
        method = service.methods_by_name[interaction["method"]]
        request_type = symbol_database.Default().GetSymbol(method.input_type.full_name)
        response_type = symbol_database.Default().GetSymbol(method.output_type.full_name)

        build = interaction["consumer_builds"]
        built = getattr(builders, build["function"])(**build["args"])
        assert json_format.MessageToDict(built) == interaction["request"], (
            f"{what}: the consumer no longer sends the request its contract records"
        )
        call = suite.channel(contract["provider"], identity=contract["consumer"]).unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        request = json_format.ParseDict(interaction["request"], request_type())
        if "error" in interaction:
            expected = interaction["error"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request, metadata=_acting_user(suite, request))
            assert caught.value.code().name == expected["code"], what
            info = error_info(caught.value)
            assert info is not None and info.reason == expected["reason"], what
            assert set(expected.get("metadata", [])) <= set(info.metadata), what
        else:
            response = await call(request, metadata=_acting_user(suite, request))
            _matches(interaction["response"], json_format.MessageToDict(response), what)
