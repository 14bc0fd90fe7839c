"""Redis Sentinel: kill -9 of the primary while requests flow; clients follow the new primary.

A real primary, replica and three sentinels on loopback ports (tests/sentinelkit.py); the
agent and the sender are given only the sentinels (``redis+sentinel://.../agentcomms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from agentcomms import (
    AgentCommsError,
    AgentMessage,
    BaseAgent,
    BrokerConnectionError,
    ConfigError,
    MessageBroker,
    MessageSender,
    NotDurableError,
    Settings,
)
from agentcomms.examples import create_agent_config
from agentcomms.transport import ConnectionSpec
from conftest import report
from sentinelkit import SentinelKit


class Counter(BaseAgent):
    """Answers requests and keeps the ids of the one-way messages it handled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: set[str] = set()
        self.changed = asyncio.Event()

    async def handle_request_info(self, message: AgentMessage) -> dict[str, Any]:
        return {"n": message.payload.data.get("n")}

    async def handle_share_insights(self, message: AgentMessage) -> None:
        self.handled.add(message.message_id)
        self.changed.set()


def counter(settings: Settings) -> Counter:
    return Counter(create_agent_config("agent.ops", "ops", "Ops", "operations", ["count"]), settings=settings)


@pytest.fixture
def kit(tmp_path: Path) -> Any:
    with SentinelKit(tmp_path) as started:
        yield started


async def test_requests_follow_the_new_primary_after_kill_9(kit: SentinelKit) -> None:
    settings = Settings(redis_url=kit.url, claim_idle=0.5, reconnect_timeout=30)
    outcomes: list[tuple[float, float, str]] = []  # (sent at, ended at, "ok" or the error's class)
    killed_at: float | None = None
    answered_after_kill = asyncio.Event()

    async with counter(settings) as agent, MessageSender(settings=settings, sender_id="ops") as sender:

        async def ask(n: int) -> None:
            sent = time.monotonic()
            try:
                await sender.request(agent.agent_id, "request_info", {"n": n}, timeout=20)
                outcome = "ok"
            except AgentCommsError as exc:  # every request ends: answered or a typed error, never a hang
                outcome = type(exc).__name__
            outcomes.append((sent, time.monotonic(), outcome))
            if outcome == "ok" and killed_at is not None and sent > killed_at:
                answered_after_kill.set()

        async def flow(worker: int) -> None:
            n = 0
            while not answered_after_kill.is_set() or n < 20:
                await ask(worker * 10_000 + n)
                n += 1

        workers = [asyncio.create_task(flow(w)) for w in range(8)]
        while len(outcomes) < 100:  # requests flow
            await asyncio.sleep(0.01)  # polling the list of outcomes the workers fill
        assert kit.sentinels[0].primary() == ("127.0.0.1", kit.primary.port)
        kit.primary.kill()  # SIGKILL
        killed_at = time.monotonic()
        await asyncio.wait_for(answered_after_kill.wait(), 60)
        await asyncio.gather(*workers)
        assert kit.sentinels[0].primary() == ("127.0.0.1", kit.replica.port)  # the replica was promoted

    after = [(sent, ended, outcome) for sent, ended, outcome in outcomes if sent > killed_at]
    followed = min(ended for sent, ended, outcome in after if outcome == "ok") - killed_at
    in_flight = [outcome for sent, ended, outcome in outcomes if sent <= killed_at < ended]
    lost = [outcome for _, _, outcome in outcomes if outcome != "ok"]
    assert after and after[-1][2] == "ok"  # the clients follow the new primary
    report(
        f"sentinel: kill -9 of the primary with 8 callers asking: {len(outcomes)} requests, {len(lost)} not answered "
        f"({sorted(set(lost)) or 'none'}; {len(in_flight)} were in flight at the kill); "
        f"first answer to a request sent after the kill {followed:.1f} s after it"
    )


async def test_a_durable_send_survives_the_failover(kit: SentinelKit) -> None:
    # after the failover the new primary has no replica: each durable send then waits its 0.2 s and is refused
    settings = Settings(
        redis_url=kit.url, claim_idle=0.5, reconnect_timeout=30, durable_replicas=1, durable_timeout=0.2
    )
    confirmed: list[str] = []
    refused: list[str] = []
    async with counter(settings) as agent, MessageSender(settings=settings, sender_id="ops") as sender:

        async def send(n: int) -> None:
            try:
                result = await sender.send_message(agent.agent_id, "share_insights", {"n": n})
                confirmed.append(result.message_id)
            except (NotDurableError, AgentCommsError) as exc:  # not confirmed by the replica, or Redis away
                refused.append(type(exc).__name__)

        async def flow(worker: int) -> None:
            for n in range(30):
                await send(worker * 1000 + n)
                if worker == 0 and n == 10:
                    kit.primary.kill()  # SIGKILL, while the others send

        await asyncio.gather(*(flow(w) for w in range(4)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not set(confirmed) <= agent.handled:
                    agent.changed.clear()
                    await agent.changed.wait()
    assert kit.sentinels[0].primary() == ("127.0.0.1", kit.replica.port)
    lost = set(confirmed) - agent.handled
    assert not lost, f"{len(lost)} of {len(confirmed)} confirmed sends never handled"  # none lost in the failover
    report(
        f"sentinel, durable send (WAIT 1 replica): 120 sends across a kill -9 of the primary: {len(confirmed)} "
        f"confirmed, all handled after the failover; {len(refused)} refused ({sorted(set(refused)) or 'none'})"
    )


def test_a_sentinel_url_names_the_sentinels_and_the_service() -> None:
    spec = ConnectionSpec.from_url("redis+sentinel://app:s3cret@127.0.0.1:26379,[::1]:26380,localhost/orders/2")
    assert spec.sentinels == (("127.0.0.1", 26379), ("::1", 26380), ("localhost", 26379))
    assert (spec.service, spec.db, spec.username, spec.password) == ("orders", 2, "app", "s3cret")
    assert str(spec) == "redis+sentinel://127.0.0.1:26379,[::1]:26380,localhost:26379/orders/2"  # no password
    assert Settings(redis_url="redis+sentinel://127.0.0.1:26379/orders").redis_url
    with pytest.raises(ConfigError, match="service name"):
        ConnectionSpec.from_url("redis+sentinel://127.0.0.1:26379")
    with pytest.raises(ConfigError, match="not encrypted"):
        ConnectionSpec.from_url("redis+sentinel://127.0.0.1:26379/orders", require_tls=True)


async def test_no_sentinel_answering_is_a_clear_connection_error() -> None:
    settings = Settings(redis_url="redis+sentinel://:s3cret@127.0.0.1:1/orders", reconnect_timeout=1)
    with pytest.raises(BrokerConnectionError, match="no sentinel says where the primary of 'orders' is") as caught:
        await MessageBroker(settings=settings).connect()
    assert "s3cret" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)
