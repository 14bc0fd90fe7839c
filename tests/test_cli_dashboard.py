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
    assert server.returncode == 0
    assert server.stderr is not None and b"Traceback" not in await server.stderr.read()


async def test_listening_beyond_this_machine_needs_a_token(cli: Cli, redis_url: str) -> None:
    refused = await cli("dashboard", "--host", "0.0.0.0", "--port", "0", redis_url=redis_url)
    assert refused.code == 2 and "needs a token: set AGENTCOMMS_DASHBOARD_TOKEN" in refused.err


async def test_the_demo_leaves_the_dashboard_running_on_its_team(cli: Cli) -> None:
    demo = await cli.start("demo", "--dashboard", "--port", "0", redis_url=None)
    try:
        assert demo.stdout is not None
        url = folder = None
        async with asyncio.timeout(240):
            while url is None:
                line = (await demo.stdout.readline()).decode()
                assert line, "the demo ended before serving the dashboard"
                if "Redis at unix://" in line:
                    folder = Path(line.split("Redis at unix://")[1].split()[0]).parent.parent  # its temporary folder
                if "dashboard at http://" in line:
                    url = line.split("dashboard at ")[1].split()[0]
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            agents = (await client.get("/api/agents", params={"online_only": True})).json()
            assert {"agent.cmo.john", "agent.sarah", "knowledge"} <= {a["agent_id"] for a in agents}
            asked = await client.post("/api/ask", json={"role": "cso", "data": {"query": "pipeline?"}, "timeout": 20})
            assert asked.status_code == 200 and asked.json()["success"], asked.text  # signed, as dashboard.cmo
    finally:
        demo.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await demo.wait()
    assert demo.returncode == 0  # stopped, then cleaned up: its agents stopped, its Redis and folder gone
    assert folder is not None and not folder.exists()
