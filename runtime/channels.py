"""What every gRPC channel of the suite asks of gRPC itself (the services' own and the Python
clients'), in a module light enough for coinsctl to import."""

from __future__ import annotations

import json

STREAMS = (("coins.gifting.v1.GiftingService", "WatchLive"),)
"""Every server-streaming RPC of the contracts (a test holds this to the protos)."""

SERVICE_CONFIG = json.dumps(
    # A call refused UNAVAILABLE did nothing (or is idempotent by its request id): gRPC sends it
    # again, up to 4 times within its deadline. So is a call a stopping server CANCELLED (grpc
    # cancels what it had not started when its graceful stop ends, which callers that never pause
    # keep feeding: a review saw 7-12 per stop); a caller's own cancel is never retried. The
    # services' channels and the Python clients'.
    {
        # Every address the name resolves to (a headless Service's pods: dns:///wallet:50051)
        # takes a share of the calls; one address behaves as before.
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            },
            # Streams are never retried by gRPC: the caller resumes from its cursor. A WatchLive
            # retried by the policy as gifting stopped hung for good in grpcio, no event and no
            # status (a review: 2-7 of 6-10 watchers that re-sent at once). The more specific
            # name wins over the default above.
            {"name": [{"service": service, "method": method} for service, method in STREAMS]},
        ],
    }
)
