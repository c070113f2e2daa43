"""Gifting: the gift catalog, sending gifts (coins out of the sender, diamonds to the creator) and LIVE
leaderboards."""
