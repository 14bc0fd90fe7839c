"""``agentcomms knowledge``, run as a user would: real subprocesses, a real redis-server, the shipped corpus."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path

import httpx
import pytest

import agentcomms
from test_cli import Cli

CORPUS = Path(agentcomms.__file__).parent / "examples" / "knowledge" / "corpus"
SECRET = "What is the secret name for the deal to buy the camera startup?"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    for domain in ("executive", "marketing", "content"):
        shutil.copytree(CORPUS / domain, folder / domain)
    (folder / "content" / "notes.png").write_bytes(b"\x89PNG")
    return folder


async def test_ingest_search_and_stats_without_a_service(cli: Cli, redis_url: str, docs: Path) -> None:
    first = await cli("knowledge", "ingest", str(docs), "--json", redis_url=redis_url)
    assert first.code == 0, first.err
    report = json.loads(first.out)
    assert len(report["added"]) == 33 and report["skipped"][0]["reason"] == "unsupported file type .png"
    assert "store: " in first.err  # it opened the store itself: no service runs
    again = await cli("knowledge", "ingest", str(docs), redis_url=redis_url)
    assert again.code == 0 and "0 added, 0 updated, 33 unchanged" in again.out and "0 chunks embedded" in again.out

    cmo = await cli("knowledge", "search", SECRET, "--role", "cmo", "--json", redis_url=redis_url)
    assert cmo.code == 0, cmo.err
    assert "Project Nightjar" in json.loads(cmo.out)[0]["text"]
    content = await cli("knowledge", "search", SECRET, "--role", "content_agent", "--limit", "50", redis_url=redis_url)
    assert content.code == 0 and "Nightjar" not in content.out and "executive" not in content.out
    nobody = await cli("knowledge", "search", SECRET, "--role", "intern", redis_url=redis_url)
    assert nobody.code == 0 and "role intern may read no knowledge domain" in nobody.out

    stats = await cli("knowledge", "stats", "--json", redis_url=redis_url)
    assert stats.code == 0
    assert json.loads(stats.out)["domains"]["executive"]["documents"] == 11
    bad = await cli("knowledge", "search", "  ", "--role", "cmo", redis_url=redis_url)
    assert bad.code == 2 and "the query is empty" in bad.err
    missing = await cli("knowledge", "ingest", str(docs / "nope"), redis_url=redis_url)
    assert missing.code == 2 and "no such file or folder" in missing.err


async def test_with_a_service_running_the_commands_ask_it(cli: Cli, redis_url: str, docs: Path) -> None:
    service = await cli.start("knowledge", "serve", "--ingest", str(docs), "--health-port", "0", redis_url=redis_url)
    try:
        assert service.stdout is not None
        async with asyncio.timeout(120):
            health = (await service.stdout.readline()).decode().split()
            ready = (await service.stdout.readline()).decode()
        assert ready == "READY knowledge\n" and health[0] == "HEALTH"
        async with httpx.AsyncClient() as client:
            probe = await client.get(health[1] + "/readyz")
        assert probe.status_code == 200 and probe.json()["agents"][0]["agent_id"] == "knowledge"
        found = await cli("knowledge", "search", SECRET, "--role", "cmo", "--json", redis_url=redis_url)
        assert found.code == 0, found.err
        assert "asking the knowledge service 'knowledge'" in found.err
        assert "Project Nightjar" in json.loads(found.out)[0]["text"]
        (docs / "content" / "new.md").write_text("# Tone\n\nHeadlines never use exclamation marks.\n")
        ingested = await cli("knowledge", "ingest", str(docs), "--json", redis_url=redis_url)
        assert ingested.code == 0, ingested.err
        assert len(json.loads(ingested.out)["added"]) == 1  # ingested by the service, which owns the store
        stats = await cli("knowledge", "stats", "--json", redis_url=redis_url)
        assert json.loads(stats.out)["documents"] == 34
    finally:
        service.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await service.wait()
    assert service.returncode == 0
    gone = await cli("knowledge", "search", SECRET, "--role", "cmo", redis_url=redis_url)
    assert gone.code == 0 and "Project Nightjar" in gone.out  # the store is free again: opened by the command
