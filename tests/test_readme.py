"""The README's Python examples run as written (top-level await allowed), so the docs cannot drift."""

from __future__ import annotations

import ast
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentcomms import AgentMessage, AgentResponse, Settings
from agentcomms.examples import TwinAgent, create_agent_config

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


async def run_block(source: str, namespace: dict[str, Any]) -> dict[str, Any]:
    code = compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # our own README
    if result is not None:
        await result
    return namespace


@pytest.fixture(autouse=True)
def environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)


@pytest.fixture
async def twins(settings: Settings) -> AsyncIterator[None]:
    agents = [
        TwinAgent(create_agent_config("agent.cso.jane", "jane", "cso", "sales"), settings=settings),
        TwinAgent(create_agent_config("agent.sarah", "sarah", "content_agent", "marketing", ["content_creation"]),
                  settings=settings),
        TwinAgent(create_agent_config("agent.alex", "alex", "seo_agent", "marketing"), settings=settings),
    ]  # fmt: skip
    for agent in agents:
        await agent.initialize()
    yield
    for agent in agents:
        await agent.shutdown()


def test_readme_has_the_examples() -> None:
    assert len(BLOCKS) == 5


async def test_add_communication_to_your_agent(twins: None, capsys: pytest.CaptureFixture[str]) -> None:
    class ExistingCMOAgent:
        def __init__(self) -> None:
            self.campaigns = ["Q4 Holiday Campaign"]

    namespace = await run_block(BLOCKS[0], {"ExistingCMOAgent": ExistingCMOAgent})
    assert "'pipeline': {'total': '$2.4M'" in capsys.readouterr().out
    asked = await namespace["cmo"].comms_agent.sender.request(
        "agent.cmo.john", "request_knowledge", {"query": "campaigns?"}
    )
    assert asked.data == {"campaigns": ["Q4 Holiday Campaign"], "asked": "campaigns?"}
    await namespace["cmo"].shutdown_communication()


async def test_agent_from_scratch() -> None:
    namespace = await run_block(BLOCKS[1], {})
    assert not namespace["agent"].running  # it started, answered nothing, and stopped cleanly


async def test_sender(twins: None) -> None:
    namespace = await run_block(BLOCKS[2], {})
    assert namespace["reply"].success and namespace["knowledge"].success
    assert [a.agent_id for a in namespace["team"]] == ["agent.sarah"]
    assert sorted(namespace["results"]) == ["agent.alex", "agent.sarah"]


async def test_security(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentcomms import MessageBroker
    from agentcomms.security import create_admin, enrol_team

    folder = tmp_path / "identities"  # what `agentcomms identity create` and `trust` make
    admin = create_admin(folder, "admin.ops")
    async with MessageBroker(settings=Settings(redis_url=redis_url)) as broker:
        await enrol_team(broker.pipeliner, folder, admin, [("agent.cso.jane", ["cso"]), ("dashboard.cmo", ["cmo"])])
    monkeypatch.setenv("AGENTCOMMS_SECURITY", "on")
    monkeypatch.setenv("AGENTCOMMS_IDENTITY_DIR", str(folder))
    seen: list[AgentMessage] = []

    class Jane(TwinAgent):
        async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any] | AgentResponse:
            seen.append(message)
            return await super().handle_request_knowledge(message)

    async with Jane(create_agent_config("agent.cso.jane", "jane", "cso", "sales")):
        namespace = await run_block(BLOCKS[3], {})
    assert namespace["reply"].success and "pipeline" in namespace["reply"].data
    assert seen[0].sender_roles == ("cmo",) and seen[0].payload.data == {"query": "board pack"}


async def test_knowledge(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import agentcomms
    from agentcomms import AgentMemoryInterface, KnowledgeService

    corpus = Path(agentcomms.__file__).parent / "examples" / "knowledge" / "corpus"
    for domain in ("executive", "marketing", "content"):
        shutil.copytree(corpus / domain, tmp_path / "docs" / domain)
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as owner:
        await owner.ingest(tmp_path / "docs")
    monkeypatch.setenv("AGENTCOMMS_KNOWLEDGE_DIR", str(tmp_path / "kb"))
    async with KnowledgeService(kb):  # owns the store: the README's interface becomes its client
        namespace = await run_block(BLOCKS[4], {})
    results = namespace["results"]
    assert results and {r.domain for r in results} <= {"marketing", "content"}
