"""A client in another language works from what the repository ships: a Node grpc-js client (no code
of ours) loads gen/coins.protoset, connects over mutual TLS with the gateway's certificate and a
user's token, reads a balance, sends a gift, replays it, and is refused another user's balance.

Needs Node.js and npm (CI's machine has both); the client's packages are installed from its lock file
on first use. Without node the test fails: it never skips."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from coins.gifting.v1 import gifting_pb2
from tests.helpers import funded_user, live_of, new_creator, new_id, start_live
from tests.suite import Suite

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "clients" / "node"


async def _run(*command: str, cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, f"{' '.join(command)} failed: {err.decode()[-2000:]}"
    return out.decode()


async def node_client(arguments: dict[str, Any], script: str = "client.mjs") -> dict[str, Any]:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the cross-language client test"
    if not (CLIENT / "node_modules" / "grpc-js-reflection-client").exists():
        await _run(npm, "ci", "--no-audit", "--no-fund", cwd=CLIENT)
    answer: dict[str, Any] = json.loads(await _run(node, script, json.dumps(arguments), cwd=CLIENT))
    return answer


async def test_a_node_grpc_js_client_reads_a_balance_and_sends_a_gift(suite: Suite) -> None:
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    token = suite.token(sender)[0][1].split(" ", 1)[1]
    answer = await node_client(
        {
            "protoset": str(ROOT / "gen" / "coins.protoset"),
            "certs": str(suite.security.certs_dir),
            "wallet": suite.services["wallet"].address,
            "gifting": suite.services["gifting"].address,
            "token": token,
            "sender": sender,
            "creator": creator,
            "live": live_of(creator),
            "requestId": new_id("node-gift"),
        }
    )
    assert "response" in answer["before"], answer
    assert answer["before"]["response"]["balance"]["coins"] == str(coins)
    sent = answer["sent"]["response"]
    assert sent["sent_gift"]["coins"] == "3" and sent["sent_gift"]["creator_id"] == creator
    assert sent["sender_balance_coins"] == str(coins - 3)
    assert answer["replay"]["response"] == sent  # the same request id: the same answer, once
    assert answer["after"]["response"]["balance"]["coins"] == str(coins - 3)
    assert answer["foreign"]["code"] == "PERMISSION_DENIED"
    assert answer["foreign"]["info"] == {
        "reason": "NOT_ACCOUNT_OWNER",
        "domain": "wallet.coins",
        "metadata": {"field": "user_id", "account": creator},
    }


async def test_a_node_client_watches_a_live_through_reflection_alone(suite: Suite) -> None:
    """The feed from a client that has no .proto and no descriptor set: it learns the service from
    the server's reflection and reads WatchLive's stream to the LIVE's end."""
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    senders = [(await funded_user(suite))[0] for _ in range(2)]
    sent = []
    for i in range(4):
        answer = await suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id("g"),
                sender_id=senders[i % 2],
                creator_id=creator,
                gift_id="rose",
                count=i + 1,
                live_id=live,
            )
        )
        sent.append(answer.sent_gift.sent_gift_id)
    watching = asyncio.create_task(
        node_client(
            {
                "certs": str(suite.security.certs_dir),
                "gifting": suite.services["gifting"].address,
                "token": suite.token(new_id("viewer"))[0][1].split(" ", 1)[1],
                "live": live,
            },
            script="watch.mjs",
        )
    )
    await suite.gifting.EndLive(
        gifting_pb2.EndLiveRequest(request_id=new_id("end"), live_id=live),
        metadata=suite.token(creator),
    )
    events = (await watching)["events"]
    # Four gifts, the two viewers' rose streaks ending (their pause, or the LIVE's end), the end.
    assert [e["cursor"] for e in events] == [str(n) for n in range(1, 8)], events
    gifts = [e["gift"] for e in events if e["event"] == "gift"]
    assert [g["sent_gift_id"] for g in gifts] == sent
    assert [g["count"] for g in gifts] == [1, 2, 3, 4]
    assert sorted(e["streak_ended"]["count"] for e in events if e["event"] == "streak_ended") == [
        4,
        6,
    ]
    assert events[-1]["event"] == "ended"
    assert events[-1]["ended"]["summary"]["gifts_sent"] == "10"
