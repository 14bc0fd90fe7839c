"""``agentcomms dashboard`` as a user runs it: a real process serving the page and the API on loopback."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from test_cli import Cli


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


async def test_the_dashboard_serves_the_page_the_api_and_metrics_until_stopped(cli: Cli, redis_url: str) -> None:
    server = await cli.start("dashboard", "--port", "0", redis_url=redis_url)
    try:
        assert server.stdout is not None
        async with asyncio.timeout(60):
            ready = (await server.stdout.readline()).decode()
        assert ready.startswith("READY http://127.0.0.1:"), ready
        url = ready.split()[1]
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/api/health")).json()["status"] == "healthy"
            page = await client.get("/")
            assert page.status_code == 200 and "<title>agentcomms" in page.text
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and "agentcomms_agents_online" in metrics.text
    finally:
        server.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await server.wait()
    # uvicorn shuts down gracefully, then raises the signal again: the process ends "by SIGTERM", as asked
    assert server.returncode in (0, -signal.SIGTERM, 143)
    assert server.stderr is not None and b"Traceback" not in await server.stderr.read()


async def test_listening_beyond_this_machine_needs_a_token(cli: Cli, redis_url: str) -> None:
    refused = await cli("dashboard", "--host", "0.0.0.0", "--port", "0", redis_url=redis_url)
    assert refused.code == 2 and "needs a token: set AGENTCOMMS_DASHBOARD_TOKEN" in refused.err
