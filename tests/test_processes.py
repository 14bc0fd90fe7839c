"""Agents in other OS processes: request/reply across processes, and an instance killed with SIGKILL."""

from __future__ import annotations

import asyncio
from typing import Any

from agentcomms import MessageBroker, Settings
from conftest import AgentProcess
from test_broker import message


async def test_request_from_one_process_is_answered_in_another(broker: MessageBroker, agent_id: str) -> None:
    agent = await AgentProcess.start(broker.url, agent_id, "--mode", "echo")
    try:
        reply = await broker.request(message(agent_id, question="Q4 pipeline?"))
        assert reply.success
        assert reply.data["echo"] == {"question": "Q4 pipeline?"}
        assert reply.data["pid"] == agent.process.pid
    finally:
        assert await agent.terminate() == 0
        assert (await agent.line()) == "DONE"


async def test_killed_instance_messages_are_answered_exactly_once(settings: Settings, agent_id: str) -> None:
    url = settings.redis_url
    assert url is not None
    # instance A takes 5 requests and hangs on them; B answers the rest; then A is killed
    holder = await AgentProcess.start(url, agent_id, "--mode", "hold", "--concurrency", "5")
    answerer: AgentProcess | None = None
    async with MessageBroker(settings=settings, client_name="caller") as caller:
        try:
            requests = [message(agent_id, n=n) for n in range(40)]
            tasks = [asyncio.create_task(caller.request(r, timeout=60)) for r in requests]
            held = {(await holder.expect("HOLD")).split()[1] for _ in range(5)}
            answerer = await AgentProcess.start(url, agent_id, "--mode", "echo")
            await holder.kill()
            replies = await asyncio.gather(*tasks)
        finally:
            await holder.kill()
            if answerer is not None:
                await answerer.terminate()
        stats = caller.stats
    by_id: dict[str, Any] = {r.message_id: reply for r, reply in zip(requests, replies, strict=True)}
    assert len(held) == 5 and held <= set(by_id)
    assert all(reply.success and reply.data["echo"] == {"n": n} for n, reply in enumerate(replies))
    assert answerer is not None
    assert {by_id[m].data["pid"] for m in held} == {answerer.process.pid}  # taken over from the dead one
    # exactly once: every reply matched a waiting request and none arrived twice
    assert stats.replies_received == 40 and stats.replies_unmatched == 0
