"""Promotion: campaigns that boost a video's reach, paid for in coins held in the wallet and consumed
as they are delivered."""
