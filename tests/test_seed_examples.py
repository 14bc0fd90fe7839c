"""The usage examples of ../shared/SEED-README.md, run as written with ``agentcomms`` as the import name.

The agents an example talks to run in their own processes (``agentcomms run-agent``).
One deviation: where the seed hard-codes ``redis://localhost:6379``, the test passes the
test server's URL (through REDIS_URL, or as the argument).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agentcomms import AgentRegistry, BaseAgent, MessageIntent, MessageSender
from agentcomms.examples import (
    AgentCommunicationMixin,
    DashboardInterface,
    create_agent_config,
    create_startup_config,
    save_startup_config,
)


@asynccontextmanager
async def running(redis_url: str, config: Path, *agent_ids: str) -> AsyncIterator[None]:
    """Agents of ``config`` in their own process, until the block ends."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentcomms", "run-agent", "--config", str(config),
        "--class", "agentcomms.examples:TwinAgent",
        *[arg for agent_id in agent_ids for arg in ("--agent-id", agent_id)],
        env={**os.environ, "REDIS_URL": redis_url}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert (await process.stdout.readline()).startswith(b"READY")
        yield
    finally:
        process.terminate()
        await process.wait()


@pytest.fixture
def team_file(tmp_path: Path) -> Path:
    return save_startup_config(tmp_path / "startup_agents.json")


@pytest.fixture(autouse=True)
def environment(redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.chdir(tmp_path)


async def test_1_dashboard_interface(redis_url: str, team_file: Path) -> None:
    async with running(redis_url, team_file):
        # Initialize dashboard interface
        dashboard = DashboardInterface()
        await dashboard.initialize()

        # CMO requests sales data from CSO agent
        response = await dashboard.request_sales_data(
            requester_role="cmo",
            query="What's our current sales pipeline and Q4 forecast?",
            context={"priority": "high", "dashboard_request": True},
        )

        sales_data = None
        if response and response.get("success"):
            sales_data = response["data"]
            print(f"Sales data: {sales_data}")

        # Executive requests department status
        marketing_status = await dashboard.exec_request_department_status("marketing")
        print(f"Marketing department status: {marketing_status}")
        await dashboard.close()
    assert sales_data is not None and sales_data["pipeline"]["total"] == "$2.4M"
    assert marketing_status["online_agents"] == 4 and marketing_status["answered"] == 4


# Example 2, as written in the seed
class CMOAgent(AgentCommunicationMixin):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.campaigns: list[str] = []

    async def initialize(self) -> None:
        # Initialize your existing agent logic
        await self.setup_campaigns()

        # Add communication capabilities
        await self.initialize_communication(
            agent_id=f"agent.cmo.{self.name.lower()}",
            role="cmo",
            department="marketing",
            capabilities=["campaign_management", "brand_strategy"],
            user_name=self.name,
        )

    async def setup_campaigns(self) -> None:
        # Your existing agent logic
        self.campaigns = ["Q4 Holiday Campaign", "Brand Awareness Drive"]

    # Override handlers with real business logic
    async def _handle_knowledge_request(self, message: Any) -> dict[str, Any]:
        query = message.payload.data.get("query", "")

        if "campaign" in query.lower():
            return {
                "status": "success",
                "campaigns": self.campaigns,
                "performance": {"leads": 1250, "conversion_rate": 0.045},
            }

        return {"status": "success", "response": "General CMO information"}

    # Use communication in your existing methods
    async def collaborate_with_sales(self, question: str) -> str:
        response = await self.request_info_from_agent("cso", question)

        if response and response.get("success"):
            sales_data = response["data"]
            # Use sales data to adjust marketing strategy
            return f"Strategy adjusted based on: {sales_data}"

        return "Could not get sales data"


# Example 3, as written in the seed
class CSOAgent(AgentCommunicationMixin):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.pipeline_data: dict[str, Any] = {}

    async def initialize(self) -> None:
        await self.setup_sales_data()

        await self.initialize_communication(
            agent_id=f"agent.cso.{self.name.lower()}",
            role="cso",
            department="sales",
            capabilities=["sales_forecasting", "pipeline_management"],
            user_name=self.name,
        )

    async def setup_sales_data(self) -> None:
        self.pipeline_data = {"q4": "$3.1M"}

    async def request_marketing_support(self, campaign_type: str) -> str:
        response = await self.request_info_from_agent(
            "cmo", f"Can you create a {campaign_type} campaign for Q4 sales push?"
        )

        if response and response.get("success"):
            return f"Marketing support secured: {response['data']}"

        return "Could not get marketing support"


async def test_2_adding_communication_to_an_existing_agent(redis_url: str, team_file: Path) -> None:
    cmo_agent = CMOAgent("John Smith")
    await cmo_agent.initialize()
    assert cmo_agent.agent_id == "agent.cmo.john_smith"  # "agent.cmo.john smith", normalised
    assert await cmo_agent.collaborate_with_sales("What's the Q4 pipeline?") == "Could not get sales data"
    async with running(redis_url, team_file, "agent.cso.jane"):
        # Now your CMO agent can communicate with other agents
        sales_info = await cmo_agent.collaborate_with_sales("What's the Q4 pipeline?")
    await cmo_agent.shutdown_communication()
    assert sales_info.startswith("Strategy adjusted based on: {'role': 'cso'")


async def test_3_agent_to_agent_between_two_mixin_agents(redis_url: str, tmp_path: Path) -> None:
    # the CMO agent of example 2 in its own process, the CSO agent of example 3 here
    script = tmp_path / "cmo_process.py"
    script.write_text(
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_seed_examples import CMOAgent\n"
        "async def main():\n"
        "    agent = CMOAgent('John Smith')\n"
        "    await agent.initialize()\n"
        "    print('READY', flush=True)\n"
        "    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)\n"
        "    await agent.shutdown_communication()\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "REDIS_URL": redis_url},
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    async with asyncio.timeout(60):
        assert (await process.stdout.readline()).strip() == b"READY"
    cso = CSOAgent("Jane")
    await cso.initialize()
    support = await cso.request_marketing_support("holiday campaign")
    await cso.shutdown_communication()
    process.stdin.write(b"stop\n")
    await process.stdin.drain()
    assert await process.wait() == 0
    assert support.startswith("Marketing support secured: {'status': 'success', 'campaigns': ['Q4 Holiday Campaign'")


async def test_4_new_agent_from_scratch(redis_url: str) -> None:
    # Create configuration
    config = create_agent_config(
        agent_id="agent.sarah",
        user_name="sarah",
        role="content_agent",
        department="marketing",
        capabilities=["content_creation", "seo_optimization"],
    )

    # Create custom agent
    class MyAgent(BaseAgent):
        async def handle_get_roadmap(self, message: Any) -> None:
            # Implementation here
            pass

        async def handle_assign_task(self, message: Any) -> None:
            # Implementation here
            pass

        async def handle_request_knowledge(self, message: Any) -> None:
            # Implementation here
            pass

        async def get_supported_intents(self) -> list[MessageIntent | str]:
            return [MessageIntent.GET_ROADMAP, MessageIntent.ASSIGN_TASK]

        async def get_agent_capabilities(self) -> list[str]:
            return ["content_creation", "seo_optimization"]

    # Initialize and run
    agent = MyAgent(config)
    await agent.initialize()

    async with MessageSender(redis_url=redis_url) as sender:
        reply = await sender.assign_task(
            "agent.sarah", "TASK_001", "Create Q4 marketing content", wait_for_response=True
        )
        found = await sender.discover_agents(intent=MessageIntent.GET_ROADMAP)
    await agent.shutdown()
    assert not isinstance(reply, type(None)) and reply.get("success") is True and reply.get("data") is None
    [info] = found
    assert info.supported_intents == ["get_roadmap", "assign_task", "health_check", "capability_query", "agent_status"]


async def test_sending_broadcasting_and_discovery(redis_url: str, team_file: Path) -> None:
    async with running(redis_url, team_file):
        # Create message sender
        sender = MessageSender(redis_url=redis_url)
        await sender.initialize()

        # Assign a task
        response = await sender.assign_task(
            agent_id="agent.sarah",
            task_id="TASK_001",
            task_description="Create Q4 marketing content",
            priority="high",
            wait_for_response=True,
        )

        # Request knowledge
        knowledge = await sender.request_knowledge(
            agent_id="agent.alex",
            query="SEO best practices for startup content",
            context={"industry": "startup"},
            wait_for_response=True,
        )

        # Discover agents
        marketing_agents = await sender.discover_agents(department="marketing", capability="content_creation")

        # Broadcast to all agents in marketing department
        results = await sender.broadcast_message(
            intent=MessageIntent.AGENT_STATUS,
            data={"message": "Team meeting at 3 PM"},
            department="marketing",
            priority="normal",
        )

        # Role-based and complex discovery
        cmo_agents = await sender.discover_agents(role="cmo")
        all_marketing = await sender.discover_agents(department="marketing")
        content_agents = await sender.discover_agents(capability="content_creation")
        task_agents = await sender.discover_agents(intent=MessageIntent.ASSIGN_TASK)
        agents = await sender.discover_agents(department="marketing", capability="content_creation", online_only=True)
        await sender.close()
    assert response.get("success") and response["data"]["task_id"] == "TASK_001"
    assert knowledge.get("success") and knowledge["data"]["top_keywords"]
    assert [a.agent_id for a in marketing_agents] == ["agent.sarah"]
    assert sorted(results) == ["agent.alex", "agent.cmo.john", "agent.mm.ana", "agent.sarah"]
    assert [a.agent_id for a in cmo_agents] == ["agent.cmo.john"] and len(all_marketing) == 4
    assert [a.agent_id for a in content_agents] == ["agent.sarah"] == [a.agent_id for a in agents]
    assert len(task_agents) == 6


async def test_config_file_monitoring_and_startup_config(redis_url: str, tmp_path: Path) -> None:
    # the seed's configuration file, as written (REDIS_URL overrides its redis_url)
    config_file = tmp_path / "agents.json"
    config_file.write_text(
        json.dumps(
            {
                "agents": [
                    {
                        "agent_id": "agent.user1",
                        "user_name": "user1",
                        "role": "cmo",
                        "department": "executive",
                        "capabilities": ["strategic_planning", "team_management"],
                        "redis_url": "redis://localhost:6379",
                    }
                ]
            }
        )
    )
    async with running(redis_url, config_file), MessageSender(redis_url=redis_url) as sender:
        agent_registry = AgentRegistry(sender.broker)
        # Check individual agent health
        status = await sender.get_agent_status("agent.user1")
        # Check message sender statistics
        stats = await sender.get_sender_stats()
        # Check agent registry statistics
        registry_stats = await agent_registry.get_registry_stats()
    assert status["online"] and status["health"]["status"] == "healthy"
    assert stats["requests"] == 1
    assert registry_stats.as_dict()["by_department"] == {"executive": {"total": 1, "online": 1}}

    # Create default startup team configuration
    configs = create_startup_config()
    # Save to file
    save_startup_config("startup_agents.json")
    saved = json.loads(Path("startup_agents.json").read_text())
    assert [a["role"] for a in saved["agents"]] == [c.role for c in configs]
    assert {c.role for c in configs} == {"cmo", "cso", "cto", "marketing_manager", "content_agent", "seo_agent"}
