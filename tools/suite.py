"""`make up`: run the four services as separate processes, as they run in production, until Ctrl-C.

Each service is `python -m services.<name>` with its own SQLite file under data/ (or the database its
<SERVICE>_DATABASE_URL names). The launcher waits until every service reports SERVING on the standard
gRPC health service, prints where they are, and on Ctrl-C or SIGTERM stops them gracefully.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime import pki
from runtime.config import SecuritySettings, ServiceSettings
from services.gifting.settings import GiftingSettings
from services.payout.settings import PayoutSettings
from services.promotion.settings import PromotionSettings
from services.wallet.settings import WalletSettings

SETTINGS = {
    "wallet": WalletSettings,
    "payout": PayoutSettings,
    "gifting": GiftingSettings,
    "promotion": PromotionSettings,
}


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=0.5
            )
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _settings() -> dict[str, ServiceSettings]:
    return {name: settings() for name, settings in SETTINGS.items()}


def main() -> int:
    security = SecuritySettings()
    if security.dev_pki and pki.ensure_dev_pki(security.certs_dir):
        print(f"generated a development CA, certificates and a token key in {security.certs_dir}/")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Own sessions: a Ctrl-C reaches only the launcher, which then stops each service with SIGTERM.
    children = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], env=env, start_new_session=True
        )
        for name in SETTINGS
    }
    addresses = {name: f"{s.host}:{s.health_port}" for name, s in _settings().items()}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    deadline = time.monotonic() + 60
    pending = set(SETTINGS)
    while pending and not stopping and time.monotonic() < deadline:
        pending = {n for n in pending if not _serving(addresses[n])}
        if any(child.poll() is not None for child in children.values()):
            break
        time.sleep(0.2)
    if not pending:
        print("\ncoins suite is up (Ctrl-C stops it):", flush=True)
        for name, address in addresses.items():
            print(f"  {name:<10} {address}", flush=True)
        print("try: make demo   (or .venv/bin/coinsctl --help)\n", flush=True)
    else:
        print(f"services did not become healthy: {sorted(pending)}", file=sys.stderr)
        stopping = True

    while not stopping and all(child.poll() is None for child in children.values()):
        time.sleep(0.2)
    failed = [n for n, c in children.items() if c.poll() not in (None, 0)]
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for name, child in children.items():
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in time; killing it", file=sys.stderr)
            child.kill()
    if failed:
        print(f"stopped because {', '.join(failed)} exited", file=sys.stderr)
        return 1
    print("coins suite stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
