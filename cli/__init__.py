"""coinsctl: a small command-line client for the coins suite."""

import os

# gRPC core's own log lines (a failed TLS handshake, three per attempt) are not for a person at a
# terminal: coinsctl says what failed and what to check itself. Read when gRPC starts.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
