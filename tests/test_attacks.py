"""The attack suite: what an attacker with access to the Redis can try, and the figures of each attempt.

Every attack runs against a real redis-server with AGENTCOMMS_SECURITY=on and no Redis ACLs
(the ACL matrix is tests/test_acl.py): the attacker ("mallory", an enrolled identity with the
role "intern", or a raw Redis client) can read and write every key. Figures are printed at the
end of the run (section "figures").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentMessage,
    AgentResponse,
    BaseAgent,
    IdentityError,
    MessageBroker,
    MessageSender,
    PermissionDeniedError,
    RequestTimeoutError,
    Settings,
    create_agent_config,
    keys,
)
from agentcomms.security import create_admin, enrol_team
from agentcomms.security.crypto import MSG, REPLY, make_token, pair_keys
from agentcomms.security.identity import Identity
from conftest import read_reply, report, server_time_passes

TEAM = [
    ("agent.cso.jane", ["cso"]),
    ("agent.cmo.john", ["cmo"]),
    ("dashboard.cmo", ["cmo"]),
    ("mallory", ["intern"]),
]


@pytest.fixture
async def folder(redis_url: str, tmp_path: Path) -> Path:
    folder = tmp_path / "identities"
    admin = create_admin(folder, "admin.ops")
    async with MessageBroker(settings=Settings(redis_url=redis_url)) as broker:
        await enrol_team(broker.pipeliner, folder, admin, TEAM)
    return folder


def secure_settings(redis_url: str, folder: Path, *, only: str | None = None, **overrides: Any) -> Settings:
    """Security on; the process holds every identity of ``folder``, or ``only`` that one (its own host's)."""
    anchors = (folder / "trust_anchors").read_text().split()
    values: dict[str, Any] = {
        "redis_url": redis_url, "security": "on", "identity_dir": folder, "trust_anchors": anchors,
        "claim_idle": 0.3, "message_timeout": 10,
    }  # fmt: skip
    if only is not None:
        values.update(identity_dir=folder / "nothing-here", identity_file=folder / f"{only}.json")
    return Settings(**{**values, **overrides})


class Jane(BaseAgent):
    """The CSO's twin: counts what it handles."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: list[AgentMessage] = []
        self.arrived = asyncio.Condition()
        self.gate = asyncio.Event()
        self.gate.set()  # cleared: answers wait until it is set again

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        return await self._note(message)

    async def handle_share_insights(self, message: AgentMessage) -> dict[str, Any]:
        return await self._note(message)

    async def _note(self, message: AgentMessage) -> dict[str, Any]:
        async with self.arrived:
            self.handled.append(message)
            self.arrived.notify_all()
        await self.gate.wait()
        return {"pipeline": "$2.4M", "n": message.payload.data.get("n")}

    async def wait_handled(self, count: int) -> None:
        async with asyncio.timeout(60), self.arrived:
            await self.arrived.wait_for(lambda: len(self.handled) >= count)


@pytest.fixture
async def jane(redis_url: str, folder: Path) -> AsyncIterator[Jane]:
    settings = secure_settings(redis_url, folder)
    config = create_agent_config("agent.cso.jane", "jane", "cso", "sales")
    async with Jane(config, settings=settings, concurrency=100) as agent:  # can hold 40 requests at once
        yield agent


async def dead_reasons(raw: Redis, agent_id: str, count: int) -> list[str]:
    stream, last = keys.dead_letters(agent_id), "0-0"
    reasons: list[str] = []
    async with asyncio.timeout(60):
        while len(reasons) < count:
            for _, batch in read_reply(await raw.xread({stream: last}, block=1000, count=1000)):
                for entry_id, fields in batch:
                    last = entry_id.decode()
                    reasons.append(fields[b"reason"].decode())
    return reasons


async def test_spoofed_senders_are_all_refused(redis_url: str, folder: Path, jane: Jane, raw: Redis) -> None:
    mallory = Identity.load(folder / "mallory.json")
    jane_public = Identity.load(folder / "agent.cso.jane.json").public
    mallory_keys = pair_keys(mallory, jane_public)
    victims = ["dashboard.cmo", "agent.cmo.john", "admin.ops"]
    # through the API: this process holds no identity for the victims
    api_refused = 0
    async with MessageSender(
        sender_id="dashboard.cmo", settings=secure_settings(redis_url, folder, only="mallory")
    ) as sender:
        for _ in range(10):
            try:
                await sender.send_message("agent.cso.jane", "share_insights", {"x": 1})
            except IdentityError:
                api_refused += 1
    # straight into the inbox: 1,000 messages in victims' names, tagged with mallory's own keys, or none
    seconds, _ = await raw.time()
    for n in range(1000):
        forged = AgentMessage(
            sender_id=victims[n % 3], recipient_id="agent.cso.jane", intent="share_insights", payload={"data": {"n": n}}
        )
        body = forged.model_dump_json(exclude_none=True).encode()
        fields: dict[Any, Any] = {"m": body}
        if n % 2:
            fields["a"] = make_token(MSG, int(seconds) * 1000, body, keys=mallory_keys, signer=None)
        await raw.xadd(keys.inbox("agent.cso.jane"), fields)
    reasons = await dead_reasons(raw, "agent.cso.jane", 1000)
    refused = sum(r.startswith("unauthenticated") for r in reasons)
    report(f"spoofed senders: {api_refused}/10 refused by the API, {refused}/1,000 forged entries refused, "
           f"{len(jane.handled)} handled")  # fmt: skip
    assert api_refused == 10 and refused == 1000 and jane.handled == []


async def test_replayed_messages_are_never_accepted(redis_url: str, folder: Path, raw: Redis) -> None:
    settings = secure_settings(redis_url, folder, replay_window=3)
    inbox = keys.inbox("agent.cso.jane")
    async with MessageSender(sender_id="dashboard.cmo", settings=settings) as sender:
        await sender.broadcast_message("share_insights", {"warm": 1}, role="nobody")  # connects; nothing sent
        for n in range(1000):  # while jane is offline: the attacker copies every entry
            await sender.send_message("agent.cso.jane", "share_insights", {"n": n}, allow_unregistered=True)
    captured: Any = await raw.xrange(inbox)
    assert len(captured) == 1000
    jane = Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=settings)
    async with jane:
        await jane.wait_handled(1000)
        for _, fields in captured:  # replayed at once (within the window): the same message ids
            await raw.xadd(inbox, fields)
        soon = await dead_reasons(raw, "agent.cso.jane", 1000)
        await server_time_passes(raw, 4)  # past the replay window
        for _, fields in captured:
            await raw.xadd(inbox, fields)
        late = (await dead_reasons(raw, "agent.cso.jane", 2000))[1000:]
    replayed = sum(r.startswith("replayed") for r in soon + late)
    report(f"replays: 2,000 replayed entries (1,000 within the window, 1,000 after it): {replayed} refused, "
           f"{len(jane.handled) - 1000} accepted")  # fmt: skip
    assert replayed == 2000 and len(jane.handled) == 1000


async def test_reply_theft_and_forged_replies_reach_no_caller(
    redis_url: str, folder: Path, jane: Jane, raw: Redis
) -> None:
    settings = secure_settings(redis_url, folder)
    async with (
        MessageSender(sender_id="dashboard.cmo", settings=settings) as victim,
        MessageSender(sender_id="mallory", settings=secure_settings(redis_url, folder, only="mallory")) as mallory,
    ):
        # theft: mallory's requests name the victim's reply stream and a request id the victim waits for
        victim_stream = victim.broker._reply_stream_for("dashboard.cmo")
        stolen = 0
        for n in range(40):
            bait = mallory.build_message("agent.cso.jane", "request_knowledge", {"n": n})
            bait = bait.model_copy(update={"reply_to": victim_stream, "correlation_id": f"victim-{n}"})
            await mallory.broker.publish_message(bait)
        # forged replies: written straight into the victim's stream for its real, waiting requests
        jane.gate.clear()
        slow = [
            asyncio.ensure_future(victim.request("agent.cso.jane", "request_knowledge", {"n": 100 + n}, timeout=20))
            for n in range(40)
        ]
        await jane.wait_handled(40)  # jane holds all 40: they wait for their answers
        mallory_id = Identity.load(folder / "mallory.json")
        victim_public = Identity.load(folder / "dashboard.cmo.json").public
        forge_keys = pair_keys(mallory_id, victim_public)
        seconds, _ = await raw.time()
        pending = list(victim.broker._waiting)
        for correlation in pending:
            forged = AgentResponse.ok({"pipeline": "$0"}, correlation_id=correlation, responder_id="agent.cso.jane")
            body = forged.model_dump_json(exclude_none=True).encode()
            token = make_token(REPLY, int(seconds) * 1000, body, keys=forge_keys, signer=None)
            await raw.xadd(victim_stream, {"r": body, "a": token})
        jane.gate.set()
        replies = await asyncio.gather(*slow)
        refused_replies = victim.broker.stats.replies_refused
        letters = await dead_reasons(raw, "agent.cso.jane", 40)
    stolen = sum(1 for r in replies if r.data == {"pipeline": "$0"})
    genuine = sum(1 for r in replies if r.data and r.data.get("pipeline") == "$2.4M")
    theft_refused = sum("reply_to is not the sender's" in r for r in letters)
    report(f"reply theft: {theft_refused}/40 requests naming the victim's reply stream refused; forged replies: "
           f"{refused_replies} dropped, {stolen} delivered to the wrong caller; {genuine}/40 genuine")  # fmt: skip
    assert theft_refused == 40 and stolen == 0 and genuine == len(pending) == 40 and refused_replies >= 40


async def test_impostors_role_changes_and_removals_by_non_owners_are_refused(
    redis_url: str, folder: Path, jane: Jane, raw: Redis
) -> None:
    settings = secure_settings(redis_url, folder, only="mallory")
    refused: dict[str, int] = {}
    async with MessageSender(sender_id="mallory", settings=settings) as mallory:
        registry = mallory.registry
        attempts: list[tuple[str, Any]] = [
            ("impostor of jane", lambda: registry.register_agent(
                {"agent_id": "agent.cso.jane", "user_name": "m", "role": "cso", "department": "sales"})),
            ("mallory as a cso", lambda: registry.register_agent(
                {"agent_id": "mallory", "user_name": "m", "role": "cso", "department": "sales"})),
            ("jane's role changed", lambda: registry.register_agent(
                {"agent_id": "agent.cso.jane", "user_name": "j", "role": "intern", "department": "x"}, replace=True)),
            ("jane deregistered", lambda: registry.deregister_agent("agent.cso.jane")),
            ("jane's presence taken", lambda: registry.leave("agent.cso.jane")),
        ]  # fmt: skip
        for name, attempt in attempts:
            try:
                await attempt()
            except PermissionDeniedError:
                refused[name] = 1
        # straight into Redis: an impostor record for role cso, and jane's record changed by hand
        impostor = {"agent_id": "agent.cso.fake", "user_name": "m", "role": "cso", "department": "sales"}
        await raw.hset(keys.REGISTRY_AGENTS, "agent.cso.fake", json.dumps(impostor))
        await raw.sadd(keys.registry_index("role", "cso"), "agent.cso.fake")
        await raw.zadd(keys.REGISTRY_DEADLINES, {"agent.cso.fake": 2**50})
        answered_by = [
            (await mallory.request_role("cso", "request_knowledge", {"q": n})).responder_id for n in range(40)
        ]
        found = [a.agent_id for a in await registry.discover_agents(role="cso")]
    report(f"registry: {sum(refused.values())}/{len(attempts)} impostor, role-change and removal attempts refused "
           f"by the API; raw impostor record ignored: request_role('cso') answered by "
           f"{set(answered_by)} in {len(answered_by)}/40")  # fmt: skip
    assert refused == {name: 1 for name, _ in attempts}
    assert found == ["agent.cso.jane"] and set(answered_by) == {"agent.cso.jane"}


async def test_answering_in_an_agents_name_from_its_inbox_fails(redis_url: str, folder: Path, raw: Redis) -> None:
    # jane is registered but offline; mallory reads her inbox through the shared group and answers in her name
    settings = secure_settings(redis_url, folder)
    async with Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=settings):
        pass  # registered, then stopped
    inbox = keys.inbox("agent.cso.jane")
    mallory = Identity.load(folder / "mallory.json")
    async with MessageSender(sender_id="dashboard.cmo", settings=settings) as caller:
        asking = [
            asyncio.ensure_future(caller.request("agent.cso.jane", "request_knowledge", {"n": n}, timeout=3))
            for n in range(40)
        ]
        taken = 0
        async with asyncio.timeout(20):
            while taken < 40:
                for _, batch in read_reply(await raw.xreadgroup(keys.GROUP, "mallory", {inbox: ">"}, block=1000)):
                    for _, fields in batch:
                        taken += 1
                        request = json.loads(fields[b"m"])
                        forged = AgentResponse.ok(
                            {"pipeline": "$0"}, correlation_id=request["correlation_id"], responder_id="agent.cso.jane"
                        )
                        body = forged.model_dump_json(exclude_none=True).encode()
                        peer = Identity.load(folder / "dashboard.cmo.json").public
                        token = make_token(REPLY, 0, body, keys=pair_keys(mallory, peer), signer=None)
                        await raw.xadd(request["reply_to"], {"r": body, "a": token})
        outcomes = await asyncio.gather(*asking, return_exceptions=True)
        dropped = caller.broker.stats.replies_refused
    accepted = sum(isinstance(o, AgentResponse) for o in outcomes)
    report(f"inbox taken over: {taken}/40 requests read by another identity; {dropped} answers in the agent's "
           f"name dropped, {accepted} accepted")  # fmt: skip
    assert taken == 40 and accepted == 0 and dropped == 40
    assert all(isinstance(o, RequestTimeoutError) for o in outcomes)
