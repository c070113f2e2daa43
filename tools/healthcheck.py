"""`python -m tools.healthcheck [HOST:]PORT`: exit 0 if the gRPC health service there answers
SERVING (a container's health check: the image has no other gRPC client)."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.config import SUITE_PLACES, port_base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.healthcheck",
        description="Exit 0 if the gRPC health service at [HOST:]PORT answers SERVING.",
    )
    parser.add_argument(
        "target",
        nargs="?",
        default=str(port_base() + 10 + SUITE_PLACES["wallet"]),
        help="[HOST:]PORT of a health probe (default: the wallet's, COINS_PORT_BASE + 11)",
    )
    target = parser.parse_args(argv).target
    address = target if ":" in target else f"127.0.0.1:{target}"
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}", file=sys.stderr)
            return 1
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
