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

from tests.helpers import funded_user, new_creator, new_id
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


async def node_client(arguments: dict[str, Any]) -> dict[str, Any]:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the cross-language client test"
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        await _run(npm, "ci", "--no-audit", "--no-fund", cwd=CLIENT)
    answer: dict[str, Any] = json.loads(
        await _run(node, "client.mjs", json.dumps(arguments), cwd=CLIENT)
    )
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
    assert answer["foreign"]["info"] == {"reason": "NOT_ACCOUNT_OWNER", "domain": "wallet.coins"}
