"""coinsctl as a newcomer meets it: options anywhere, help that shows defaults, bad input refused
without a traceback, error text shown as the server wrote it, and a failure that says what to check
and how to retry with the same request id."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import os
import re
import shlex
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from cli import client as client_module
from cli import render
from cli.client import (
    Clients,
    NoActingUser,
    Refusal,
    _CallDefaults,
    _Details,
    new_request_id,
)
from cli.main import _in_our_terms
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime import pki
from runtime.config import SecuritySettings
from runtime.server import RunningService, start_service
from services.gifting.service import SPEC as GIFTING
from tests.faults import TcpProxy
from tests.helpers import (
    eventually,
    expect_error,
    funded_user,
    live_gift,
    live_of,
    new_creator,
    new_id,
)
from tests.suite import Suite, require_postgres, start_suite
from tests.test_parked_credits import park

ROOT = Path(__file__).resolve().parents[1]


async def start_coinsctl(
    suite: Suite, *arguments: str, stderr_apart: bool = False, certs: Path | None = None
) -> asyncio.subprocess.Process:
    """coinsctl started against the suite (with the suite's certificates, or `certs`), its output
    (stdout and stderr, or each on its own pipe) on a pipe, as an 80-column terminal shows it."""
    env = {**os.environ, "COINS_CERTS_DIR": str(certs or suite.security.certs_dir), "COLUMNS": "80"}
    env.update({f"COINS_{n.upper()}_ADDRESS": s.address for n, s in suite.services.items()})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *arguments,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr_apart else asyncio.subprocess.STDOUT,
    )


async def coinsctl(suite: Suite, *arguments: str, certs: Path | None = None) -> tuple[int, str]:
    """Run coinsctl against the suite (without blocking the event loop the suite serves on)."""
    process = await start_coinsctl(suite, *arguments, certs=certs)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_request_id_and_as_work_after_the_subcommand(suite: Suite) -> None:
    user = new_id("viewer")
    request_id = new_id("open")
    first = await coinsctl(suite, "open-account", user, "--request-id", request_id)
    again = await coinsctl(suite, "open-account", user, "--request-id", request_id)
    assert first[0] == again[0] == 0, first[1] + again[1]
    assert user in again[1]
    code, output = await coinsctl(suite, "balance", user, "--as", user)
    assert code == 0 and "coins" in output.lower(), output


async def test_help_shows_defaults_and_bad_input_gets_no_traceback(suite: Suite) -> None:
    code, output = await coinsctl(suite, "open-account", "--help")
    assert code == 0 and "(default: US)" in output and "(default: 1995-01-01)" in output
    code, output = await coinsctl(suite, "open-account", "bob", "--birth-date", "1990-02-30")
    assert code == 2 and "is not a date: use YYYY-MM-DD" in output and "Traceback" not in output
    # A refusal's text is shown as the server wrote it (a pattern's brackets included).
    code, output = await coinsctl(suite, "open-account", "not a user id!")  # its token's sub too
    assert code == 1 and "TOKEN_INVALID" in output and "[A-Za-z0-9]" in output, output
    # --method alone is never dropped (the default method paid: review r21), and the refusal
    # names coinsctl's flags, not the API's fields (review r23).
    code, output = await coinsctl(suite, "withdraw", "leo", "2000", "--method", "bank")
    assert code == 1 and "--destination" in output and "destination_token" not in output, output


async def test_refusals_go_to_stderr_and_text_is_shown_as_typed(suite: Suite) -> None:
    """R6: a refusal went to stdout (`coinsctl ... | grep` dropped it), and a LIVE titled
    "[b]Big[/b] night :x:" was shown as "Big night ❌" (rich markup and emoji codes)."""
    creator = await new_creator(suite, live=False)
    live_id = new_id("live")
    title = "[b]Big[/b] night :x: [red]"
    code, started = await coinsctl(
        suite, "live", "start", creator, "--id", live_id, "--title", title, "--as", creator
    )
    assert code == 0 and title in started, started

    async def run(*arguments: str) -> tuple[int, str, str]:
        process = await start_coinsctl(suite, *arguments, stderr_apart=True)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await run("live", "show", live_id)
    assert code == 0 and title in out and "❌" not in out, out + err
    code, out, err = await run("withdraw", creator, "2000", "--as", creator)
    assert code == 1 and out == "" and "FAILED_PRECONDITION" in err, (out, err)


async def test_an_admin_audits_a_ledger_or_reads_its_latest_report(suite: Suite) -> None:
    """The runbook's "read the latest report" is a command (R6: only a raw AuditLedger call, whose
    default mode runs a new full audit)."""
    code, ran = await coinsctl(suite, "--admin", "audit-ledger", "payout", "--mode", "incremental")
    # (full the first time: an incremental audit starts from a clean run's chain heads)
    assert code == 0 and "payout ledger audit" in ran and "): OK;" in ran, ran
    assert "transactions (every leg, by its digest)" in ran and " links) checked" in ran, ran
    run_id = ran.split("payout ledger audit ", 1)[1].split(" ", 1)[0]
    code, latest = await coinsctl(suite, "--admin", "audit-ledger", "payout", "--mode", "latest")
    assert code == 0 and f"payout ledger audit {run_id} " in latest, latest
    code, refused = await coinsctl(suite, "audit-ledger", "wallet")
    assert code == 1 and "PERMISSION_DENIED" in refused, refused


async def test_a_refusal_reads_as_one_typed_value(suite: Suite) -> None:
    """R6: a Python caller decoded ErrorInfo, BadRequest and RetryInfo by hand from internal
    modules; `Refusal.of` gives them as one value."""
    user, coins = await funded_user(suite)
    creator = await new_creator(suite)
    clients = Clients(
        {name: s.address for name, s in suite.services.items()}, security=suite.security
    )
    too_big = gifting_pb2.SendGiftRequest(
        request_id=new_request_id(),
        sender_id=user,
        creator_id=creator,
        gift_id="universe",
        count=1,
        video_id="video-1",
    )
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(clients.gifting.SendGift, too_big)
    refusal = Refusal.of(caught.value)
    assert (refusal.code, refusal.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    assert refusal.metadata["available"] == str(coins) and not refusal.retryable
    bad = wallet_pb2.OpenAccountRequest(request_id=new_request_id(), user_id="not a user id!")
    as_user = Clients(  # a token for a user (no token can name "not a user id!")
        {name: s.address for name, s in suite.services.items()},
        security=suite.security,
        acting_user=user,
    )
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(as_user.wallet.OpenAccount, bad)
    refusal = Refusal.of(caught.value)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in refusal.violations
    # The rule each field broke, as the service named it: what a caller branches on (review r2).
    listing = wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_size=-3)
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(clients.wallet.ListLedgerEntries, listing)
    refusal = Refusal.of(caught.value)
    assert [(v.field, v.reason) for v in refusal.field_violations] == [
        ("page_size", "INT32_GTE_LTE")
    ]
    assert refusal.violations["page_size"] == refusal.field_violations[0].description


def test_a_request_naming_no_user_needs_an_acting_user(tmp_path: Path) -> None:
    """Review r2: a record read by id (GetGift) went out with a token for a made-up user
    "coinsctl", and came back PERMISSION_DENIED naming a user the caller never used. Without
    `acting_user` it is refused before anything is sent; coinsctl names its default viewer."""
    nowhere = {name: "127.0.0.1:1" for name in ("wallet", "gifting", "payout", "promotion")}
    pki.ensure_dev_pki(tmp_path)
    security = SecuritySettings(certs_dir=tmp_path, dev_pki=False)
    clients = Clients(nowhere, security=security)
    with pytest.raises(NoActingUser, match="acting_user") as refused:
        clients.gifting.GetGift(gifting_pb2.GetGiftRequest(sent_gift_id="f" * 32))
    assert "GetGiftRequest names no user" in str(refused.value)
    minted: list[str] = []

    def mint(user: str, roles: list[str]) -> str:
        minted.append(user)
        return "token"

    issuer = cast(Any, SimpleNamespace(mint=mint))
    for acting, default in (("ava", None), (None, "viewer"), ("ava", "viewer")):
        chosen = Clients(nowhere, acting_user=acting, default_user=default, security=security)
        chosen.__dict__["issuer"] = issuer  # (a cached property: no dev key needed here)
        chosen._token_for(gifting_pb2.GetGiftRequest(sent_gift_id="f" * 32))
    assert minted == ["ava", "viewer", "ava"]


def test_a_unary_call_without_a_deadline_gets_the_clients_own() -> None:
    """R6: `Clients(timeout=...)` was applied only where a command passed it; a call without one
    waited for ever on a hung service. Streams (a LIVE's feed) keep none."""
    seen: list[float | None] = []
    defaults = _CallDefaults(None, lambda: None, 7.5)

    def continuation(details: Any, request: Any) -> None:
        seen.append(details.timeout)

    details = _Details("/m", None, (), None, None, None)
    defaults.intercept_unary_unary(continuation, details, None)
    defaults.intercept_unary_unary(continuation, _Details("/m", 2.0, (), None, None, None), None)
    defaults.intercept_unary_stream(continuation, details, None)
    assert seen == [7.5, 2.0, None]


async def test_an_unreachable_service_is_named_and_a_retry_keeps_the_request_id(
    suite: Suite,
) -> None:
    code, output = await coinsctl(
        suite, "--wallet", "127.0.0.1:1", "open-account", new_id("viewer"), "--country", "GB"
    )
    assert code == 1, output
    assert "cannot reach wallet at 127.0.0.1:1: is the suite running" in output
    assert "COINS_WALLET_ADDRESS" in output
    retry = next(line for line in output.splitlines() if line.strip().startswith("coinsctl "))
    assert "--request-id" in retry and "--country GB" in retry
    # Quoted for a shell: a reason with spaces pastes back as one argument (review R2).
    code, output = await coinsctl(
        suite,
        "--payout",
        "127.0.0.1:1",
        "--admin",
        "--as",
        "ops-1",
        "cancel-withdrawal",
        "w-1",
        "--reason",
        "processor down",
    )
    retry = next(line for line in output.splitlines() if line.strip().startswith("coinsctl "))
    assert "--reason 'processor down'" in retry and "--request-id" in retry, output


async def test_a_wrong_address_or_certificates_say_what_to_check_without_grpcs_own_lines(
    suite: Suite, tmp_path: Path
) -> None:
    """Review A3: the wallet's address pointed at gifting printed only "UNIMPLEMENTED Method not
    found!"; at a plaintext health port, or with another checkout's certificates, three gRPC core
    log lines came first and then "is the suite running?", though it was."""
    wallet, gifting = suite.services["wallet"], suite.services["gifting"]
    code, output = await coinsctl(suite, "--wallet", gifting.address, "balance", "ava")
    assert code == 1, output
    assert f"the server at {gifting.address} does not serve wallet's calls" in output, output
    health = f"127.0.0.1:{wallet.health_port}"
    code, output = await coinsctl(suite, "--wallet", health, "balance", "ava")
    assert code == 1, output
    assert f"wallet at {health} answers, but the TLS handshake failed" in output, output
    assert "ssl_transport_security" not in output, output
    other = tmp_path / "other-certs"
    pki.ensure_dev_pki(other)
    code, output = await coinsctl(suite, "balance", "ava", certs=other)
    assert code == 1, output
    assert "certificate is not from the certificate authority in COINS_CERTS_DIR" in output
    assert "ssl_transport_security" not in output, output


async def test_a_quote_says_what_stays_of_an_odd_number_of_diamonds(suite: Suite) -> None:
    """A withdrawal takes whole cents' worth: the quote says so, as the withdrawal does (review
    A3: the quote showed 2,500 taken of 2,501 without a word)."""
    code, output = await coinsctl(suite, "quote", new_id("creator"), "2501")
    assert code == 0, output
    assert "1 of the 2501 diamonds asked for stay in the balance" in output, output


async def test_a_watch_that_cannot_reach_gifting_names_it(suite: Suite) -> None:
    """A stream names the service it could not reach, as a unary call does (it said "the service"
    and COINS_THE SERVICE_ADDRESS: streams never recorded the service they called)."""
    code, output = await coinsctl(suite, "--gifting", "127.0.0.1:1", "live", "watch", "live-x")
    assert code == 1, output
    assert "cannot reach gifting at 127.0.0.1:1: is the suite running" in output, output
    assert "--gifting or COINS_GIFTING_ADDRESS" in output, output


async def end_live_and_read(
    suite: Suite, creator: str, watch: asyncio.subprocess.Process, output: Output
) -> str:
    """The creator ends the watched LIVE: everything the watch printed, once it has ended."""
    await suite.gifting.EndLive(
        gifting_pb2.EndLiveRequest(request_id=new_id("end"), live_id=live_of(creator)),
        metadata=suite.token(creator),
    )
    everything = await output.rest()
    await asyncio.wait_for(watch.wait(), timeout=30)
    return everything


async def test_a_watch_that_loses_gifting_resumes_after_its_last_event(suite: Suite) -> None:
    """Gifting's connection lost while the feed flows (a gifting killed, a network cut: no
    SHUTTING_DOWN, no cursor from gifting): the watch ended there. It reconnects by itself after
    the last event it printed, once gifting answers again, and misses and repeats nothing."""
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    host, port = suite.services["gifting"].address.rsplit(":", 1)
    proxy = await TcpProxy(host, int(port)).start()
    address = f"127.0.0.1:{proxy.port}"
    try:
        watch = await start_coinsctl(suite, "--gifting", address, "live", "watch", live_of(creator))
        output = Output(watch)
        try:
            await suite.gifting.SendGift(live_gift(sender, creator, "rose"))
            await output.line_with("x rose")  # the feed is flowing through the proxy
            await output.line_with("#2 ")  # the rose's streak ended (0.3 s without another)
            proxy.cut()
            said = await output.line_with("the connection to gifting was lost (UNAVAILABLE)")
            assert f"reconnecting to watch {live_of(creator)} after cursor 2" in said, said
            await suite.gifting.SendGift(live_gift(sender, creator, "panda"))  # while it is cut
            proxy.heal()
            await output.line_with("coinsctl: reconnected to gifting")
            await output.line_with("x panda")
            everything = await end_live_and_read(suite, creator, watch, output)
        finally:
            if watch.returncode is None:
                watch.kill()
    finally:
        await proxy.close()
    assert watch.returncode == 0, everything
    assert everything.count(" x rose") == everything.count(" x panda") == 1, everything
    assert "Traceback" not in everything, everything


async def test_a_watch_that_loses_gifting_for_good_names_it(suite: Suite) -> None:
    """A lost gifting that does not come back within --reconnect-for ends the watch naming the
    address it watched through and the command that resumes it."""
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    host, port = suite.services["gifting"].address.rsplit(":", 1)
    proxy = await TcpProxy(host, int(port)).start()
    address = f"127.0.0.1:{proxy.port}"
    live = live_of(creator)
    try:
        watch = await start_coinsctl(
            suite, "--gifting", address, "live", "watch", live, "--reconnect-for", "1"
        )
        output = Output(watch)
        try:
            await suite.gifting.SendGift(live_gift(sender, creator, "rose"))
            await output.line_with("x rose")
            await output.line_with("#2 ")  # the rose's streak ended
            proxy.cut()
            everything = await output.rest()
            await asyncio.wait_for(watch.wait(), timeout=30)
        finally:
            if watch.returncode is None:
                watch.kill()
    finally:
        await proxy.close()
    assert watch.returncode == 1, everything
    assert f"gifting at {address} did not come back within 1 s" in everything, everything
    assert everything.rstrip().endswith(
        f"coinsctl --gifting {address} live watch {live} --reconnect-for 1 --after 2"
    ), everything
    assert "Traceback" not in everything, everything


@pytest.fixture(scope="module")
async def restartable(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    """A suite of the module's own whose gifting the tests stop and start again (on its port, with
    its database), as a restart or a rollout does; each test leaves it running."""
    if backend == "postgres":
        await require_postgres()
    running = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"restartable-{backend}"),
        only=("wallet", "payout", "gifting"),
    )
    yield running
    await running.stop()


async def stop_gifting(suite: Suite) -> RunningService[Any]:
    """Stop the suite's gifting as SIGTERM does: its watchers are told SHUTTING_DOWN at once."""
    gifting = suite.services.pop("gifting")
    await gifting.stop(grace=5)
    return gifting


async def start_gifting_again(suite: Suite, stopped: RunningService[Any]) -> None:
    settings = stopped.runtime.settings.model_copy(update={"port": stopped.port})
    suite.services["gifting"] = await start_service(GIFTING, settings)


class Output:
    """A running coinsctl's output (stdout and stderr), read line by line as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout
        self.lines: list[str] = []

    async def line_with(self, text: str) -> str:
        while True:
            line = (await asyncio.wait_for(self._stdout.readline(), timeout=30)).decode()
            assert line, f"coinsctl ended before {text!r}:\n{''.join(self.lines)}"
            self.lines.append(line)
            if text in line:
                return line

    async def rest(self) -> str:
        self.lines.append((await asyncio.wait_for(self._stdout.read(), timeout=60)).decode())
        return "".join(self.lines)


async def test_a_watch_reconnects_by_itself_when_gifting_restarts(restartable: Suite) -> None:
    """A stopping gifting ends each watch with UNAVAILABLE SHUTTING_DOWN and the cursor to resume
    after: `live watch` ended there, and its user had to find the cursor and start it again. It
    reconnects from that cursor by itself, says so on stderr, and misses and repeats nothing."""
    suite = restartable
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    await suite.gifting.SendGift(live_gift(sender, creator, "rose"))
    watch = await start_coinsctl(suite, "live", "watch", live_of(creator))
    output = Output(watch)
    try:
        await output.line_with("x rose")
        await output.line_with("#2 ")  # the rose's streak ended (0.3 s without another)
        stopped = await stop_gifting(suite)
        try:
            said = await output.line_with("gifting is stopping")
            assert f"reconnecting to watch {live_of(creator)} after cursor 2" in said, said
        finally:
            await start_gifting_again(suite, stopped)
        await output.line_with("coinsctl: reconnected to gifting")
        await suite.gifting.SendGift(live_gift(sender, creator, "panda"))
        await output.line_with("x panda")
        everything = await end_live_and_read(suite, creator, watch, output)
    finally:
        if watch.returncode is None:
            watch.kill()
    assert watch.returncode == 0, everything
    assert everything.count(" x rose") == everything.count(" x panda") == 1, everything
    assert "the LIVE ended" in everything and "Traceback" not in everything, everything


async def watch_while_gifting_stops(suite: Suite, live: str, *flags: str) -> tuple[int, str]:
    """`live watch LIVE FLAGS` until the LIVE's rose streak ended, then gifting stopped (started
    again once the watch ended): the watch's exit code and everything it printed."""
    watch = await start_coinsctl(suite, "live", "watch", live, *flags)
    output = Output(watch)
    try:
        await output.line_with("x rose")
        await output.line_with("#2 ")  # the rose's streak ended (0.3 s without another)
        stopped = await stop_gifting(suite)
        try:
            everything = await output.rest()
            await asyncio.wait_for(watch.wait(), timeout=30)
        finally:
            await start_gifting_again(suite, stopped)
    finally:
        if watch.returncode is None:
            watch.kill()
    assert watch.returncode is not None
    return watch.returncode, everything


async def test_a_watch_gives_up_when_gifting_stays_down(restartable: Suite) -> None:
    """Reconnects are bounded (--reconnect-for, 30 s by default): a gifting that stays down ends
    the watch with what happened and the command that resumes it from the last cursor."""
    suite = restartable
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    await suite.gifting.SendGift(live_gift(sender, creator, "rose"))
    live = live_of(creator)
    code, everything = await watch_while_gifting_stops(suite, live, "--reconnect-for", "1.5")
    assert code == 1, everything
    assert "coinsctl: gifting is stopping (SHUTTING_DOWN): reconnecting" in everything, everything
    address = suite.services["gifting"].address
    assert f"gifting at {address} did not come back within 1.5 s" in everything, everything
    assert "reconnects failed, the last UNAVAILABLE" in everything, everything
    resume = f"coinsctl live watch {live} --reconnect-for 1.5 --after 2"
    assert everything.rstrip().endswith(resume), everything
    assert "Traceback" not in everything, everything


async def test_a_feeds_refusals_name_coinsctls_flag_not_the_apis_field(restartable: Suite) -> None:
    """The service's messages name its request's field ("reconnect with after_cursor=2"), which
    a coinsctl user never typed: coinsctl shows them with its own flag (--after 2)."""
    suite = restartable
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    await suite.gifting.SendGift(live_gift(sender, creator, "rose"))
    live = live_of(creator)
    code, output = await coinsctl(suite, "live", "watch", live, "--after", "99")
    assert code == 1 and "CURSOR_BEYOND_END" in output, output
    assert "--after 99 is past it" in output and "after_cursor" not in output, output
    assert re.search(f"LIVE {live}'s feed is so far at cursor [12];", output), output  # it is on
    code, everything = await watch_while_gifting_stops(suite, live, "--reconnect-for", "0")
    assert code == 1, everything
    stopping = "this gifting process is stopping; reconnect with --after 2"
    assert f"UNAVAILABLE [SHUTTING_DOWN] {stopping}" in everything, everything
    assert "after_cursor" not in everything, everything


def test_an_audit_refusal_names_coinsctls_mode_not_the_apis_enum() -> None:
    """NO_AUDIT_YET says "ask for AUDIT_MODE_FULL" (every client's words): a coinsctl user reads
    the flag to type (review r6)."""
    said = "no audit has run yet; ask for AUDIT_MODE_FULL"
    assert _in_our_terms(said) == "no audit has run yet; ask for --mode full"


async def test_a_refused_call_is_one_log_line_with_its_reason(
    suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coins.rpc")
    user = new_id("viewer")
    await expect_error(
        suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user)),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    lines = [
        r.getMessage() for r in caplog.records if r.name == "coins.rpc" and user in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert "GetBalance refused NOT_FOUND ACCOUNT_NOT_FOUND" in lines[0]


async def test_times_and_tools_refuse_bad_input_without_a_traceback(suite: Suite) -> None:
    """A time that is not ISO 8601 gets a usage error (it was a traceback), and one with an offset
    is converted to UTC (the offset was replaced); the operator tools answer --help."""
    code, output = await coinsctl(suite, "statement", "ava", "--since", "yesterday")
    assert code == 2 and "is not a time" in output and "Traceback" not in output, output
    user = new_id("viewer")
    await coinsctl(suite, "open-account", user)
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)
    local = later.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()  # the same moment
    code, output = await coinsctl(suite, "statement", user, "--until", local)
    assert code == 0, output  # read as 2 hours later than meant, it was still after now: fine
    earlier = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)).replace(microsecond=0)
    local = earlier.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    code, output = await coinsctl(suite, "statement", user, "--since", local)
    assert code == 0, output  # taken as UTC it lay 90 minutes ahead: INVALID_PERIOD
    for tool in ("tools.healthcheck", "tools.cross_audit", "runtime.pki"):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", tool, "--help", cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        shown, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0 and b"usage:" in shown, (tool, shown[-500:])
    assert not (ROOT / "--help").exists()


async def test_with_the_access_log_a_refused_call_is_still_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the access log (on by default with JSON logs) every call has a line; a refusal's says
    its message too, and there is no second line for it (JSON mode logged each refusal twice)."""
    suite = await start_suite(
        "sqlite", tmp_path, only=("wallet",), overrides={"wallet": {"access_log": True}}
    )
    try:
        caplog.set_level(logging.INFO, logger="coins.rpc")
        user = new_id("viewer")
        await expect_error(
            suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user)),
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
        )
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "coins.rpc" and "GetBalance" in r.getMessage()
        ]
        assert len(lines) == 1, lines
        assert "NOT_FOUND ACCOUNT_NOT_FOUND" in lines[0] and user in lines[0], lines
    finally:
        await suite.stop()


async def test_promotions_can_be_listed_by_status(suite: Suite) -> None:
    user, _ = await funded_user(suite)
    code, output = await coinsctl(suite, "promote", user, "video-7", "150", "--as", user)
    assert code == 0, output
    promotion_id = re.findall(r"\b[0-9a-f]{32}\b", output)[0]
    code, output = await coinsctl(suite, "promotions", user, "--status", "active", "--as", user)
    assert code == 0 and "video-7" in output, output
    assert promotion_id in output and "0 / 150" in output, output  # the id whole in 80 columns
    code, output = await coinsctl(suite, "promotions", user, "--status", "completed", "--as", user)
    assert code == 0 and "video-7" not in output, output
    code, output = await coinsctl(suite, "promotion", promotion_id)  # whose? coinsctl cannot tell
    assert code == 1 and "NOT_ACCOUNT_OWNER" in output and "pass --as OWNER" in output, output
    code, output = await coinsctl(suite, "promotions", user, "--status", "paused")
    assert code == 2 and "invalid choice" in output and "Traceback" not in output, output


async def test_parked_credits_are_listed_and_redelivered(suite: Suite) -> None:
    """The CoinsParkedWork runbook's commands: parked credits listed with their full ids (one
    line each in 80 columns) and last error, for admins only; redelivered with a reason, a
    mistyped id named; the creator is credited once."""
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    parked = await park(suite, sender, creator, 40)
    admin = ("--admin", "--as", new_id("ops"))
    code, output = await coinsctl(suite, "parked-credits")
    assert code == 1 and "ADMIN_ROLE_REQUIRED" in output, output
    code, output = await coinsctl(suite, *admin, "parked-credits", "--limit", "500")
    assert code == 0, output
    row = next(line for line in output.splitlines() if parked in line)
    assert "40" in row and "INVALID_ARGUMENT" in row, output
    assert creator in output, output
    code, output = await coinsctl(suite, *admin, "redeliver-credits", parked)
    assert code == 2 and "--reason" in output and "Traceback" not in output, output
    code, output = await coinsctl(
        suite, *admin, "redeliver-credits", "no-such-gift", parked, "--reason", "payout fixed"
    )
    assert code == 0, output
    assert "1 parked credit(s) back on the outbox" in output, output
    assert "no-such-gift" in output.split("not parked", 1)[1], output

    async def credited() -> bool:
        balance = await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
        return balance.balance.diamonds == 20  # 40 coins -> 20 diamonds

    await eventually(credited, "the redelivered credit")
    code, output = await coinsctl(suite, *admin, "parked-credits", "--limit", "500")
    assert code == 0 and parked not in output, output


async def test_a_limit_out_of_range_is_refused_naming_limit(suite: Suite) -> None:
    """`parked-credits --limit 501` went to gifting, whose refusal named `page_size`, a field the
    user never typed. coinsctl checks each listing's --limit against what its RPC returns at once
    (the proto's page_size rule) and names its own flag."""
    admin = ("--admin", "--as", new_id("ops"))
    code, output = await coinsctl(suite, *admin, "parked-credits", "--limit", "501")
    assert code == 2, output
    assert "argument --limit: 501 is out of range: give 1 to 500" in output, output
    assert "page_size" not in output and "Traceback" not in output, output
    code, output = await coinsctl(suite, *admin, "parked-credits", "--limit", "0")
    assert code == 2 and "argument --limit: 0 is out of range: give 1 to 500" in output, output
    code, output = await coinsctl(suite, "rankings", "--limit", "101")
    assert code == 2 and "argument --limit: 101 is out of range: give 1 to 100" in output, output
    code, output = await coinsctl(suite, "rankings", "--help")
    assert code == 0 and "most rows shown, 1 to 100 (default: 10)" in output, output
    code, output = await coinsctl(suite, *admin, "parked-credits", "--limit", "500")
    assert code == 0, output


async def test_days_and_seconds_out_of_range_are_refused_naming_the_flag(suite: Suite) -> None:
    """`promote --days 0` was refused as `duration_days`, `revenue --days 0` as `start_time` and
    `end_time` (fields the user never typed), and `live watch --reconnect-for nan` never gave up."""
    admin = ("--admin", "--as", new_id("ops"))
    for arguments, said in (
        (
            ("promote", "u", "v", "100", "--days", "0"),
            "--days: 0 is out of range: give 1 to 30",
        ),
        (
            ("promote", "u", "v", "100", "--days", "31"),
            "--days: 31 is out of range: give 1 to 30",
        ),
        ((*admin, "revenue", "--days", "0"), "--days: 0 is out of range: give 1 to 92"),
        ((*admin, "revenue", "--days", "93"), "--days: 93 is out of range: give 1 to 92"),
        (
            ("live", "watch", "live-x", "--reconnect-for", "nan"),
            "--reconnect-for: nan is out of range",
        ),
        (
            ("live", "watch", "live-x", "--reconnect-for", "inf"),
            "--reconnect-for: inf is out of range",
        ),
        (
            ("live", "watch", "live-x", "--reconnect-for", "-1"),
            "--reconnect-for: -1 is out of range",
        ),
    ):
        code, output = await coinsctl(suite, *arguments)
        assert code == 2 and f"argument {said}" in output, (arguments, output)
        assert "duration_days" not in output and "start_time" not in output, output
    code, output = await coinsctl(suite, *admin, "revenue", "--days", "92")
    assert code == 0, output


def test_a_reconciliations_ids_stay_whole_in_80_columns() -> None:
    """Both ids of a mismatch (ours and the processor's) are looked up elsewhere: each is whole on
    a line of an 80-column terminal (seven columns folded them)."""
    ours, theirs = uuid.uuid4().hex, f"SBXITEM{uuid.uuid4().hex[:17].upper()}"
    mismatch = payout_pb2.ReconciliationMismatch(
        kind=payout_pb2.MISMATCH_KIND_AMOUNT_DIFFERS,
        withdrawal_id=ours,
        processor_reference=theirs,
        our_status=payout_pb2.WITHDRAWAL_STATUS_PAID,
        processor_status="SUCCESS",
        our_amount_minor=1_250,
        processor_amount_minor=125_000,
    )
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render.mismatches([mismatch]))
    shown = console.export_text()
    assert ours in shown and theirs in shown and "125,000" in shown, shown


def test_coinsctl_run_outside_the_checkout_finds_the_checkouts_certs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PATH, coinsctl runs from anywhere: without COINS_CERTS_DIR it uses the checkout's certs/
    (where `make up` writes them) when the working directory has none; COINS_CERTS_DIR wins."""
    checkout_certs = tmp_path / "checkout" / "certs"
    checkout_certs.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(client_module, "_CHECKOUT_CERTS", checkout_certs)
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("COINS_CERTS_DIR", raising=False)
    assert client_module._security().certs_dir == checkout_certs
    (elsewhere / "certs").mkdir()  # a certs/ where it runs: that one, as before
    assert client_module._security().certs_dir == Path("certs")
    monkeypatch.setenv("COINS_CERTS_DIR", str(tmp_path / "mine"))
    assert client_module._security().certs_dir == tmp_path / "mine"


def test_ledger_references_stay_whole_in_80_columns() -> None:
    """A ledger entry's reference (`gift:` + a 32-hex id) is copied into the next command: whole
    on a line of an 80-column terminal, for coins and for diamonds."""
    from google.protobuf.timestamp_pb2 import Timestamp

    reference = f"gift:{uuid.uuid4().hex}"
    stamp = Timestamp(seconds=1_796_000_000)
    coins = wallet_pb2.LedgerEntry(
        kind=wallet_pb2.ENTRY_KIND_GIFT,
        amount=-1_500,
        balance_after=1_234_567,
        reference=reference,
        create_time=stamp,
    )
    diamonds = payout_pb2.DiamondEntry(
        kind=payout_pb2.DIAMOND_ENTRY_KIND_GIFT,
        diamonds=750,
        bucket=payout_pb2.DIAMOND_BUCKET_PENDING,
        balance_after=1_234_567,
        reference=reference,
        create_time=stamp,
    )
    for table in (render.ledger("u", [coins]), render.diamond_ledger("c", [diamonds])):
        console = Console(width=80, record=True, file=io.StringIO())
        console.print(table)
        shown = console.export_text()
        assert reference in shown and "1,234,567" in shown, shown


def test_a_withdrawals_history_says_when_it_was_parked_and_who_retried_it() -> None:
    """A parking and a retry leave the withdrawal processing: the history's "what" names them, not
    the status, which would read as if it had moved to processing again."""
    at = Timestamp(seconds=1_796_000_000)
    event = payout_pb2.WithdrawalEvent
    w = payout_pb2.Withdrawal(
        withdrawal_id="wd-1",
        creator_id="cleo",
        status=payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
        history=[
            event(status=payout_pb2.WITHDRAWAL_STATUS_PROCESSING, actor="auto-approve", time=at),
            event(
                status=payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
                actor="worker",
                reason="processor timed out",
                time=at,
                kind=payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED,
            ),
            event(
                status=payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
                actor="ops-ann",
                reason="processor is back",
                time=at,
                kind=payout_pb2.WITHDRAWAL_EVENT_KIND_RETRIED,
            ),
        ],
    )
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(render.withdrawal(w))
    rows = [line for line in console.export_text().splitlines() if "│" in line and "2026" in line]
    assert [row.split("│")[2].strip() for row in rows] == ["processing", "parked", "retried"]
    assert "processor timed out" in rows[1] and "ops-ann" in rows[2]


def coin_column(table: str) -> list[str]:
    """The coins cells of a printed ledger table, top to bottom (a user id or a page token may
    contain "-5" too)."""
    return re.findall(r"│ +([+-]\d+) │", table)


async def test_ledger_filters_by_kind_and_time_and_prints_the_next_page(suite: Suite) -> None:
    """`coinsctl ledger` takes the filters ListLedgerEntries has (review R3: only --limit) and,
    when there is more, prints the command of the next page, its filters kept."""
    user, _ = await funded_user(suite)  # a purchase of 700
    await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id("buy"),
            user_id=user,
            package_id="us-web-70",
            payment_token=f"tok_visa_{user}",
        )
    )
    await suite.as_caller("gifting").wallet.DebitCoins(
        wallet_pb2.DebitCoinsRequest(
            request_id=new_id("d"),
            user_id=user,
            coins=5,
            reason=wallet_pb2.DEBIT_REASON_GIFT,
            reference=f"gift:{new_id('g')}",
        )
    )
    code, first = await coinsctl(
        suite, "ledger", user, "--as", user, "--kind", "purchase", "--limit", "1"
    )
    assert code == 0 and coin_column(first) == ["+70"], first
    follow = next(line for line in first.splitlines() if line.startswith("next page: coinsctl "))
    again = shlex.split(follow.removeprefix("next page: coinsctl "))
    assert again[:7] == ["ledger", user, "--as", user, "--kind", "purchase", "--limit"], follow
    code, second = await coinsctl(suite, *again)
    assert code == 0 and coin_column(second) == ["+700"], second
    assert "next page" not in second
    code, spent = await coinsctl(suite, "ledger", user, "--as", user, "--kind", "gift")
    assert code == 0 and coin_column(spent) == ["-5"], spent
    code, later = await coinsctl(suite, "ledger", user, "--as", user, "--since", "2099-01-01")
    assert code == 0 and coin_column(later) == [], later
    code, wrong = await coinsctl(suite, "ledger", user, "--kind", "bonus")
    assert code == 2 and "invalid choice: 'bonus'" in wrong, wrong


def test_revenue_amounts_stay_whole_in_80_columns() -> None:
    """Seven columns of "1,222.214400 USD" folded an amount onto two lines ("307.24310" over
    "0 USD": review r6), which reads as two numbers: the currency is in the title, and no number
    is ever folded (a table wider than the terminal is the terminal's to wrap)."""
    day = payout_pb2.RevenueDay(
        day="2026-12-07",
        gifts=1_234,
        coins=123_456,
        diamonds=61_728,
        gifts_value_micros=1_222_214_400,
        creators_value_micros=308_640_000,
        platform_revenue_micros=913_574_400,
    )
    report = payout_pb2.GetRevenueReportResponse(days=[day], total=day, currency_code="USD")
    shown = io.StringIO()
    Console(width=80, file=shown, soft_wrap=True).print(render.revenue(report))
    assert "Revenue from gifts in USD" in shown.getvalue(), shown.getvalue()
    for amount in ("1,222.214400", "308.640000", "913.574400", "123,456", "61,728"):
        assert amount in shown.getvalue(), shown.getvalue()


async def test_buy_takes_a_package_or_a_custom_amount(suite: Suite) -> None:
    """The wallet sells custom amounts (WALLET_CUSTOM_*): coinsctl buys them too (review r6 had to
    use buf curl), and refuses, as a usage error, neither or both."""
    user = new_id("viewer")
    assert (await coinsctl(suite, "open-account", user))[0] == 0
    code, output = await coinsctl(suite, "buy", user, "--coins", "250")
    assert code == 0 and "250" in output and "completed" in output, output
    code, output = await coinsctl(suite, "balance", user)
    assert code == 0 and "250" in output, output
    code, output = await coinsctl(suite, "buy", user)
    assert code == 2 and "one of the arguments package --coins is required" in output, output
    code, output = await coinsctl(suite, "buy", user, "us-web-700", "--coins", "250")
    assert code == 2 and "not allowed with argument" in output, output


def test_control_characters_a_service_holds_are_shown_not_obeyed() -> None:
    """A LIVE title held escape sequences (from before the services refused them): coinsctl
    printed them raw, clearing a viewer's screen, retitling the terminal and forging a line (a
    review). Every string it prints, table cells and refusals too, shows them written out."""
    title = "a\x1b[2J\x1b]0;pwned\x07FAKE\rline\x9b"
    live = gifting_pb2.Live(live_id="l1", creator_id="c1", title=title)
    for console in (
        type(render.console)(width=120, record=True, file=io.StringIO()),
        type(render.errors)(width=120, record=True, file=io.StringIO()),
    ):
        console.print(render.live(live))
        console.print(f"refused: {title}")
        written = re.sub(
            r"\x1b\[[0-9;]*m", "", console.export_text(clear=False, styles=True)
        )  # its colours
        assert not any(c in written for c in "\x1b\x07\r\x9b"), repr(written)
        shown = console.export_text().replace("\n", "")
        assert "\\x1b[2J" in shown and "\\x07FAKE\\rline" in shown.replace(" ", "")


async def test_another_services_idle_poll_has_no_access_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gifting's reversals follower asks payout every 10 s: a poll of a background pass (its
    BACKGROUND baggage) that lists nothing leaves no line, as its span is not exported (a review
    counted ~8,600 such lines a day per gifting replica); the same call outside a pass does."""
    suite = await start_suite(
        "sqlite", tmp_path, only=("wallet", "payout"), overrides={"payout": {"access_log": True}}
    )
    try:
        caplog.set_level(logging.INFO, logger="coins.rpc")
        payout = suite.as_caller("gifting").payout
        request = payout_pb2.ListReversedCreditsRequest(after_sequence=0)
        await payout.ListReversedCredits(request, metadata=(("baggage", "coins.background=1"),))

        def lines() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "coins.rpc" and "ListReversedCredits" in r.getMessage()
            ]

        assert lines() == []
        await payout.ListReversedCredits(request)
        assert len(lines()) == 1, lines()
    finally:
        await suite.stop()


async def test_an_address_may_list_every_replica(suite: Suite) -> None:
    """`ipv4:a,b` names a service's replicas, as the services' own downstream addresses may: it
    has no host name to check the certificate against, so it is checked against the service's
    name (a review's: "Hostname Verification Check failed")."""
    wallet = suite.services["wallet"].address
    listed = f"ipv4:{wallet},{wallet}"
    code, output = await coinsctl(suite, "--wallet", listed, "open-account", new_id("viewer"))
    assert code == 0, output
