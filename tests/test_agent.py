"""BaseAgent on a real redis-server: dispatch, error replies, built-ins, registration, graceful shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentStatus,
    BaseAgent,
    ConfigError,
    HandlerError,
    KnowledgeNotConfiguredError,
    MessageBroker,
    MessageIntent,
    NoAgentAvailableError,
    RegistrationConflictError,
    Settings,
)
from agentcomms.examples import create_agent_config
from agentcomms.schemas import AgentMessage
from conftest import wait_for_dead_letters


class Echo(BaseAgent):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[AgentMessage] = []
        self.release = asyncio.Event()
        self.changed = asyncio.Condition()
        self.running_now = 0
        self.max_running = 0

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        self.seen.append(message)
        return {"echo": message.payload.data.get("query")}

    async def handle_assign_task(self, message: AgentMessage) -> dict[str, Any]:
        if not message.payload.data.get("task_id"):
            raise HandlerError("invalid_task", "task_id is required")
        return {"accepted": message.payload.data["task_id"]}

    async def handle_request_review(self, message: AgentMessage) -> None:
        raise RuntimeError("reviewer crashed")

    async def handle_get_roadmap(self, message: AgentMessage) -> list[str]:
        async with self.changed:
            self.running_now += 1
            self.max_running = max(self.max_running, self.running_now)
            self.changed.notify_all()
        await self.release.wait()
        self.running_now -= 1
        return ["slow but finished"]


def config(agent_id: str = "agent.echo", role: str = "echo") -> Any:
    return create_agent_config(agent_id, "echo", role, "lab", ["echoing"])


async def test_handlers_answer_requests(settings: Settings) -> None:
    async with Echo(config(), settings=settings) as agent, MessageBroker(settings=settings) as other:
        caller = Echo(config("agent.caller", "caller"), broker=other)
        reply = await caller.request("agent.echo", MessageIntent.REQUEST_KNOWLEDGE, {"query": "hi"})
        assert reply.success and reply.data == {"echo": "hi"} and reply.responder_id == "agent.echo"
        assert agent.seen[0].sender_id == "agent.caller"


async def test_handler_errors_become_error_replies(settings: Settings) -> None:
    async with Echo(config(), settings=settings) as agent:
        sender = agent.sender
        invalid = await sender.request("agent.echo", MessageIntent.ASSIGN_TASK, {})
        assert not invalid.success and invalid["error"] == {"code": "invalid_task", "message": "task_id is required"}
        crashed = await sender.request("agent.echo", MessageIntent.REQUEST_REVIEW, {})
        assert crashed["error"] == {"code": "handler_error", "message": "RuntimeError: reviewer crashed"}
        unsupported = await sender.request("agent.echo", "approve_budget", {})
        assert unsupported.error is not None and unsupported.error.code == "unsupported_intent"
        assert (await sender.request("agent.echo", MessageIntent.REQUEST_KNOWLEDGE, {"query": "still"})).success


async def test_failing_one_way_message_is_retried_then_dead_lettered(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, claim_idle=0.05, max_deliveries=2)
    async with Echo(config(), settings=settings) as agent:
        await agent.sender.send_message("agent.echo", MessageIntent.REQUEST_REVIEW, {"draft": "x"})
        [letter] = await wait_for_dead_letters(raw, "agent.echo", 1)
    assert letter[b"deliveries"] == b"2" and b"RuntimeError: reviewer crashed" in letter[b"reason"]


async def test_a_one_way_message_refused_by_the_agent_is_dead_lettered_with_why(settings: Settings, raw: Redis) -> None:
    async with Echo(config(), settings=settings) as agent:
        await agent.sender.send_message("agent.echo", "approve_budget", {"amount": 1})  # no handler for it
        await agent.sender.send_message("agent.echo", MessageIntent.ASSIGN_TASK, {})  # HandlerError
        letters = await wait_for_dead_letters(raw, "agent.echo", 2)
    reasons = sorted(letter[b"reason"].decode() for letter in letters)
    assert reasons[0] == "rejected: invalid_task: task_id is required"
    assert reasons[1].startswith("rejected: unsupported_intent: agent.echo does not handle 'approve_budget'")
    assert all(letter[b"deliveries"] == b"1" for letter in letters)  # refused on purpose: not retried


async def test_custom_intents_with_a_handler_are_advertised(settings: Settings) -> None:
    class Budgets(BaseAgent):
        async def handle_approve_budget(self, message: AgentMessage) -> dict[str, Any]:
            return {"approved": message.payload.data["amount"] < 100}

    async with Budgets(config("agent.budgets", "cfo"), settings=settings) as agent:
        info = await agent.info()
        assert "approve_budget" in info.supported_intents
        found = await agent.discover_agents(intent="approve_budget")
        assert [a.agent_id for a in found] == ["agent.budgets"]
        reply = await agent.sender.request("agent.budgets", "approve_budget", {"amount": 5})
        assert reply.data == {"approved": True}
        status = await agent.sender.request("agent.budgets", MessageIntent.AGENT_STATUS)  # built in
        assert status.data["agent_id"] == "agent.budgets" and status.data["role"] == "cfo"


async def test_built_in_health_and_capabilities(settings: Settings) -> None:
    async with Echo(config(), settings=settings) as agent:
        health = await agent.sender.request("agent.echo", MessageIntent.HEALTH_CHECK)
        assert health.data["status"] == "healthy" and health.data["agent_id"] == "agent.echo"
        capabilities = await agent.sender.request("agent.echo", MessageIntent.CAPABILITY_QUERY)
        assert capabilities.data["capabilities"] == ["echoing"]
        assert set(capabilities.data["supported_intents"]) == {
            "get_roadmap", "assign_task", "request_knowledge", "request_review", "health_check", "capability_query",
                "agent_status",
        }  # fmt: skip


async def test_registration_follows_the_agent_lifecycle(settings: Settings) -> None:
    agent = Echo(config(), settings=settings)
    await agent.initialize()
    info = await agent.registry.get_agent("agent.echo")
    assert (
        info.status is AgentStatus.ONLINE
        and info.role == "echo"
        and MessageIntent.ASSIGN_TASK in info.supported_intents
    )
    found = await agent.discover_agents(intent=MessageIntent.REQUEST_REVIEW, online_only=True)
    assert [a.agent_id for a in found] == ["agent.echo"]
    async with MessageBroker(settings=settings) as observer:
        await agent.shutdown()
        from agentcomms import AgentRegistry

        assert (await AgentRegistry(observer).get_agent("agent.echo")).status is AgentStatus.OFFLINE


async def test_same_id_with_another_role_is_refused(settings: Settings) -> None:
    async with Echo(config(), settings=settings):
        with pytest.raises(RegistrationConflictError):
            await Echo(config(role="impostor"), settings=settings).initialize()


async def test_concurrency_is_bounded_and_shutdown_finishes_work_in_hand(settings: Settings) -> None:
    agent = Echo(config(), settings=settings, concurrency=2)
    await agent.initialize()
    async with MessageBroker(settings=settings) as caller_broker:
        caller = Echo(config("agent.caller", "caller"), broker=caller_broker)
        calls = [
            asyncio.create_task(caller.request("agent.echo", MessageIntent.GET_ROADMAP, timeout=30)) for _ in range(5)
        ]
        async with asyncio.timeout(20), agent.changed:
            await agent.changed.wait_for(lambda: agent.running_now == 2)
        shutdown = asyncio.create_task(agent.shutdown())
        agent.release.set()  # the handlers in hand finish during shutdown
        await shutdown
        assert agent.max_running == 2  # five requests, never more than two at once
        done: set[asyncio.Task[Any]] = set()
        pending = set(calls)
        async with asyncio.timeout(20):
            while len(done) < 2:  # the replies of the two handled in hand arrive
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done |= finished
        assert all(task.result().data == ["slow but finished"] for task in done)
        for task in pending:  # what was still queued waits in the inbox for the next start
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def test_addressing_by_role(settings: Settings) -> None:
    async with Echo(config(), settings=settings) as agent:
        with pytest.raises(NoAgentAvailableError, match="no agent with role 'cfo' is online"):
            await agent.request_role("cfo", MessageIntent.REQUEST_KNOWLEDGE, {"query": "budget"})
        async with Echo(config("agent.echo2", "echo"), settings=settings):
            reply = await agent.request_role("echo", MessageIntent.REQUEST_KNOWLEDGE, {"query": "who?"})
            assert reply.responder_id == "agent.echo2"  # never itself


async def test_search_knowledge_without_a_knowledge_service_says_how_to_start_one(settings: Settings) -> None:
    async with Echo(config(), settings=settings) as agent:
        with pytest.raises(KnowledgeNotConfiguredError, match="agentcomms knowledge serve"):
            await agent.search_knowledge("content strategy")


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="agent_id"):
        Echo({"agent_id": "bad id", "user_name": "x", "role": "r", "department": "d"})


async def test_an_invalid_record_from_the_agent_class_is_a_config_error(settings: Settings) -> None:
    class Sloppy(BaseAgent):
        async def get_agent_capabilities(self) -> list[str]:
            return ["x" * 500]  # longer than a capability may be

    with pytest.raises(ConfigError, match="agent.sloppy: invalid agent record: capabilities.0"):
        await Sloppy(config("agent.sloppy"), settings=settings).initialize()
