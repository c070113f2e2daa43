"""Promotion: campaigns that boost a video's reach, paid for in coins through the wallet."""
