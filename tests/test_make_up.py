"""`make up`'s launcher: four processes, healthy, each with its own SQLite file, stopped gracefully."""

from __future__ import annotations

import os
import re
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
    env["PAYOUT_MATURATION_DAYS"] = "0"  # the demo withdraws what its gifts just earned
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
        # `make demo`, as the README runs it against the suite: the whole money flow, no error.
        demo_env = {**env, "COINS_CERTS_DIR": str(tmp_path / "certs")}
        demo_env.update({f"COINS_{n.upper()}_ADDRESS": f"127.0.0.1:{p}" for n, p in ports.items()})
        demo = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo"],
            cwd=Path(__file__).resolve().parents[1],
            env=demo_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        settled = demo.stdout.split("after the payment processor answered", 1)[-1]
        assert re.search(r"status\s+│\s+paid", settled), demo.stdout[-3000:]

        def coinsctl(*arguments: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "cli.main", *arguments],
                cwd=Path(__file__).resolve().parents[1],
                env=demo_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            return done.stdout

        # A LIVE through coinsctl: start, show, end, and its feed (streamed) to the end.
        live = f"live-make-up-{tmp_path.name}"
        assert "live now" in coinsctl("live", "start", "zoe", "--title", "make up", "--id", live)
        assert "zoe" in coinsctl("live", "show", live)
        coinsctl("live", "end", live)
        assert "leo-" in coinsctl("rankings", "--period", "all")  # the demo's creator, credited
        assert "#1" in coinsctl("live", "watch", live) and "the LIVE ended" in coinsctl(
            "live", "watch", live
        )
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "coins suite stopped" in output
    for name in ports:
        assert f"{name} stopped" in output
