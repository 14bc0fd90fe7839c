"""On a real Redis Cluster (3 primaries, 3 replicas): inboxes spread over the shards, the feed sees every shard.

Run in the suite's cluster pass (``AGENTCOMMS_TEST_CLUSTER=1``, scripts/test.sh), where the
broker, registry, agent, role, record and sender tests run on the cluster too.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from agentcomms import AgentMessage, BaseAgent, MessageSender, Settings, keys
from agentcomms.examples import create_agent_config
from agentcomms.transport import ClusterPipeliner, key_slot
from conftest import CLUSTER, report

pytestmark = pytest.mark.skipif(not CLUSTER, reason="the cluster pass only (AGENTCOMMS_TEST_CLUSTER=1)")


class Echo(BaseAgent):
    async def handle_request_info(self, message: AgentMessage) -> dict[str, Any]:
        return {"by": self.agent_id}


def echo(settings: Settings, n: int) -> Echo:
    config = create_agent_config(f"agent.echo.{n}", f"e{n}", "Echo", "ops", ["echo"])
    return Echo(config, settings=settings)


async def test_inboxes_spread_over_every_primary_and_all_answer(settings: Settings) -> None:
    agents = [echo(settings, n) for n in range(30)]
    for agent in agents:
        await agent.initialize()
    try:
        async with MessageSender(settings=settings, sender_id="ops") as sender:
            pipeliner = sender.broker.pipeliner
            assert isinstance(pipeliner, ClusterPipeliner) and len(pipeliner.nodes) == 3
            replies = await asyncio.gather(
                *(sender.request(agent.agent_id, "request_info", {}) for agent in agents for _ in range(10))
            )
            shards = collections.Counter(
                pipeliner.spec_for_key(keys.inbox(agent.agent_id)).port for agent in agents
            )  # which primary holds each inbox
    finally:
        for agent in agents:
            await agent.shutdown()
    assert all(reply.success for reply in replies) and len(replies) == 300
    assert collections.Counter(reply.data["by"] for reply in replies) == {a.agent_id: 10 for a in agents}
    assert len(shards) == 3  # every primary holds inboxes
    assert len({key_slot(keys.inbox(agent.agent_id)) for agent in agents}) == 30
    report(f"cluster: 30 agents' inboxes over 3 primaries {sorted(shards.values())}; 300 requests, 300 answered")


async def test_the_feed_hears_every_primary(settings: Settings) -> None:
    agents = [echo(settings, n) for n in range(12)]
    for agent in agents:
        await agent.initialize()
    try:
        async with MessageSender(settings=settings, sender_id="ops") as sender:
            pipeliner = sender.broker.pipeliner
            assert isinstance(pipeliner, ClusterPipeliner)
            shards = {pipeliner.spec_for_key(keys.inbox(agent.agent_id)).port for agent in agents}
            assert len(shards) == 3
            feed = sender.broker.events()
            assert (await anext(feed))["event"] == "subscribed"
            for agent in agents:
                await sender.send_message(agent.agent_id, "share_insights", {"note": "hello"})
            sent: set[str] = set()
            async with asyncio.timeout(20):
                while len(sent) < len(agents):  # the SEND scripts on all three primaries published their events
                    event = await anext(feed)
                    if event.get("event") == "sent":
                        sent.add(event["recipient_id"])
            await feed.aclose()  # type: ignore[attr-defined]
    finally:
        for agent in agents:
            await agent.shutdown()
    assert sent == {agent.agent_id for agent in agents}
