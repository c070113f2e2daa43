"""A state in ErrorInfo metadata is named as the contract names it (`status:
WITHDRAWAL_STATUS_PAID`), so a client compares it with the enum value it reads from the Get calls:
every state a service stores and answers has that enum value."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import EnumDescriptor

from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.errors import enum_name
from services.payout import api as payout_api
from services.promotion import convert as promotion_convert
from services.wallet import convert as wallet_convert


@pytest.mark.parametrize(
    ("prefix", "enum", "answered"),
    [
        ("PURCHASE_STATUS", wallet_pb2.PurchaseStatus.DESCRIPTOR, wallet_convert.PURCHASE_STATUS),
        ("HOLD_STATUS", wallet_pb2.HoldStatus.DESCRIPTOR, wallet_convert.HOLD_STATUS),
        (
            "ACCOUNT_CLASSIFICATION",
            wallet_pb2.AccountClassification.DESCRIPTOR,
            wallet_convert.CLASSIFICATIONS,
        ),
        ("WITHDRAWAL_STATUS", payout_pb2.WithdrawalStatus.DESCRIPTOR, payout_api._STATUS),
        ("KYC_STATUS", payout_pb2.KycStatus.DESCRIPTOR, payout_api._KYC),
        ("PROMOTION_STATUS", promotion_pb2.PromotionStatus.DESCRIPTOR, promotion_convert._STATUS),
    ],
)
def test_every_stored_state_is_named_as_its_enum_value(
    prefix: str, enum: EnumDescriptor, answered: dict[str, int]
) -> None:
    for state, number in answered.items():
        assert enum_name(prefix, state) == enum.values_by_number[number].name
