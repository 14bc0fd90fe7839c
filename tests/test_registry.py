"""AgentRegistry on a real redis-server: filters, online/offline, clock skew, re-registration, bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentInfo,
    AgentNotFoundError,
    AgentRegistry,
    AgentStatus,
    MessageBroker,
    MessageIntent,
    RegistrationConflictError,
    RegistrationError,
    keys,
)
from conftest import AgentProcess
from test_broker import message

TEAM = [
    ("agent.cmo.john", "cmo", "marketing", ["campaign_management", "brand_strategy"], ["get_roadmap"]),
    ("agent.mm.ana", "marketing_manager", "marketing", ["content_creation", "campaign_management"], ["assign_task"]),
    ("agent.content.sarah", "content_agent", "marketing", ["content_creation", "seo_optimization"], ["assign_task"]),
    ("agent.seo.alex", "seo_agent", "marketing", ["seo_optimization"], ["request_knowledge"]),
    ("agent.cso.jane", "cso", "sales", ["sales_forecasting", "pipeline_management"], ["request_knowledge"]),
    ("agent.cto.raj", "cto", "engineering", ["architecture"], ["get_roadmap", "assign_task"]),
]


def info(agent_id: str, role: str, department: str, capabilities: list[str], intents: list[str]) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "user_name": agent_id.rsplit(".", 1)[-1],
        "role": role,
        "department": department,
        "capabilities": capabilities,
        "supported_intents": intents,
    }


@pytest.fixture
async def registry(broker: MessageBroker) -> AsyncIterator[AgentRegistry]:
    async with AgentRegistry(broker) as instance:
        yield instance


@pytest.fixture
async def team(registry: AgentRegistry) -> list[str]:
    for member in TEAM:
        await registry.register_agent(info(*member), heartbeat_interval=60)
    await registry.leave("agent.cto.raj")  # registered, but offline
    return [m[0] for m in TEAM]


async def ids(found: Awaitable[list[AgentInfo]]) -> list[str]:
    return [a.agent_id for a in await found]


async def server_ms(raw: Redis) -> int:
    seconds, micros = await raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def until_server_time(raw: Redis, deadline_ms: int) -> None:
    """Wait for the Redis server's clock to pass ``deadline_ms`` (the event itself is the time)."""
    while (now := await server_ms(raw)) <= deadline_ms:
        await asyncio.sleep((deadline_ms - now + 1) / 1000)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def test_register_and_get(registry: AgentRegistry, raw: Redis) -> None:
    stored = await registry.register_agent(info(*TEAM[4]), heartbeat_interval=10)
    assert stored == await registry.get_agent("agent.cso.jane")
    assert stored.role == "cso" and stored.capabilities == ["sales_forecasting", "pipeline_management"]
    assert stored.supported_intents == [MessageIntent.REQUEST_KNOWLEDGE]
    assert stored.status is AgentStatus.ONLINE and stored.instance_count == 1
    now = datetime.fromtimestamp(await server_ms(raw) / 1000, UTC)
    assert stored.last_seen is not None and stored.started_at == stored.last_seen
    assert timedelta(0) <= now - stored.last_seen


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"role": "cso"}, ["agent.cso.jane"]),
        ({"role": "CSO"}, ["agent.cso.jane"]),
        ({"department": "marketing"}, ["agent.cmo.john", "agent.content.sarah", "agent.mm.ana", "agent.seo.alex"]),
        ({"capability": "content_creation"}, ["agent.content.sarah", "agent.mm.ana"]),
        ({"capability": ["content_creation", "seo_optimization"]}, ["agent.content.sarah"]),
        ({"intent": MessageIntent.ASSIGN_TASK}, ["agent.content.sarah", "agent.cto.raj", "agent.mm.ana"]),
        ({"intent": "get_roadmap", "online_only": True}, ["agent.cmo.john"]),
        ({"department": "marketing", "capability": "seo_optimization"}, ["agent.content.sarah", "agent.seo.alex"]),
        (
            {"department": "marketing", "capability": "content_creation", "online_only": True},
            ["agent.content.sarah", "agent.mm.ana"],
        ),
        ({"department": "engineering", "online_only": True}, []),
        ({"department": "engineering"}, ["agent.cto.raj"]),
        ({"role": "cso", "department": "marketing"}, []),
        ({"role": "nobody"}, []),
    ],
)
async def test_discovery_filters(
    registry: AgentRegistry, team: list[str], filters: dict[str, Any], expected: list[str]
) -> None:
    assert await ids(registry.discover_agents(**filters)) == expected


async def test_online_only_without_filters(registry: AgentRegistry, team: list[str]) -> None:
    assert await ids(registry.get_online_agents()) == sorted(set(team) - {"agent.cto.raj"})
    assert await ids(registry.discover_agents(online_only=True)) == sorted(set(team) - {"agent.cto.raj"})
    assert await ids(registry.discover_agents()) == sorted(team)
    offline = await registry.get_agent("agent.cto.raj")
    assert offline.status is AgentStatus.OFFLINE and offline.instance_count == 0


async def test_instances_count_as_one_agent_online_while_any_beats(registry: AgentRegistry) -> None:
    first = await registry.keep_alive(info(*TEAM[4]), heartbeat_interval=60)
    second = await registry.keep_alive(info(*TEAM[4]), heartbeat_interval=60)
    agent = await registry.get_agent("agent.cso.jane")
    assert agent.instance_count == 2 and agent.status is AgentStatus.ONLINE
    await first.stop()
    agent = await registry.get_agent("agent.cso.jane")
    assert agent.status is AgentStatus.ONLINE and agent.instance_count == 1
    await second.stop()  # the last one leaves: offline at once, no waiting for missed beats
    assert (await registry.get_agent("agent.cso.jane")).status is AgentStatus.OFFLINE
    assert await registry.discover_agents(role="cso", online_only=True) == []


async def test_busy_status(registry: AgentRegistry, team: list[str]) -> None:
    await registry.update_status("agent.cso.jane", "busy")
    assert (await registry.get_agent("agent.cso.jane")).status is AgentStatus.BUSY
    with pytest.raises(RegistrationError, match="offline is set by"):
        await registry.update_status("agent.cso.jane", AgentStatus.OFFLINE)
    with pytest.raises(RegistrationError, match="unknown status"):
        await registry.update_status("agent.cso.jane", "asleep")
    with pytest.raises(AgentNotFoundError):
        await registry.update_status("agent.nobody", "busy")


async def test_killed_agent_turns_offline_after_three_intervals(registry: AgentRegistry, raw: Redis) -> None:
    interval = 0.2
    agent = await AgentProcess.start(
        registry.broker.url, "agent.proc.kill", "--register", "cso:sales", "--heartbeat", str(interval)
    )
    try:
        first_seen = await raw.hget(keys.REGISTRY_SEEN, "agent.proc.kill")

        async def beat_again() -> bool:
            return await raw.hget(keys.REGISTRY_SEEN, "agent.proc.kill") != first_seen

        await eventually(beat_again)  # it keeps beating while alive
    finally:
        await agent.kill()
    last_seen = int(await raw.hget(keys.REGISTRY_SEEN, "agent.proc.kill") or 0)
    deadline = await raw.zscore(keys.REGISTRY_DEADLINES, "agent.proc.kill")
    assert deadline == last_seen + 3 * interval * 1000
    if await server_ms(raw) < deadline:  # still inside the three intervals: still online
        assert await ids(registry.discover_agents(role="cso", online_only=True)) == ["agent.proc.kill"]
    await until_server_time(raw, int(deadline))
    assert await registry.discover_agents(role="cso", online_only=True) == []
    assert (await registry.get_agent("agent.proc.kill")).status is AgentStatus.OFFLINE


@pytest.mark.parametrize("skew", [60.0, -60.0])
async def test_client_clock_skew_does_not_flip_status(registry: AgentRegistry, raw: Redis, skew: float) -> None:
    interval = 0.2
    agent_id = f"agent.skew.{'ahead' if skew > 0 else 'behind'}"
    agent = await AgentProcess.start(
        registry.broker.url, agent_id, "--register", "cto:eng", "--heartbeat", str(interval), "--clock-skew", str(skew)
    )
    try:
        started = await server_ms(raw)
        await until_server_time(raw, started + int(4 * interval * 1000))  # past three intervals
        record = await registry.get_agent(agent_id)
        assert record.status is AgentStatus.ONLINE  # a skewed clock does not make it look stale
        now = datetime.fromtimestamp(await server_ms(raw) / 1000, UTC)
        assert record.last_seen is not None and started / 1000 <= record.last_seen.timestamp() <= now.timestamp()
        # nor are requests to it judged expired by its clock
        assert (await registry.broker.request(message(agent_id, ping=True), timeout=10)).success
    finally:
        assert await agent.terminate() == 0
    assert (await registry.get_agent(agent_id)).status is AgentStatus.OFFLINE  # a clean stop: offline at once


async def test_re_registration_rules(registry: AgentRegistry) -> None:
    await registry.register_agent(info(*TEAM[2]))
    updated = info(*TEAM[2])
    updated["capabilities"] = ["video_editing"]
    await registry.register_agent(updated)  # same role: an update, old index entries removed
    assert await ids(registry.discover_agents(capability="video_editing")) == ["agent.content.sarah"]
    assert await registry.discover_agents(capability="content_creation") == []
    other_role = info(*TEAM[2])
    other_role["role"] = "cfo"
    with pytest.raises(RegistrationConflictError) as caught:
        await registry.register_agent(other_role)
    assert caught.value.existing_role == "content_agent" and caught.value.role == "cfo"
    assert "replace=True" in str(caught.value)
    assert (await registry.get_agent("agent.content.sarah")).role == "content_agent"
    await registry.register_agent(other_role, replace=True)
    assert await ids(registry.discover_agents(role="cfo")) == ["agent.content.sarah"]
    assert await registry.discover_agents(role="content_agent") == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"agent_id": "agent.x", "role": "cmo", "department": "m"}, "user_name: Field required"),
        ({"agent_id": "agent x", "user_name": "x", "role": "cmo", "department": "m"}, "agent_id: String should match"),
        ({"agent_id": "a", "user_name": "x", "role": "", "department": "m"}, "role: String should have at least 1"),
        (
            {"agent_id": "a", "user_name": "x", "role": "r", "department": "m", "capabilities": ["c"] * 65},
            "capabilities: List should have at most 64",
        ),
        ({"agent_id": "a", "user_name": "x", "role": "r", "department": "m", "rank": 1}, "rank: Extra inputs"),
    ],
)
async def test_bad_registration_is_a_clear_error(registry: AgentRegistry, bad: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistrationError, match="cannot register") as caught:
        await registry.register_agent(bad)
    assert message in str(caught.value)
    assert await registry.discover_agents() == []


async def test_unknown_agent(registry: AgentRegistry) -> None:
    with pytest.raises(AgentNotFoundError, match="agent.ghost"):
        await registry.get_agent("agent.ghost")
    assert await registry.deregister_agent("agent.ghost") is False
    assert await registry.heartbeat("agent.ghost") is False


async def test_deregister_removes_every_trace(registry: AgentRegistry, team: list[str], raw: Redis) -> None:
    assert await registry.deregister_agent("agent.seo.alex") is True
    with pytest.raises(AgentNotFoundError):
        await registry.get_agent("agent.seo.alex")
    assert "agent.seo.alex" not in await ids(registry.discover_agents(capability="seo_optimization"))
    for key in await raw.keys(f"{keys.REGISTRY}:*"):
        kind = await raw.type(key)
        if kind == b"set":
            members: Any = await raw.smembers(key)
        elif kind == b"hash":
            members = await raw.hkeys(key)
        else:
            members = await raw.zrange(key, 0, -1)
        assert b"agent.seo.alex" not in members, key


async def test_presence_registers_again_after_being_wiped(registry: AgentRegistry) -> None:
    presence = await registry.keep_alive(info(*TEAM[0]), heartbeat_interval=0.05)
    await registry.deregister_agent("agent.cmo.john")
    beats = presence.beats

    async def back() -> bool:
        return presence.beats > beats and bool(await registry.discover_agents(role="cmo", online_only=True))

    await eventually(back)
    await presence.stop()


async def test_registry_stats(registry: AgentRegistry, team: list[str]) -> None:
    stats = await registry.get_registry_stats()
    assert (stats.total_agents, stats.online_agents, stats.offline_agents) == (6, 5, 1)
    assert stats.by_department["marketing"] == {"total": 4, "online": 4}
    assert stats.by_department["engineering"] == {"total": 1, "online": 0}
    assert stats.by_role["cso"] == {"total": 1, "online": 1}
    assert stats.as_dict()["offline_agents"] == 1


async def test_metadata_is_kept(registry: AgentRegistry) -> None:
    record = {**info(*TEAM[0]), "metadata": {"team": "growth", "tz": "Europe/Berlin"}}
    stored = await registry.register_agent(record)
    assert stored.metadata == {"team": "growth", "tz": "Europe/Berlin"}
    assert (await registry.discover_agents(role=record["role"]))[0].metadata == stored.metadata


@pytest.mark.parametrize(("first", "again"), [("Директор", "директор"), ("CAFÉ", "café"), ("Straße", "STRASSE")])
async def test_roles_with_non_ascii_capitals_register_again(registry: AgentRegistry, first: str, again: str) -> None:
    base = {"agent_id": "agent.intl", "user_name": "x", "department": "ops"}
    await registry.register_agent({**base, "role": first})
    stored = await registry.register_agent({**base, "role": again})  # the same role, case-folded in Python
    assert stored.role == again
    assert await ids(registry.discover_agents(role=first.upper())) == ["agent.intl"]
    with pytest.raises(RegistrationConflictError):
        await registry.register_agent({**base, "role": "cfo"})


async def test_a_malformed_record_is_skipped_counted_and_logged(
    registry: AgentRegistry, team: list[str], raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await raw.hset(keys.REGISTRY_AGENTS, "agent.bad", "not json")
    await raw.hset(keys.REGISTRY_AGENTS, "agent.odd", json.dumps({"agent_id": "agent.odd", "role": 7}))
    await raw.sadd(keys.registry_index("role", "cso"), "agent.bad", "agent.odd")
    await raw.zadd(keys.REGISTRY_DEADLINES, {"agent.bad": 2**50, "agent.odd": 2**50})
    everyone = await ids(registry.discover_agents())
    assert "agent.bad" not in everyone and "agent.odd" not in everyone and len(everyone) == len(team)
    assert (await registry.pick_agent("cso")).agent_id == "agent.cso.jane"  # role addressing still works
    stats = await registry.get_registry_stats()
    assert stats.total_agents == len(team) and stats.malformed_records == 2
    assert registry.malformed_records >= 2
    assert "agent.bad" in caplog.text and "agent.odd" in caplog.text


async def test_the_heartbeat_survives_errors_that_are_not_transient(registry: AgentRegistry, raw: Redis) -> None:
    presence = await registry.keep_alive(info(*TEAM[0]), heartbeat_interval=0.05)
    try:
        await raw.delete(keys.REGISTRY_AGENTS)
        await raw.set(keys.REGISTRY_AGENTS, "clobbered")  # every registry script now fails with WRONGTYPE
        beats = presence.beats
        await until_server_time(raw, await server_ms(raw) + 200)  # several intervals of failing beats
        assert presence.beats == beats and presence.running
        await raw.delete(keys.REGISTRY_AGENTS)
        await eventually(lambda: registry.is_registered(presence.agent_id))  # it registered again
        assert presence.running
    finally:
        await presence.stop()
