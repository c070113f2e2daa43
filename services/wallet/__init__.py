"""Wallet: viewers' coins, coin packages, purchases and the coin ledger."""
