"""`make up`: run the four services as separate processes, as they run in production, until Ctrl-C.

Each service is `python -m services.<name>` with its own SQLite file under data/ (or the database its
<SERVICE>_DATABASE_URL names). The launcher waits until every service reports SERVING on the standard
gRPC health service, prints where they are, and on Ctrl-C or SIGTERM stops them gracefully. A service
that dies meanwhile (a crash, kill -9) is restarted, with a growing pause; one that keeps dying
(`CRASH_LOOP_RESTARTS` in `CRASH_LOOP_SECONDS`) stops the suite.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime import pki, startup
from runtime.config import SecuritySettings, ServiceSettings, suite_address
from services.gifting.settings import GiftingSettings
from services.payout.settings import PayoutSettings
from services.promotion.settings import PromotionSettings
from services.wallet.settings import WalletSettings

SETTINGS: dict[str, type[ServiceSettings]] = {
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


def _refused_settings() -> str:
    """What each service would refuse in its configuration (the environment), one line per bad
    variable, as the service itself says it; a shared COINS_* variable once, not once per
    service; "" when all is well."""
    lines: list[str] = []
    for name, settings_type in SETTINGS.items():
        for line in startup.refused_settings(settings_type, name):
            shared = line.removeprefix(f"{name}: ")
            if shared.startswith("COINS_"):
                line = f"all services: {shared}"
            if line not in lines:
                lines.append(line)
    return "\n".join(lines)


def _busy_ports(settings: dict[str, ServiceSettings]) -> list[str]:
    """One line for each port the suite needs that another program holds."""
    lines = []
    for name, s in settings.items():
        for what, port, variable in (
            ("API", s.port, f"{s.env_prefix}PORT"),
            ("health", s.health_port, f"{s.env_prefix}HEALTH_PORT"),
            ("metrics", s.metrics_port, f"{s.env_prefix}METRICS_PORT"),
        ):
            if port and startup.port_held(s.host, port):
                lines.append(f"port {port} ({name} {what}, {variable}) is in use")
    return lines


def _second_terminal(settings: dict[str, ServiceSettings]) -> list[str]:
    """What a second terminal exports so coinsctl finds this suite."""
    if os.environ.get("COINS_PORT_BASE"):
        lines = [f"export COINS_PORT_BASE={os.environ['COINS_PORT_BASE']}"]
    else:
        lines = []
    for name, s in settings.items():
        if f"{s.host}:{s.port}" != suite_address(name):
            lines.append(f"export COINS_{name.upper()}_ADDRESS={s.host}:{s.port}")
    return lines


STOP_ORDER = (("gifting", "promotion"), ("wallet", "payout"))
"""gifting calls wallet and payout, promotion calls wallet."""


def _die_with_parent() -> None:
    """In the child before it runs (Linux): SIGTERM when the launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _hold_data_dirs(settings: dict[str, ServiceSettings]) -> list[Any] | str:
    """Lock each data directory for this suite's lifetime (the locks go with the process): a second
    suite started from the same checkout would share the SQLite files and the sandboxes', and run
    every background job on them twice. The open lock files, or why the suite cannot start."""
    held = []
    for directory in sorted({s.data_dir.resolve() for s in settings.values()}):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = open(directory / ".suite.lock", "w")  # noqa: SIM115 - held until the process ends
        except OSError as error:
            users = ", ".join(
                f"{s.env_prefix}DATA_DIR"
                for s in settings.values()
                if s.data_dir.resolve() == directory
            )
            return (
                f"the suite cannot start: cannot use the data folder {directory} "
                f"({error.strerror or error}): set {users} (or COINS_DATA_DIR for every service) "
                "to a folder it can create and write"
            )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return (
                f"the suite cannot start: another coins suite uses {directory} (its SQLite files "
                "and sandboxes); stop it, or give this one data of its own: "
                "COINS_DATA_DIR=data-2 COINS_PORT_BASE=60050 make up"
            )
        held.append(lock)
    return held


CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_SECONDS = 60.0
"""A service restarted more than this many times in this long is crash-looping: the suite stops."""


def main() -> int:
    refused = _refused_settings()
    if refused:
        print(refused, file=sys.stderr)
        print("the suite cannot start: fix the variables above", file=sys.stderr)
        return 1
    settings = _settings()
    # The data first: a second suite from the same checkout needs data AND ports of its own, and
    # this refusal names both (the ports' alone would send it to the data's next).
    held = _hold_data_dirs(settings)
    if isinstance(held, str):
        print(held, file=sys.stderr)
        return 1
    busy = _busy_ports(settings)
    if busy:
        for line in busy:
            print(line, file=sys.stderr)
        print(
            "the suite cannot start: is another coins suite running? Stop it, or move this one "
            "with COINS_PORT_BASE (e.g. COINS_PORT_BASE=60050 make up)",
            file=sys.stderr,
        )
        return 1
    security = SecuritySettings()
    if security.dev_pki and pki.ensure_dev_pki(security.certs_dir):
        print(f"generated a development CA, certificates and a token key in {security.certs_dir}/")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Own sessions: a Ctrl-C reaches only the launcher, which then stops each service with SIGTERM.
    # ... and each dies with the launcher, should it be killed before it can stop them.

    def spawn(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    children = {name: spawn(name) for name in SETTINGS}
    addresses = {name: f"{s.host}:{s.health_port}" for name, s in settings.items()}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    deadline = time.monotonic() + 60
    pending = set(SETTINGS)
    exited: dict[str, int] = {}
    unhealthy: list[str] = []
    while pending and not stopping and time.monotonic() < deadline:
        pending = {n for n in pending if not _serving(addresses[n])}
        exited = {n: code for n, c in children.items() if (code := c.poll()) is not None}
        if exited:
            break
        time.sleep(0.2)
    if exited:
        for name, code in exited.items():
            print(
                f"{name} exited with code {code} while starting (its reason is above)",
                file=sys.stderr,
            )
        stopping = True
    elif not pending:
        print("\ncoins suite is up (Ctrl-C stops it):", flush=True)
        for name, s in settings.items():
            print(
                f"  {name:<10} API {s.host}:{s.port} (mutual TLS)   "
                f"health {s.host}:{s.health_port} (plaintext)",
                flush=True,
            )
        exports = _second_terminal(settings)
        if exports:
            print("in a second terminal, first:", flush=True)
            for line in exports:
                print(f"  {line}", flush=True)
        print("try: make demo   (or .venv/bin/coinsctl --help)\n", flush=True)
    elif not stopping:  # not Ctrl-C while starting: the minute ran out
        print(f"services did not become healthy within 60 s: {sorted(pending)}", file=sys.stderr)
        unhealthy = sorted(pending)
        stopping = True

    failed: list[str] = [*exited, *unhealthy]
    """Services that stopped the suite, or never started: a non-zero exit, so a script or CI that
    runs `make up` notices."""
    exits: dict[str, list[float]] = {name: [] for name in children}
    restart_at: dict[str, float] = {}
    """Services waiting out their pause, each on its own clock: one crash-looping service never
    delays another's restart."""
    while not stopping:
        # A service that dies (a crash, kill -9) is restarted, as a supervisor or Kubernetes would:
        # its callers retry meanwhile. One that keeps dying stops the suite.
        for name, due in list(restart_at.items()):
            if time.monotonic() >= due:
                del restart_at[name]
                children[name] = spawn(name)
        for name, child in children.items():
            code = child.poll()
            if code is None or stopping or name in restart_at:
                continue
            now = time.monotonic()
            exits[name] = [t for t in exits[name] if now - t < CRASH_LOOP_SECONDS] + [now]
            if len(exits[name]) > CRASH_LOOP_RESTARTS:
                print(
                    f"{name} exited with code {code} {len(exits[name])} times in "
                    f"{CRASH_LOOP_SECONDS:.0f} s; stopping the suite",
                    file=sys.stderr,
                    flush=True,
                )
                failed.append(name)
                stopping = True
                break
            pause = min(0.5 * 2 ** (len(exits[name]) - 1), 8.0)
            print(
                f"{name} exited with code {code}; restarting it in {pause:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            restart_at[name] = now + pause
        time.sleep(0.1)
    for group in STOP_ORDER:  # the callers first, so none is left calling a stopped service
        for name in group:
            if children[name].poll() is None:
                children[name].send_signal(signal.SIGTERM)
        for name in group:
            try:
                children[name].wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time; killing it", file=sys.stderr)
                children[name].kill()
    if failed:
        print(f"stopped because {', '.join(failed)} did not start or kept exiting", file=sys.stderr)
        return 1
    print("coins suite stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
