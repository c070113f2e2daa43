"""`make up`'s launcher: four processes, healthy, each with its own SQLite file, stopped gracefully."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.processes import LISTEN_PORTS

ROOT = Path(__file__).resolve().parents[1]
PLACES = {"wallet": 1, "gifting": 2, "payout": 3, "promotion": 4}


def free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_base() -> int:
    """A COINS_PORT_BASE whose eight ports (base+1..4, base+11..14) are all free, below the
    ephemeral range (32768-) that outgoing connections take ports from while the suite starts."""
    for base in random.sample(range(*LISTEN_PORTS, 100), 50):
        if all(free(base + place + extra) for place in PLACES.values() for extra in (0, 10)):
            return base
    raise AssertionError("no free port range found")


def readme_commands() -> list[tuple[str, str]]:
    """The walk-through's coinsctl lines (command, comment), in order, from the README's first
    shell block after "## Walk-through"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Walk-through", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    found = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        for part in command.split("&&"):
            if part.strip().startswith("coinsctl "):
                found.append((part.strip(), comment.strip()))
    return found


def walk_through(env: dict[str, str]) -> None:
    """Run every coinsctl line of the walk-through; a line whose comment says "refused" must be
    refused, every other must succeed. Ids the README writes as WITHDRAWAL_ID and PROMOTION_ID are
    taken from what the commands before printed, as a reader would."""
    ids: dict[str, str] = {}
    commands = readme_commands()
    assert len(commands) > 20, commands
    for command, comment in commands:
        if "live watch" in command:
            continue  # "in a third terminal": it streams until the LIVE ends (run below)
        for name, value in ids.items():
            command = command.replace(name, value)
        arguments = shlex.split(command)[1:]
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", *arguments],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        expected = 1 if "refused" in comment else 0
        assert done.returncode == expected, f"{command}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
        if arguments[0] == "withdrawals":
            ids["WITHDRAWAL_ID"] = re.findall(r"\b[0-9a-f]{32}\b", done.stdout)[0]
        if arguments[0] == "promote":
            ids["PROMOTION_ID"] = re.findall(r"Promotion (\S+)", done.stdout)[0]
    assert {"WITHDRAWAL_ID", "PROMOTION_ID"} <= set(ids)


def test_the_suite_starts_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    base = free_port_base()  # one setting moves the services, their downstreams and coinsctl
    ports = {name: base + place for name, place in PLACES.items()}
    health_ports = {name: base + 10 + place for name, place in PLACES.items()}
    env = {**os.environ, "COINS_PORT_BASE": str(base)}
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
        while "try: make demo" not in lines[-1] and time.monotonic() < deadline:
            lines.append(launcher.stdout.readline())
        started = "".join(lines)
        assert f"API 127.0.0.1:{ports['gifting']} (mutual TLS)" in started, started
        assert f"health 127.0.0.1:{health_ports['gifting']} (plaintext)" in started, started
        assert f"export COINS_PORT_BASE={base}" in started, started
        # A second suite on the same ports stops at once, saying which ports and what to do.
        (tmp_path / "second").mkdir()
        second = subprocess.run(
            [sys.executable, "-m", "tools.suite"],
            cwd=tmp_path / "second",
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"port {ports['wallet']} (wallet API, WALLET_PORT) is in use" in second.stderr
        assert "COINS_PORT_BASE" in second.stderr and "Traceback" not in second.stderr
        # One on other ports but in the same folder would share data/ (SQLite files, sandboxes):
        # it stops at once too, saying how to give it data of its own.
        elsewhere = subprocess.run(
            [sys.executable, "-m", "tools.suite"],
            cwd=tmp_path,
            env={**env, "COINS_PORT_BASE": str(free_port_base())},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr
        assert "another coins suite uses" in elsewhere.stderr, elsewhere.stderr
        assert "COINS_DATA_DIR=" in elsewhere.stderr and "Traceback" not in elsewhere.stderr
        # The same folder and the same ports: the one refusal names both ways out (it named the
        # ports alone, and a newcomer moving them hit the data's refusal next).
        same = subprocess.run(
            [sys.executable, "-m", "tools.suite"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert same.returncode == 1, same.stdout + same.stderr
        assert "COINS_DATA_DIR=data-2 COINS_PORT_BASE=" in same.stderr, same.stderr
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
        demo_env = {**env, "COINS_CERTS_DIR": str(tmp_path / "certs")}  # addresses: the base
        # The README's walk-through, command by command, as a newcomer types it.
        walk_through(demo_env)
        # `make demo`, as the README runs it against the suite: the whole money flow, no error.
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
        # A service killed outright is restarted by the launcher, and serves again.
        os.kill(_child_of(launcher.pid, "services.wallet"), signal.SIGKILL)
        serving_again = time.monotonic() + 60
        while time.monotonic() < serving_again:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{health_ports['wallet']}") as channel:
                    status = (
                        health_pb2_grpc.HealthStub(channel)
                        .Check(health_pb2.HealthCheckRequest(), timeout=1)
                        .status
                    )
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        assert "coins" in coinsctl("balance", "ava")  # the restarted wallet answers
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=30)
        assert "wallet exited with code -9; restarting it" in output, output
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "coins suite stopped" in output
    for name in ports:
        assert f"{name} stopped" in output


def test_a_port_left_in_time_wait_by_a_stopped_suite_is_not_in_use() -> None:
    """Restarting right after Ctrl-C: the old suite's connections linger in TIME_WAIT for a minute
    and hold nothing, so neither the launcher nor a service must call the port in use (a listener still is)."""
    from runtime.startup import port_held

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    assert port_held("127.0.0.1", port)  # listening: in use
    accepted.close()  # the server side closes first: its end of the connection is in TIME_WAIT
    client.close()
    listener.close()
    assert not port_held("127.0.0.1", port)


def test_a_service_dies_with_a_launcher_that_is_killed() -> None:
    """The services run in sessions of their own (a Ctrl-C reaches only the launcher, which stops
    them in order); a launcher killed outright must not leave them holding the ports."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; from tools.suite import _die_with_parent; "
            "child = subprocess.Popen(['sleep', '60'], start_new_session=True, "
            "preexec_fn=_die_with_parent); print(child.pid, flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as stat:  # reaped by init once it is a zombie
            if stat.read().split()[2] == "Z":
                return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its killed parent")


def _child_of(parent: int, module: str) -> int:
    """The pid of `parent`'s child process running `python -m <module>`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and module.encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} runs {module}")
