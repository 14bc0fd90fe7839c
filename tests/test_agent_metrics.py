"""Agents' own Prometheus metrics (docs/metrics.md): ``run-agent --metrics-port`` in real subprocesses, and
``serve_agent_metrics`` in this process, against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from agentcomms import (
    AgentMessage,
    BaseAgent,
    HandlerError,
    MessageBroker,
    MessagePayload,
    MetricsUnavailableError,
    Settings,
    create_agent_config,
    serve_agent_metrics,
)
from conftest import wait_for_dead_letters

AGENT = "agent.metrics.one"

AGENT_MODULE = """
from agentcomms import BaseAgent, HandlerError


class MetricsAgent(BaseAgent):
    async def handle_get_roadmap(self, message):
        return {"roadmap": "Q4"}

    async def handle_request_review(self, message):
        raise HandlerError("nothing_to_review", "send the draft")

    async def handle_assign_task(self, message):
        raise RuntimeError("boom")
"""

NO_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # as if the web extra were not installed
from agentcomms.cli import main
sys.argv = ["agentcomms", *sys.argv[1:]]
main()
"""

WATCH_MODULES = """
import atexit, sys
atexit.register(lambda: print("PROMETHEUS", "prometheus_client" in sys.modules, flush=True))
from agentcomms.cli import main
sys.argv = ["agentcomms", *sys.argv[1:]]
main()
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def message(intent: str, **data: Any) -> AgentMessage:
    return AgentMessage(sender_id="agent.tester", recipient_id=AGENT, intent=intent, payload=MessagePayload(data=data))


class Agents:
    """``python <program> run-agent --config <file>`` in a temporary home, the test agent class importable."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.home = tmp_path
        (tmp_path / "metrics_agents.py").write_text(AGENT_MODULE)
        self.config = tmp_path / "agents.json"
        config = {"agent_id": AGENT, "user_name": "one", "role": "cto", "department": "engineering"}
        self.config.write_text(json.dumps({"agents": [config]}))
        names = {name.upper() for name in Settings.model_fields}
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k.upper() not in names and not (k.startswith("AGENTCOMMS_") and k != "AGENTCOMMS_REDIS_SERVER")
        }
        self.env.update(
            REDIS_URL=redis_url, AGENTCOMMS_DATA_DIR=str(tmp_path / "data"), XDG_DATA_HOME=str(tmp_path / "xdg"),
            PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]),
            AGENTCOMMS_CONCURRENCY="1",  # one message at a time: a message's counts are in before the next is read
            AGENTCOMMS_MAX_DELIVERIES="1",  # a one-way message whose handler raises is dead-lettered at once
        )  # fmt: skip

    async def start(
        self, *args: str, program: str | None = None, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        command = ["-c", program] if program else ["-m", "agentcomms"]
        return await asyncio.create_subprocess_exec(
            sys.executable, *command, "run-agent", "--config", str(self.config),
            "--class", "metrics_agents:MetricsAgent", *args,
            cwd=self.home, env={**self.env, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip


async def until_ready(process: asyncio.subprocess.Process) -> list[str]:
    """stdout's lines up to the READY line."""
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while not lines or not lines[-1].startswith("READY"):
            line = await process.stdout.readline()
            if not line:
                raise AssertionError(f"exited {await process.wait()} before READY: {(await process.stderr.read())!r}")
            lines.append(line.decode().strip())
    return lines


async def stop(process: asyncio.subprocess.Process) -> tuple[str, str]:
    process.terminate()
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


@pytest.fixture
async def agents(tmp_path: Path, redis_url: str) -> AsyncIterator[Agents]:
    yield Agents(tmp_path, redis_url)


async def test_run_agent_serves_its_agents_metrics(agents: Agents, broker: MessageBroker, raw: Redis) -> None:
    process = await agents.start("--metrics-port", "0")
    try:
        lines = await until_ready(process)
        assert lines[-1] == f"READY {AGENT}"
        metrics = [line.removeprefix("METRICS ") for line in lines if line.startswith("METRICS ")]
        assert len(metrics) == 1 and metrics[0].startswith("http://127.0.0.1:") and metrics[0].endswith("/metrics")
        url = metrics[0]
        assert int(url.split(":")[2].split("/")[0]) > 0  # the port picked for port 0

        for _ in range(2):
            assert (await broker.request(message("get_roadmap"))).success
        review = await broker.request(message("request_review"))
        assert review.error is not None and review.error.code == "nothing_to_review"
        await broker.publish_message(message("assign_task", task_id="t1"))  # one-way: the handler raises
        await wait_for_dead_letters(raw, AGENT, 1)
        health = await broker.request(message("health_check"))  # read once the dead letter is counted
        assert health.success and health.data["handled"] == 3 and health.data["failed"] == 1

        samples = await scrape(url)
    finally:
        await stop(process)

    def events(event: str) -> float:
        return value(samples, "agentcomms_agent_messages_total", agent=AGENT, event=event)

    assert events("received") == 5
    assert events("handled") in (3, 4)  # the health check's acknowledgement may still be on its way
    assert (events("failed"), events("dead_lettered")) == (1, 1)
    assert events("expired") == events("rejected") == events("refused") == events("replies_failed") == 0
    assert value(samples, "agentcomms_agent_running", agent=AGENT) == 1
    assert value(samples, "agentcomms_agent_in_flight", agent=AGENT) in (0, 1)

    def timed(intent: str, outcome: str) -> float:
        return value(samples, "agentcomms_agent_handler_seconds_count", agent=AGENT, intent=intent, outcome=outcome)

    assert timed("get_roadmap", "ok") == 2
    assert timed("request_review", "error") == 1
    assert timed("assign_task", "raised") == 1
    assert timed("health_check", "ok") == 1
    assert value(samples, "agentcomms_agent_handler_seconds_bucket", agent=AGENT, intent="get_roadmap",
                 outcome="ok", le="+Inf") == 2  # fmt: skip
    brokers = {dict(labels)["broker"] for name, labels in samples if name == "agentcomms_broker_round_trips_total"}
    assert len(brokers) == 1  # the agents of one run-agent share one broker
    (broker_id,) = brokers
    assert value(samples, "agentcomms_broker_round_trips_total", broker=broker_id) > 0
    assert ("agentcomms_broker_sent_total", frozenset({("broker", broker_id)})) in samples


async def test_the_metrics_port_may_come_from_the_environment(agents: Agents) -> None:
    process = await agents.start(env={"AGENTCOMMS_METRICS_PORT": "0"})
    try:
        lines = await until_ready(process)
        assert lines[0].startswith("METRICS http://127.0.0.1:"), lines
        samples = await scrape(lines[0].removeprefix("METRICS "))
    finally:
        await stop(process)
    assert value(samples, "agentcomms_agent_running", agent=AGENT) == 1
    assert value(samples, "agentcomms_agent_messages_total", agent=AGENT, event="received") == 0


async def test_without_the_option_nothing_is_served_nor_imported(agents: Agents) -> None:
    process = await agents.start(program=WATCH_MODULES)
    try:
        lines = await until_ready(process)
    finally:
        out, _ = await stop(process)
    assert lines == [f"READY {AGENT}"]  # no METRICS line
    assert out.splitlines()[-1] == "PROMETHEUS False"  # prometheus_client was never imported: no server either


async def test_without_prometheus_client_the_option_is_a_config_error(agents: Agents) -> None:
    process = await agents.start("--metrics-port", "0", program=NO_PROMETHEUS)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    assert "pip install 'agentcomms[web]'" in err.decode() and not out


def test_serve_agent_metrics_without_prometheus_client_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailableError, match=r"agentcomms\[web\]"):
        serve_agent_metrics([])


class Reviewer(BaseAgent):
    async def handle_get_roadmap(self, message: AgentMessage) -> dict[str, Any]:
        return {"roadmap": "Q4"}

    async def handle_request_review(self, message: AgentMessage) -> None:
        raise HandlerError("nothing_to_review", "send the draft")


async def test_serve_agent_metrics_in_process(settings: Settings, broker: MessageBroker) -> None:
    agent = Reviewer(create_agent_config(AGENT, "one", "cto", "engineering"), settings=settings)
    with serve_agent_metrics([agent]) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert agent.handler_observer is not None
        with pytest.raises(OSError):
            serve_agent_metrics([agent], port=server.port)  # the port is taken
        before = await scrape(server.url)  # not started yet: zeros
        assert value(before, "agentcomms_agent_running", agent=AGENT) == 0
        assert value(before, "agentcomms_agent_messages_total", agent=AGENT, event="handled") == 0
        async with agent:
            assert value(await scrape(server.url), "agentcomms_agent_running", agent=AGENT) == 1
            for _ in range(3):
                assert (await broker.request(message("get_roadmap"))).success
            assert not (await broker.request(message("request_review"))).success
        after = await scrape(server.url)  # stopped: its counters stay
        assert value(after, "agentcomms_agent_running", agent=AGENT) == 0
        assert value(after, "agentcomms_agent_messages_total", agent=AGENT, event="received") == 4
        assert value(after, "agentcomms_agent_messages_total", agent=AGENT, event="handled") == 4
        labels = {"agent": AGENT, "intent": "get_roadmap", "outcome": "ok"}
        assert value(after, "agentcomms_agent_handler_seconds_count", **labels) == 3
        assert value(after, "agentcomms_agent_handler_seconds_sum", **labels) > 0
        assert value(after, "agentcomms_agent_handler_seconds_count", agent=AGENT, intent="request_review",
                     outcome="error") == 1  # fmt: skip
        assert value(after, "agentcomms_broker_requests_total", broker=agent.broker.client_id) == 0
    assert agent.handler_observer is None  # closed: handlers are not timed any more
    server.close()  # a second close is harmless
    with pytest.raises(httpx.ConnectError):
        await scrape(server.url)
