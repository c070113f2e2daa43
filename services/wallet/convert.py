"""Protobuf <-> wallet domain conversions, shared by the wallet's RPC modules."""

from __future__ import annotations

import datetime as dt

from google.type import date_pb2

from coins.wallet.v1 import wallet_pb2
from ledger import Hold
from runtime.errors import FieldViolation, InvalidArgument
from runtime.protos import money, timestamp
from services.wallet import storage
from services.wallet.domain import Coins, user_of

CHANNELS = {wallet_pb2.CHANNEL_IN_APP: "in_app", wallet_pb2.CHANNEL_WEB: "web"}
CHANNEL_ENUM = {name: value for value, name in CHANNELS.items()}
DEBIT_REASONS = {
    wallet_pb2.DEBIT_REASON_GIFT: "gift",
    wallet_pb2.DEBIT_REASON_PROMOTION: "promotion",
}
ENTRY_KINDS = {
    "purchase": wallet_pb2.ENTRY_KIND_PURCHASE,
    "gift": wallet_pb2.ENTRY_KIND_GIFT,
    "promotion": wallet_pb2.ENTRY_KIND_PROMOTION,
    "refund": wallet_pb2.ENTRY_KIND_REFUND,
    "chargeback": wallet_pb2.ENTRY_KIND_CHARGEBACK,
    "debt_settlement": wallet_pb2.ENTRY_KIND_DEBT_SETTLEMENT,
}
KIND_NAMES = {value: name for name, value in ENTRY_KINDS.items()}
PURCHASE_STATUS = {
    "pending": wallet_pb2.PURCHASE_STATUS_PENDING,
    "completed": wallet_pb2.PURCHASE_STATUS_COMPLETED,
    "failed": wallet_pb2.PURCHASE_STATUS_FAILED,
    "refunded": wallet_pb2.PURCHASE_STATUS_REFUNDED,
    "charged_back": wallet_pb2.PURCHASE_STATUS_CHARGED_BACK,
}


def to_date(value: date_pb2.Date) -> dt.date:
    try:
        return dt.date(value.year, value.month, value.day)
    except ValueError:
        raise InvalidArgument(
            "INVALID_REQUEST",
            "birth_date is not a calendar date",
            violations=(FieldViolation("birth_date", "not a valid calendar date"),),
        ) from None


CLASSIFICATIONS = {
    "personal": wallet_pb2.ACCOUNT_CLASSIFICATION_PERSONAL,
    "government": wallet_pb2.ACCOUNT_CLASSIFICATION_GOVERNMENT,
    "political": wallet_pb2.ACCOUNT_CLASSIFICATION_POLITICAL,
}
CLASSIFICATION_NAMES = {value: name for name, value in CLASSIFICATIONS.items()}


def account_pb(account: storage.AccountRecord, balance: Coins) -> wallet_pb2.Account:
    return wallet_pb2.Account(
        user_id=account.user_id,
        country_code=account.country_code,
        currency_code=account.currency_code,
        birth_date=date_pb2.Date(
            year=account.birth_date.year,
            month=account.birth_date.month,
            day=account.birth_date.day,
        ),
        balance=balance_pb(balance),
        create_time=timestamp(account.created_at),
        classification=CLASSIFICATIONS[account.classification],
    )


def package_pb(package: storage.PackageRecord) -> wallet_pb2.CoinPackage:
    return wallet_pb2.CoinPackage(
        package_id=package.package_id,
        coins=package.coins,
        price=money(package.currency_code, package.price_minor),
        channel=CHANNEL_ENUM[package.channel],
        region=package.region,
    )


def purchase_pb(purchase: storage.PurchaseRecord) -> wallet_pb2.Purchase:
    return wallet_pb2.Purchase(
        purchase_id=purchase.purchase_id,
        user_id=purchase.user_id,
        package=wallet_pb2.CoinPackage(
            package_id=purchase.package_id,
            coins=purchase.coins,
            price=money(purchase.currency_code, purchase.price_minor),
            channel=CHANNEL_ENUM[purchase.channel],
            region=purchase.region,
        ),
        status=PURCHASE_STATUS[purchase.status],
        provider_transaction_id=purchase.provider_transaction_id or "",
        create_time=timestamp(purchase.created_at),
    )


HOLD_STATUS = {
    "active": wallet_pb2.HOLD_STATUS_ACTIVE,
    "captured": wallet_pb2.HOLD_STATUS_CAPTURED,
    "released": wallet_pb2.HOLD_STATUS_RELEASED,
    "expired": wallet_pb2.HOLD_STATUS_EXPIRED,
}


def balance_pb(coins: Coins) -> wallet_pb2.Balance:
    return wallet_pb2.Balance(
        coins=coins.balance,
        available_coins=coins.available,
        debt_coins=coins.debt,
        frozen=coins.frozen,
    )


def hold_pb(hold: Hold) -> wallet_pb2.Hold:
    message = wallet_pb2.Hold(
        hold_id=hold.hold_id,
        user_id=user_of(hold.account_id),
        amount_coins=hold.amount,
        captured_coins=hold.captured,
        status=HOLD_STATUS[hold.status],
        owner_service=hold.owner,
        reference=hold.reference,
        create_time=timestamp(hold.created_at),
        update_time=timestamp(hold.updated_at),
    )
    if hold.expires_at is not None:
        message.expire_time.CopyFrom(timestamp(hold.expires_at))
    return message
