"""Security on a real redis-server: identities, authenticated messages and replies, replays, sealing, policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentMessage,
    BaseAgent,
    IdentityError,
    MessageBroker,
    MessageSender,
    Settings,
    create_agent_config,
    keys,
)
from agentcomms.security import b64encode, create_admin, enrol_team
from conftest import wait_for_dead_letters

TEAM = [("agent.cso.jane", ["cso"]), ("agent.cmo.john", ["cmo"]), ("dashboard.cmo", ["cmo"]), ("mallory", ["intern"])]


@pytest.fixture
async def secure(redis_url: str, tmp_path: Path) -> Settings:
    """Settings with security on: identities for TEAM in a folder, enrolled by an admin (the trust anchor)."""
    folder = tmp_path / "identities"
    admin = create_admin(folder, "admin.ops")
    async with MessageBroker(settings=Settings(redis_url=redis_url)) as broker:
        await enrol_team(broker.pipeliner, folder, admin, TEAM)
    return Settings(
        redis_url=redis_url, security="on", identity_dir=folder, trust_anchors=[b64encode(admin.public.ed25519)],
        claim_idle=0.3, message_timeout=10,
    )  # fmt: skip


class Jane(BaseAgent):
    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        return {"answer": message.payload.data.get("query"), "from_roles": message.sender_roles}


@pytest.fixture
async def jane(secure: Settings) -> AsyncIterator[Jane]:
    async with Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=secure) as agent:
        yield agent


async def test_an_authenticated_request_is_answered_and_the_sender_role_is_verified(
    secure: Settings, jane: Jane
) -> None:
    async with MessageSender(sender_id="dashboard.cmo", settings=secure) as sender:
        reply = await sender.request("agent.cso.jane", "request_knowledge", {"query": "pipeline?"})
    assert reply.success and reply.data == {"answer": "pipeline?", "from_roles": ["cmo"]}


async def test_a_sender_id_this_process_does_not_hold_is_refused(secure: Settings, jane: Jane) -> None:
    async with MessageSender(sender_id="agent.cmo.ghost", settings=secure) as sender:
        with pytest.raises(IdentityError, match="agent.cmo.ghost"):
            await sender.request("agent.cso.jane", "request_knowledge", {"query": "x"})


async def test_an_unauthenticated_message_is_dead_lettered_unhandled(secure: Settings, jane: Jane, raw: Redis) -> None:
    forged = AgentMessage(sender_id="dashboard.cmo", recipient_id="agent.cso.jane", intent="request_knowledge")
    await raw.xadd(keys.inbox("agent.cso.jane"), {"m": forged.model_dump_json()})
    await raw.xadd(keys.inbox("agent.cso.jane"), {"m": forged.model_dump_json(), "a": b"v1.h.1.AAAA"})
    letters = await wait_for_dead_letters(raw, "agent.cso.jane", 2)
    reasons = [letter[b"reason"].decode() for letter in letters]
    assert reasons[0] == "unauthenticated: no authentication token"
    assert reasons[1].startswith("unauthenticated: the token does not match")
    assert jane._subscription is not None and jane._subscription.stats.handled == 0


async def test_sealed_payloads_reach_the_handler_and_are_not_in_the_aof(
    secure: Settings, jane: Jane, raw: Redis, redis_server: Any
) -> None:
    secret = "PROJECT-NIGHTINGALE-7731"
    async with MessageSender(sender_id="dashboard.cmo", settings=secure) as sender:
        reply = await sender.broker.request(
            sender.build_message("agent.cso.jane", "request_knowledge", {"query": secret}), seal=True
        )
    assert reply.data["answer"] == secret  # opened by the agent, and its reply opened by the caller
    await raw.bgrewriteaof()
    folder = Path(redis_server.data_dir)
    while (await raw.info("persistence"))["aof_rewrite_in_progress"]:
        await asyncio.sleep(0.01)
    aof = b"".join(p.read_bytes() for p in folder.rglob("*.aof*") if p.is_file())
    assert secret.encode() not in aof
