"""`make up`'s launcher: four processes, healthy, each with its own SQLite file, stopped gracefully."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_suite_starts_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("wallet", "gifting", "payout", "promotion")}
    health_ports = {name: free_port() for name in ports}
    env = {**os.environ, **{f"{n.upper()}_PORT": str(p) for n, p in ports.items()}}
    env.update({f"{n.upper()}_HEALTH_PORT": str(p) for n, p in health_ports.items()})
    env["GIFTING_WALLET_ADDRESS"] = env["PROMOTION_WALLET_ADDRESS"] = f"127.0.0.1:{ports['wallet']}"
    env["GIFTING_PAYOUT_ADDRESS"] = f"127.0.0.1:{ports['payout']}"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tools.suite"],
        cwd=tmp_path,  # the default data/ folder lands here
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            lines.append(line)
            if "coins suite is up" in line or not line:
                break
        assert any("coins suite is up" in line for line in lines), "".join(lines)
        for port in health_ports.values():  # plaintext, as Kubernetes' gRPC probes connect
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert sorted(p.name for p in (tmp_path / "data").glob("*.db")) == [
            "gifting.db",
            "payout.db",
            "promotion.db",
            "wallet.db",
        ]
        assert (tmp_path / "certs" / "ca.pem").exists(), "no dev CA was generated on first start"
        assert not (tmp_path / "certs" / "ca-key.pem").stat().st_mode & 0o077, "keys are private"
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "coins suite stopped" in output
    for name in ports:
        assert f"{name} stopped" in output
