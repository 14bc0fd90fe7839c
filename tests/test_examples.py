"""The complete example agent (examples/marketing_agent.py) and the root demo.py, run for real."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentcomms import MessageIntent, MessageSender, Settings
from agentcomms.examples import AgentCommunicationMixin, MarketingAgent, TwinAgent, create_agent_config
from agentcomms.schemas import AgentMessage

ROOT = Path(__file__).parent.parent


@pytest.fixture
async def team(settings: Settings) -> AsyncIterator[MessageSender]:
    agents = [
        MarketingAgent(create_agent_config("agent.mm.ana", "ana", "marketing_manager", "marketing"), settings=settings),
        TwinAgent(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=settings),
        TwinAgent(create_agent_config("agent.sarah", "sarah", "content_agent", "marketing"), settings=settings),
    ]
    for agent in agents:
        await agent.initialize()
    async with MessageSender(sender_id="dashboard.test", settings=settings) as sender:
        yield sender
    for agent in agents:
        await agent.shutdown()


async def test_marketing_agent_plans_with_sales_data(team: MessageSender) -> None:
    reply = await team.request_knowledge("agent.mm.ana", "Plan the Q4 campaign")
    assert reply.success and reply.data["pipeline_used"]["total"] == "$2.4M"


async def test_marketing_agent_delegates_writing_and_validates_tasks(team: MessageSender) -> None:
    delegated = await team.assign_task("agent.mm.ana", "T1", "Write the Q4 buyer guide", wait_for_response=True)
    assert delegated.data == {"task_id": "T1", "status": "delegated", "to": "agent.sarah"}
    kept = await team.assign_task("agent.mm.ana", "T2", "Book the webinar room", wait_for_response=True)
    assert kept.data == {"task_id": "T2", "status": "accepted"}
    invalid = await team.send_message("agent.mm.ana", MessageIntent.ASSIGN_TASK, {}, wait_for_response=True)
    assert invalid["error"]["code"] == "invalid_task"
    review = await team.send_message(
        "agent.mm.ana",
        MessageIntent.REQUEST_REVIEW,
        {"draft": "A long enough draft for review"},
        wait_for_response=True,
    )
    assert review.data["verdict"] == "approved"
    status = await team.send_message("agent.mm.ana", MessageIntent.AGENT_STATUS, {}, wait_for_response=True)
    assert status.data["open_tasks"] == 2


async def test_marketing_agent_runs_as_a_module(redis_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentcomms.examples.marketing_agent",
        env={**os.environ, "REDIS_URL": redis_url}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(60):
        while b"marketing agent running" not in await process.stderr.readline():
            pass
    async with MessageSender(redis_url=redis_url) as sender:
        assert (await sender.get_agent_status("agent.mm.ana"))["online"]
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        assert not (await sender.get_agent_status("agent.mm.ana"))["online"]


async def test_root_demo_py_runs_the_demo() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "demo.py"), env={**env, "COLUMNS": "200"}, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        out, _ = await process.communicate()
    assert process.returncode == 0 and b"8 of 8 scenarios answered" in out


class ExistingAgent:
    """An agent class that was there before agentcomms, with an ``agent_id`` of its own."""

    def __init__(self) -> None:
        self.agent_id = "internal-7"
        self.campaigns = ["Q4"]


class CommsCMO(ExistingAgent, AgentCommunicationMixin):
    async def _handle_knowledge_request(self, message: AgentMessage) -> dict[str, Any]:
        return {"campaigns": self.campaigns}

    async def _handle_review_budget(self, message: AgentMessage) -> dict[str, Any]:
        return {"approved": message.payload.data.get("amount", 0) < 100}


async def test_the_mixin_advertises_only_what_the_class_handles(settings: Settings) -> None:
    cmo = CommsCMO()
    await cmo.initialize_communication(agent_id="agent.cmo.ext", role="cmo", department="marketing", settings=settings)
    try:
        assert cmo.agent_id == "internal-7" and cmo.comms_agent_id == "agent.cmo.ext"  # its own id is kept
        async with MessageSender(settings=settings) as sender:
            [record] = await sender.discover_agents(role="cmo")
            assert set(record.supported_intents) == {
                "request_knowledge", "review_budget", "health_check", "capability_query", "agent_status",
            }  # fmt: skip
            assert await sender.discover_agents(intent="assign_task") == []  # no stub that "succeeds"
            knowledge = await sender.request_knowledge("agent.cmo.ext", "campaigns?")
            assert knowledge.data == {"campaigns": ["Q4"]}
            task = await sender.assign_task("agent.cmo.ext", "T1", "anything", wait_for_response=True)
            assert task.error is not None and task.error.code == "unsupported_intent"
            budget = await sender.send_message("agent.cmo.ext", "review_budget", {"amount": 5}, wait_for_response=True)
            assert budget.data == {"approved": True}
            status = await sender.send_message("agent.cmo.ext", "agent_status", {}, wait_for_response=True)
            assert status.success and status.data["agent_id"] == "agent.cmo.ext"
    finally:
        await cmo.shutdown_communication()
