"""coinsctl: a small command-line client for the coins suite."""
