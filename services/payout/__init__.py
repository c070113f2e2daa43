"""Payout: creators' diamonds, their conversion from gift coins, and withdrawals as cash."""
