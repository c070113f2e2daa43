"""Typed connections to the four services, addressed by flags or COINS_<SERVICE>_ADDRESS."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import grpc

from coins.gifting.v1 import gifting_pb2_grpc
from coins.payout.v1 import payout_pb2_grpc
from coins.promotion.v1 import promotion_pb2_grpc
from coins.wallet.v1 import wallet_pb2_grpc

DEFAULTS = {
    "wallet": "127.0.0.1:50051",
    "gifting": "127.0.0.1:50052",
    "payout": "127.0.0.1:50053",
    "promotion": "127.0.0.1:50054",
}


def default_address(service: str) -> str:
    return os.environ.get(f"COINS_{service.upper()}_ADDRESS", DEFAULTS[service])


@dataclass
class Clients:
    addresses: dict[str, str]
    timeout: float = 10.0

    def _channel(self, service: str) -> grpc.Channel:
        return grpc.insecure_channel(self.addresses[service])

    @cached_property
    def wallet(self) -> wallet_pb2_grpc.WalletServiceStub:
        return wallet_pb2_grpc.WalletServiceStub(self._channel("wallet"))

    @cached_property
    def gifting(self) -> gifting_pb2_grpc.GiftingServiceStub:
        return gifting_pb2_grpc.GiftingServiceStub(self._channel("gifting"))

    @cached_property
    def payout(self) -> payout_pb2_grpc.PayoutServiceStub:
        return payout_pb2_grpc.PayoutServiceStub(self._channel("payout"))

    @cached_property
    def promotion(self) -> promotion_pb2_grpc.PromotionServiceStub:
        return promotion_pb2_grpc.PromotionServiceStub(self._channel("promotion"))
