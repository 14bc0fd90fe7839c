"""The dashboard's Prometheus metrics, from the real feed and a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

from prometheus_client import generate_latest
from redis.asyncio import Redis

from agentcomms import AgentRegistry, BaseAgent, MessageBroker, MessageSender, Settings, create_agent_config, keys
from agentcomms.schemas import AgentInfo, AgentMessage
from agentcomms.web.metrics import NetworkMetrics
from conftest import wait_for_dead_letters


class Counter(BaseAgent):
    async def handle_inform(self, message: AgentMessage) -> None:
        return None


def sample(metrics: NetworkMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value


async def test_feed_events_are_counted_and_timed(settings: Settings) -> None:
    metrics = NetworkMetrics()
    async with (
        Counter(create_agent_config("agent.count", "c", "counter", "ops"), settings=settings),
        MessageBroker(settings=settings, client_name="metrics") as broker,
        MessageSender(sender_id="tool.x", settings=settings) as sender,
    ):
        feed = cast(AsyncGenerator[dict[str, Any], None], broker.events())  # an async generator: closable
        assert (await anext(feed))["event"] == "subscribed"
        for n in range(5):
            await sender.send_message("agent.count", "inform", {"n": n})
        handled = 0
        async with asyncio.timeout(20):
            while handled < 5:  # the feed itself says when: no sleeps
                event = await anext(feed)
                metrics.observe(event)
                handled += event.get("event") == "handled"
        await feed.aclose()
    labels = {"agent": "agent.count", "intent": "inform"}
    assert sample(metrics, "agentcomms_messages_total", {"event": "sent", **labels}) == 5
    assert sample(metrics, "agentcomms_messages_total", {"event": "handled", **labels}) == 5
    assert sample(metrics, "agentcomms_sent_to_handled_seconds_count", labels) == 5
    text = generate_latest(metrics.registry).decode()
    assert 'agentcomms_messages_total{agent="agent.count",event="handled",intent="inform"} 5.0' in text


async def test_gauges_are_read_from_redis_at_each_refresh(settings: Settings, raw: Redis) -> None:
    metrics = NetworkMetrics()
    async with MessageBroker(settings=settings, client_name="metrics") as broker:
        registry = AgentRegistry(broker)
        info = AgentInfo(agent_id="agent.idle", user_name="i", role="idle", department="ops")
        await registry.register_agent(info)  # registered, never consuming: its inbox fills
        sender = MessageSender(sender_id="tool.x", broker=broker, registry=registry)
        for n in range(3):
            await sender.send_message("agent.idle", "inform", {"n": n})
        async with Counter(create_agent_config("agent.broken", "b", "counter", "ops"), settings=settings):
            await raw.xadd(keys.inbox("agent.broken"), {"m": b"not json"})  # dead-lettered as malformed
            await wait_for_dead_letters(raw, "agent.broken", 1)
            await metrics.refresh(broker, registry)
    assert sample(metrics, "agentcomms_inbox_depth", {"agent": "agent.idle"}) == 3
    assert sample(metrics, "agentcomms_dead_letters", {"agent": "agent.broken"}) == 1
    assert sample(metrics, "agentcomms_agents_registered") == 2
    online: Any = sample(metrics, "agentcomms_agents_online")
    assert online is not None and online >= 1
