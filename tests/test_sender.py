"""MessageSender on a real redis-server: the seed's helpers, broadcast, status and stats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentInfo,
    AgentMessage,
    AgentNotFoundError,
    AgentRegistry,
    BaseAgent,
    InboxFullError,
    MessageSender,
    MessageValidationError,
    PublishResult,
    RequestTimeoutError,
    Settings,
    keys,
)
from agentcomms.examples import TwinAgent, create_agent_config


class Listener(BaseAgent):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.insights: asyncio.Queue[AgentMessage] = asyncio.Queue()

    async def handle_share_insights(self, message: AgentMessage) -> None:
        self.insights.put_nowait(message)


@pytest.fixture
async def sender(settings: Settings) -> AsyncIterator[MessageSender]:
    async with MessageSender(sender_id="dashboard.test", settings=settings) as instance:
        yield instance


@pytest.fixture
async def sarah(settings: Settings) -> AsyncIterator[TwinAgent]:
    config = create_agent_config("agent.sarah", "sarah", "content_agent", "marketing", ["content_creation"])
    async with TwinAgent(config, settings=settings) as agent:
        yield agent


async def test_assign_task_and_request_knowledge(sender: MessageSender, sarah: TwinAgent) -> None:
    response = await sender.assign_task(
        agent_id="agent.sarah",
        task_id="TASK_001",
        task_description="Create Q4 marketing content",
        priority="high",
        wait_for_response=True,
    )
    assert not isinstance(response, PublishResult)
    assert response.success and response.data == {"task_id": "TASK_001", "status": "accepted", "owner": "agent.sarah"}
    knowledge = await sender.request_knowledge(
        agent_id="agent.sarah", query="Q4 drafts?", context={"industry": "startup"}, wait_for_response=True
    )
    assert not isinstance(knowledge, PublishResult) and knowledge.data["drafts"]
    sent = await sender.assign_task("agent.sarah", "TASK_002", description="later")
    assert isinstance(sent, PublishResult) and not sent.duplicate


async def test_send_without_waiting_and_with_timeout(sender: MessageSender, raw: Redis) -> None:
    offline = AgentInfo(agent_id="agent.offline", user_name="o", role="cfo", department="finance")
    await sender.registry.register_agent(offline)
    await sender.registry.leave("agent.offline")  # registered, not running
    result = await sender.send_message("agent.offline", "share_insights", {"insight": "x"})
    assert result.recipient_id == "agent.offline"
    assert await raw.xlen(keys.inbox("agent.offline")) == 1  # waits in the inbox for the agent
    assert await raw.ttl(keys.inbox("agent.offline")) == -1  # a registered agent's inbox never expires
    with pytest.raises(RequestTimeoutError):
        await sender.send_message("agent.offline", "share_insights", {}, wait_for_response=True, timeout=0.1)


async def test_an_id_the_registry_never_saw_fails_fast_and_leaves_no_keys(sender: MessageSender, raw: Redis) -> None:
    before = await raw.dbsize()
    with pytest.raises(AgentNotFoundError, match="agent.ghost"):
        await sender.request("agent.ghost", "request_knowledge", {"query": "anyone?"}, timeout=30)
    with pytest.raises(AgentNotFoundError, match="agent.ghost"):
        await sender.send_message("agent.ghost", "share_insights", {"insight": "x"})
    with pytest.raises(AgentNotFoundError):
        await sender.assign_task("agent.ghost", "T1", "nobody will do this")
    assert await raw.dbsize() == before  # no inbox, no dedup set, no reply stream
    assert sender.stats.failed_sends == 3


async def test_opting_in_to_an_unregistered_id_makes_an_inbox_that_expires(
    sender: MessageSender, raw: Redis, settings: Settings
) -> None:
    result = await sender.send_message("agent.later", "share_insights", {"insight": "x"}, allow_unregistered=True)
    assert not result.duplicate
    inbox = keys.inbox("agent.later")
    ttl = await raw.ttl(inbox)
    assert 0 < ttl <= settings.unregistered_inbox_ttl
    assert 0 < await raw.ttl(keys.dedup("agent.later"))
    # the agent registers and starts: it gets the message, and its inbox is kept from then on
    async with Listener(create_agent_config("agent.later", "l", "cfo", "finance"), settings=settings) as later:
        async with asyncio.timeout(10):
            insight = await later.insights.get()
        assert insight.payload.data == {"insight": "x"}
        assert await raw.ttl(inbox) == -1


async def test_invalid_input_is_a_validation_error(sender: MessageSender) -> None:
    with pytest.raises(MessageValidationError, match="priority"):
        await sender.send_message("agent.sarah", "assign_task", {}, priority="urgent")
    with pytest.raises(MessageValidationError, match="recipient_id"):
        await sender.send_message("agent sarah", "assign_task", {})
    with pytest.raises(MessageValidationError, match="needs department"):
        await sender.broadcast_message("agent_status", {"message": "hi"})


async def test_broadcast_reaches_offline_members_and_reports_each(redis_url: str, sender: MessageSender) -> None:
    registry = AgentRegistry(sender.broker)
    for agent_id, department in [("agent.m1", "marketing"), ("agent.m2", "marketing"), ("agent.s1", "sales")]:
        await registry.register_agent({"agent_id": agent_id, "user_name": "u", "role": "r", "department": department})
    await registry.leave("agent.m2")  # offline: still gets the broadcast in its inbox
    async with MessageSender(settings=Settings(redis_url=redis_url, max_inbox_length=1)) as small:
        await small.send_message("agent.m1", "agent_status", {"fill": True})  # m1's inbox is now full
        results = await small.broadcast_message(
            "agent_status", {"message": "Team meeting at 3 PM"}, department="marketing"
        )
    assert set(results) == {"agent.m1", "agent.m2"}
    assert isinstance(results["agent.m1"], InboxFullError)
    assert isinstance(results["agent.m2"], PublishResult)
    everyone = await sender.broadcast_message("agent_status", {"message": "all hands"}, everyone=True)
    assert set(everyone) == {"agent.m1", "agent.m2", "agent.s1"}
    online = await sender.broadcast_message("agent_status", {}, department="marketing", online_only=True)
    assert set(online) == {"agent.m1"}


async def test_agent_status_and_stats(sender: MessageSender, sarah: TwinAgent) -> None:
    status = await sender.get_agent_status("agent.sarah")
    assert status["online"] and status["health"]["status"] == "healthy" and status["latency_ms"] > 0
    with pytest.raises(AgentNotFoundError):
        await sender.get_agent_status("agent.nobody")
    await sender.request_knowledge("agent.sarah", "anything")
    stats = await sender.get_sender_stats()
    assert stats["requests"] == 2 and stats["replies"] == 2 and stats["timeouts"] == 0
    assert stats["average_reply_ms"] > 0 and stats["broker"]["replies_received"] == 2
