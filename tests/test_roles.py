"""Role routing on a real redis-server: a request to a role is taken by whichever agent of the role is free."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import AgentMessage, BaseAgent, MessageSender, NoAgentAvailableError, Settings, keys
from agentcomms.examples import create_agent_config
from conftest import AgentProcess, report, wait_for_dead_letters, wait_for_entries


class Analyst(BaseAgent):
    """Answers at once, or holds every message while ``busy`` is set (until released)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy = False
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        if self.busy:
            self.holding.set()
            await self.release.wait()
        return {"by": self.agent_id}

    async def handle_assign_task(self, message: AgentMessage) -> None:
        raise RuntimeError("cannot take tasks")


def analyst(settings: Settings, n: int, **kwargs: Any) -> Analyst:
    config = create_agent_config(f"agent.analyst.{n}", f"a{n}", "Analyst", "research", ["analysis"])
    return Analyst(config, settings=settings, concurrency=1, **kwargs)


async def test_a_busy_agents_share_goes_to_the_free_ones(settings: Settings, raw: Redis) -> None:
    async with analyst(settings, 1) as busy, analyst(settings, 2), analyst(settings, 3):
        busy.busy = True
        async with MessageSender(settings=settings, sender_id="dash") as sender:
            first = asyncio.create_task(sender.request("agent.analyst.1", "request_knowledge", {}))
            await busy.holding.wait()  # its one handler slot is taken: it reads nothing more
            replies = await asyncio.gather(
                *(sender.request_role("analyst", "request_knowledge", {"n": n}) for n in range(60))
            )
            by = collections.Counter(reply.responder_id for reply in replies)
            busy.release.set()
            await first
        assert sum(by.values()) == 60 and all(reply.success for reply in replies)
        assert by["agent.analyst.1"] == 0  # it held one (concurrency 1): the others took all of them
        assert by["agent.analyst.2"] > 0 and by["agent.analyst.3"] > 0
    # a role's inbox, read by every agent of the role in one consumer group; nothing left in it
    assert await raw.exists(keys.inbox(keys.role_address("analyst"))) == 1
    assert await raw.xlen(keys.inbox(keys.role_address("analyst"))) == 0
    report(f"role routing: 60 requests to a role of 3 with one busy: {dict(sorted(by.items()))}")


async def test_the_record_says_which_agent_took_a_message_to_a_role(settings: Settings, raw: Redis) -> None:
    recording = settings.model_copy(update={"record": True})
    async with analyst(recording, 1), MessageSender(settings=recording, sender_id="dash") as sender:
        reply = await sender.request_role("analyst", "request_knowledge", {}, conversation_id="c-role")
        await wait_for_entries(raw, keys.record(keys.role_address("analyst")), 1)
        [hop] = await sender.broker.record.conversation("c-role")
    assert hop.agent_id == "@analyst" and reply.responder_id == "agent.analyst.1"
    assert hop.as_dict()["responder_id"] == "agent.analyst.1"


async def test_the_role_address_is_the_role_case_folded_and_never_an_agent_id() -> None:
    assert keys.role_address("  Analyst ") == "@analyst" == keys.role_address("ANALYST")
    assert keys.role_address("Directeur {Général}") == "@directeur%20%7Bg%C3%A9n%C3%A9ral%7D"
    with pytest.raises(ValueError):
        AgentMessage(sender_id="@analyst", recipient_id="agent.x", intent="inform")  # not as a sender


async def test_a_request_to_a_capability_goes_to_whichever_agent_with_it_is_free(
    settings: Settings, raw: Redis
) -> None:
    # two roles share the capability "analysis"; the busy one holds a message, so the other takes them all
    other = create_agent_config("agent.auditor", "au", "Auditor", "finance", ["Analysis", "audits"])
    async with analyst(settings, 1) as busy, Analyst(other, settings=settings, concurrency=1):
        busy.busy = True
        async with MessageSender(settings=settings, sender_id="dash") as sender:
            first = asyncio.create_task(sender.request("agent.analyst.1", "request_knowledge", {}))
            await busy.holding.wait()
            replies = await asyncio.gather(
                *(sender.request_capability("analysis", "request_knowledge", {"n": n}) for n in range(20))
            )
            busy.release.set()
            await first
            with pytest.raises(NoAgentAvailableError, match="capability 'forecasts'"):
                await sender.request_capability("forecasts", "request_knowledge", {})
    assert {reply.responder_id for reply in replies} == {"agent.auditor"}
    assert await raw.xlen(keys.inbox(keys.capability_address("analysis"))) == 0
    report("capability routing: 20 requests to a capability of 2 agents with one busy: all 20 taken by the free one")


async def test_a_capability_address_is_never_a_role_address() -> None:
    assert keys.capability_address(" Analysis ") == "@~analysis"
    assert keys.role_address("~analysis") == "@%7Eanalysis" != keys.capability_address("analysis")
    AgentMessage(sender_id="a", recipient_id=keys.capability_address("Straße planning"), intent="agent_status")


async def test_sticky_conversations_follow_the_agent_that_took_the_first(settings: Settings) -> None:
    async with analyst(settings, 1), analyst(settings, 2), analyst(settings, 3):
        async with MessageSender(settings=settings, sender_id="dash") as sender:
            for conversation in ("c-1", "c-2", "c-3"):
                replies = [
                    await sender.request_role(
                        "analyst", "request_knowledge", {}, conversation_id=conversation, sticky=True
                    )
                    for _ in range(5)
                ]
                assert len({reply.responder_id for reply in replies}) == 1


async def test_a_failing_message_to_a_role_is_dead_lettered_with_the_role(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, claim_idle=0.05, max_deliveries=2)
    async with analyst(settings, 1), analyst(settings, 2):
        async with MessageSender(settings=settings, sender_id="dash") as sender:
            await sender.send_message(keys.role_address("analyst"), "assign_task", {"task_id": "t"})
            [letter] = await wait_for_dead_letters(raw, keys.role_address("analyst"), 1)
    assert letter[b"deliveries"] == b"2" and b"cannot take tasks" in letter[b"reason"]


async def test_with_role_routing_off_a_request_goes_to_one_picked_agent(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, role_routing=False)
    async with analyst(settings, 1), analyst(settings, 2):
        async with MessageSender(settings=settings, sender_id="dash") as sender:
            reply = await sender.request_role("analyst", "request_knowledge", {})
    assert reply.success and await raw.exists(keys.inbox(keys.role_address("analyst"))) == 0


async def test_kill_9_one_of_three_with_300_requests_in_flight(redis_url: str, settings: Settings) -> None:
    agents = [
        await AgentProcess.start(
            redis_url,
            f"agent.worker.{n}",
            "--register",
            "worker:ops",
            "--routed",
            "--heartbeat",
            "1",
            "--delay",
            "0.02",
            "--concurrency",
            "4",
        )  # fmt: skip
        for n in range(3)
    ]
    try:
        async with MessageSender(settings=settings, sender_id="dash") as sender:
            answered: list[tuple[float, int]] = []
            some = asyncio.Event()

            async def ask(n: int) -> None:
                started = time.perf_counter()
                reply = await sender.request_role("worker", "request_knowledge", {"n": n}, timeout=30)
                answered.append((time.perf_counter() - started, reply.data["pid"]))
                if len(answered) == 30:
                    some.set()

            asking = asyncio.gather(*(ask(n) for n in range(300)))
            await some.wait()
            await agents[0].kill()  # kill -9: its messages in hand stay pending in the role's group
            await asyncio.wait_for(asking, 60)
    finally:
        for agent in agents[1:]:
            await agent.terminate()
    by_pid = collections.Counter(pid for _, pid in answered)
    assert len(answered) == 300 and len(by_pid) == 3  # every one answered, the dead one's share by the others
    slowest = max(seconds for seconds, _ in answered)
    report(
        f"role routing: kill -9 of 1 of 3 workers with 300 requests in flight: 300 answered "
        f"({sorted(by_pid.values())} per worker), the slowest in {slowest:.2f} s (claim_idle {settings.claim_idle} s)"
    )
