"""Security on a real redis-server: identities, authenticated messages and replies, replays, sealing, policy."""

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
    AgentRegistry,
    BaseAgent,
    Identity,
    IdentityError,
    MessageBroker,
    MessageSender,
    Settings,
    TrustStore,
    create_agent_config,
    keys,
)
from agentcomms.security import b64encode, create_admin, enrol_team
from conftest import server_time_passes, wait_for_dead_letters

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


async def test_an_admin_may_register_any_agent_and_readers_believe_it(secure: Settings, tmp_path: Path) -> None:

    admin_only = secure.model_copy(
        update={"identity_dir": tmp_path / "none", "identity_file": secure.identities_folder / "admin.ops.json"}
    )
    async with AgentRegistry(settings=admin_only) as registry:
        stored = await registry.register_agent(
            {"agent_id": "agent.cmo.john", "user_name": "john", "role": "chief_marketing", "department": "marketing"},
            replace=True,
        )
        assert stored.role == "chief_marketing" and (stored.signature or "").startswith("admin:")
    async with AgentRegistry(settings=secure) as reader:
        [found] = await reader.discover_agents(role="chief_marketing")
        assert found.agent_id == "agent.cmo.john"


async def test_the_policy_answers_forbidden_by_the_senders_verified_role(
    secure: Settings, tmp_path: Path, raw: Redis
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {"default": "allow", "rules": [{"intents": ["assign_task"], "to_roles": ["cso"], "from_roles": ["cmo"]}]}
        )
    )

    class Tasks(BaseAgent):
        async def handle_assign_task(self, message: AgentMessage) -> str:
            return "accepted"

    settings = secure.model_copy(update={"policy_file": policy})
    async with Tasks(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=settings):
        async with MessageSender(sender_id="mallory", settings=secure) as intern:
            refused = await intern.assign_task("agent.cso.jane", "T1", "do my work", wait_for_response=True)
            one_way = await intern.assign_task("agent.cso.jane", "T2", "and this")
        async with MessageSender(sender_id="dashboard.cmo", settings=secure) as cmo:
            allowed = await cmo.assign_task("agent.cso.jane", "T3", "plan Q4", wait_for_response=True)
        letters = await wait_for_dead_letters(raw, "agent.cso.jane", 1)
    assert refused.error is not None and refused.error.code == "forbidden" and "intern" in refused.error.message
    assert allowed.success and allowed.data == "accepted"
    assert not one_way.duplicate and letters[0][b"reason"].startswith(b"forbidden: mallory")


async def test_signature_mode_and_sealed_intents(secure: Settings, raw: Redis) -> None:
    settings = secure.model_copy(update={"auth": "signature", "sealed_intents": ["request_knowledge"]})
    async with Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=settings):
        async with MessageSender(sender_id="dashboard.cmo", settings=settings) as sender:
            reply = await sender.request("agent.cso.jane", "request_knowledge", {"query": "sealed by intent"})
            security = sender.broker.security
    assert reply.data["answer"] == "sealed by intent"
    assert (
        security is not None
        and security.signature_mode
        and security.wants_seal(sender.build_message("agent.cso.jane", "request_knowledge"), None)
    )


async def test_a_dead_letter_redriven_by_an_admin_after_the_window_is_handled(
    secure: Settings, raw: Redis, tmp_path: Path
) -> None:
    settings = secure.model_copy(update={"replay_window": 1, "max_deliveries": 1})
    attempts: list[int] = []
    second = asyncio.Event()

    class Flaky(BaseAgent):
        async def handle_share_insights(self, message: AgentMessage) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("first time fails")
            second.set()

    config = create_agent_config("agent.cso.jane", "jane", "cso", "sales")
    async with Flaky(config, settings=settings) as agent:
        async with MessageSender(sender_id="dashboard.cmo", settings=settings) as sender:
            await sender.send_message("agent.cso.jane", "share_insights", {"x": 1})
        [letter] = await wait_for_dead_letters(raw, "agent.cso.jane", 1)
        await server_time_passes(raw, 1.5)  # past the replay window: its own token is stale now
        [dead] = await agent.broker.dead_letters("agent.cso.jane")
        admin = settings.model_copy(
            update={"identity_dir": tmp_path / "none", "identity_file": settings.identities_folder / "admin.ops.json"}
        )
        async with MessageBroker(settings=admin) as operator:
            await operator.redrive_dead_letter("agent.cso.jane", dead.entry_id)
        async with asyncio.timeout(10):
            await second.wait()
    assert b"handler failed" in letter[b"reason"] and len(attempts) == 2


async def test_peers_are_read_again_after_the_refresh_time_revoked_and_rekeyed_ones_too(
    secure: Settings, raw: Redis, tmp_path: Path
) -> None:
    # AGENTCOMMS_TRUST_REFRESH=0: every record is stale at once, as after 30 s in production
    fresh = secure.model_copy(update={"trust_refresh": 0.0})
    folder = secure.identities_folder
    admin = Identity.load(folder / "admin.ops.json")
    async with (
        Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=fresh),
        MessageBroker(settings=fresh) as ops,
    ):
        store = TrustStore(ops.pipeliner, [admin.public.ed25519])
        async with MessageSender(sender_id="dashboard.cmo", settings=fresh) as sender:
            # the reply comes after the caller's record of jane went stale: still accepted
            replies = [await sender.request("agent.cso.jane", "request_knowledge", {"query": i}) for i in range(5)]
            assert [r.data["answer"] for r in replies if r.data] == [0, 1, 2, 3, 4]
            assert sender.broker.stats.replies_refused == 0

            # new keys for dashboard.cmo, enrolled by the admin: jane reads them and answers
            rekeyed = Identity.generate("dashboard.cmo")
            rekeyed.save(tmp_path / "rekeyed" / "dashboard.cmo.json")
            await store.enroll(admin, rekeyed.public, roles=["cmo"])
        moved = fresh.model_copy(update={"identity_dir": tmp_path / "rekeyed"})
        async with MessageSender(sender_id="dashboard.cmo", settings=moved) as sender:
            reply = await sender.request("agent.cso.jane", "request_knowledge", {"query": "new keys"})
            assert reply.data == {"answer": "new keys", "from_roles": ["cmo"]}

            # revoked: its next message is refused unhandled
            assert await store.revoke(admin, "dashboard.cmo")
            await sender.broker.publish_message(
                AgentMessage(sender_id="dashboard.cmo", recipient_id="agent.cso.jane", intent="request_knowledge")
            )
            letters = await wait_for_dead_letters(raw, "agent.cso.jane", 1)
            assert letters[0][b"reason"] == b"unauthenticated: identity 'dashboard.cmo' is not in the trust store"


async def test_a_revoked_agent_is_no_longer_discovered(secure: Settings) -> None:
    fresh = secure.model_copy(update={"trust_refresh": 0.0})  # as after AGENTCOMMS_TRUST_REFRESH (30 s)
    admin = Identity.load(secure.identities_folder / "admin.ops.json")
    async with (
        Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=fresh),
        AgentRegistry(settings=fresh) as reader,
    ):
        assert [a.agent_id for a in await reader.discover_agents(role="cso")] == ["agent.cso.jane"]
        store = TrustStore(reader.broker.pipeliner, [admin.public.ed25519])
        assert await store.revoke(admin, "agent.cso.jane")
        assert await reader.discover_agents(role="cso") == []


async def test_a_redis_off_this_machine_without_security_warns_once(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agentcomms.broker as broker_module
    from agentcomms.transport import ConnectionSpec

    monkeypatch.setattr(broker_module, "_warned_insecure", False)
    plain = Settings(redis_url=redis_url)
    async with MessageBroker(settings=plain) as first, MessageBroker(settings=plain) as second:
        # the address decides (nothing is sent to it): a loopback one or a socket is this machine
        for url in ("redis://127.0.0.1:1", "redis://[::1]:1", "redis://localhost:1", "unix:///tmp/r.sock"):
            assert await first._secure(ConnectionSpec.from_url(url), first.pipeliner) is None
        assert "SECURITY" not in caplog.text
        for broker in (first, second):
            await broker._secure(ConnectionSpec.from_url("redis://:hunter2@redis.example.com:6379/0"), broker.pipeliner)
    warnings = [r for r in caplog.records if r.getMessage().startswith("SECURITY:")]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert "redis.example.com:6379" in warnings[0].getMessage() and "hunter2" not in caplog.text
    assert "AGENTCOMMS_SECURITY" in warnings[0].getMessage()


async def test_the_replay_memory_forgets_what_the_window_refuses_anyway(secure: Settings) -> None:
    async with MessageBroker(settings=secure) as broker:
        security = broker.security
        assert security is not None
        t0 = 1_795_660_000_000
        assert security._remember("m-1", t0, "1795660000000-0")
        assert security._remember("m-1", t0, "1795660000000-0")  # the same entry again: a redelivery
        assert not security._remember("m-1", t0, "1795660000500-0")  # another entry: a replay
        assert security._remember("m-1", t0 + 1, "1795660000500-1")  # another send of it (a new token)
        for n in range(1000):
            assert security._remember(f"m-{n + 2}", t0 + n, f"{t0 + n}-0")
        assert security._seen_count == 1002
        # a message stamped over twice the window (120 s) and a bucket (10 s) later: all before is forgotten
        assert security._remember("m-late", t0 + 260_000, f"{t0 + 260_000}-0")
        assert security._seen_count == 1
