"""Health endpoints of an agent process (/healthz, /readyz): run-agent in a real subprocess, and readiness that
follows Redis going away and coming back (a real redis-server, killed and started again)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentcomms import BaseAgent, Settings, create_agent_config, serve_health
from faultkit import RedisServer


async def get(url: str, method: str = "GET") -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.request(method, url)
    return response.status_code, response.json()


async def until(url: str, status: int) -> Any:
    """The body of ``url`` once it answers ``status`` (a probe's view: it is asked again until then)."""
    async with asyncio.timeout(30):
        while True:
            code, body = await get(url)
            if code == status:
                return body
            await asyncio.sleep(0.1)  # a probe's period, shortened


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "agents.json"
    agent = {"agent_id": "agent.probe", "user_name": "probe", "role": "ops", "department": "platform"}
    path.write_text(json.dumps({"agents": [agent]}))
    return path


async def test_run_agent_serves_liveness_and_readiness(redis_url: str, config_file: Path, tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "AGENTCOMMS_DATA_DIR": str(tmp_path / "data")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentcomms", "run-agent", "--config", str(config_file), "--health-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            first = (await process.stdout.readline()).decode().split()
            assert first[0] == "HEALTH" and first[1].startswith("http://127.0.0.1:"), first
            base = first[1]
            assert (await process.stdout.readline()).decode().strip() == "READY agent.probe"
        assert await get(base + "/healthz") == (200, {"status": "alive"})
        assert await get(base + "/readyz") == (
            200,
            {
                "ready": True,
                "agents": [{"agent_id": "agent.probe", "ready": True, "registered": True, "reading": True}],
            },
        )
        assert (await get(base + "/metrics"))[0] == 404
        assert (await get(base + "/healthz", "POST"))[0] == 405
    finally:
        process.terminate()
        async with asyncio.timeout(60):
            await process.wait()
    assert process.returncode == 0


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with RedisServer(tmp_path / "redis", binary=os.environ.get("AGENTCOMMS_REDIS_SERVER")) as server:
        yield server


async def test_readiness_follows_redis_and_liveness_the_event_loop(own_redis: RedisServer) -> None:
    settings = Settings(redis_url=own_redis.url, heartbeat_interval=0.5, reconnect_timeout=1.0)
    agent = BaseAgent(create_agent_config("agent.probe", "probe", "ops", "platform"), settings=settings)
    with serve_health([agent]) as health:
        ready, alive = health.url + "/readyz", health.url + "/healthz"
        assert (await get(ready))[0] == 503  # not started yet
        async with agent:
            await until(ready, 200)
            own_redis.kill()  # Redis goes away: the agent can neither read nor beat
            down = await until(ready, 503)
            assert down["ready"] is False and down["agents"][0]["reading"] is False
            assert await get(alive) == (200, {"status": "alive"})  # not a reason to restart the process
            own_redis.start()
            await until(ready, 200)

            # something that blocks the event loop (a handler that never yields): the process is not alive
            blocking = threading.Event()

            def block() -> None:
                blocking.set()
                time.sleep(3)  # longer than the probe's 2 s

            def probe() -> tuple[int, Any]:
                blocking.wait(10)
                response = httpx.get(alive, timeout=10)
                return response.status_code, response.json()

            checking = asyncio.ensure_future(asyncio.to_thread(probe))
            asyncio.get_running_loop().call_soon(block)
            assert await checking == (503, {"status": "event loop not answering"})
        assert (await get(ready))[0] == 503  # stopped
