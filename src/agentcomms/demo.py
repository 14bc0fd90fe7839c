"""The demo: a startup's digital-twin team, each agent in its own process, playing the seed's scenarios.

``agentcomms demo`` (or ``python demo.py``) starts an embedded redis-server in a temporary
folder (unless ``REDIS_URL`` is set), runs the CMO, CSO, CTO, marketing manager, content
and SEO twins as separate ``agentcomms run-agent`` processes, then plays: a CMO dashboard
request for sales data, CMO-CSO agent-to-agent collaboration, a department broadcast,
an executive's department status, and discovery queries. It prints a report and
returns whether every scenario was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agentcomms.embedded import EmbeddedRedis
from agentcomms.examples.config import create_startup_config, save_startup_config
from agentcomms.examples.dashboard import DashboardInterface
from agentcomms.exceptions import AgentCommsError
from agentcomms.schemas import MessageIntent
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings

__all__ = ["run_demo"]


@dataclass
class Outcome:
    """One scenario's result for the report."""

    title: str
    ok: bool = False
    ms: float = 0.0
    rows: list[tuple[str, str]] = field(default_factory=list)


def _short(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.asynccontextmanager
async def _redis(settings: Settings, folder: Path) -> AsyncIterator[str]:
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(folder / "redis", binary=settings.redis_server)
    await asyncio.to_thread(server.start)
    try:
        yield server.url
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def _team(url: str, config: Path, agent_ids: list[str]) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    env = {**os.environ, "REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    log = config.parent / "agents.log"  # what the agents print on stderr: shown only if one fails to start
    with log.open("ab") as sink:
        processes = await _start_team(config, agent_ids, env, sink.fileno())
    try:
        async with asyncio.timeout(60):
            for process, agent_id in zip(processes, agent_ids, strict=True):
                assert process.stdout is not None
                line = (await process.stdout.readline()).decode()
                if not line.startswith("READY"):
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                    raise AgentCommsError(
                        f"agent process {agent_id} did not start (exit code {await process.wait()}):\n{tail}"
                    )
        yield processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _start_team(
    config: Path, agent_ids: list[str], env: dict[str, str], stderr: int
) -> list[asyncio.subprocess.Process]:
    return [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentcomms",
            "run-agent",
            "--config",
            str(config),
            "--agent-id",
            agent_id,
            "--class",
            "agentcomms.examples:TwinAgent",
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
        )  # fmt: skip
        for agent_id in agent_ids
    ]


async def _timed(outcome: Outcome, scenario: Callable[[Outcome], Awaitable[None]]) -> Outcome:
    started = time.perf_counter()
    try:
        await scenario(outcome)
    except AgentCommsError as exc:
        outcome.ok = False
        outcome.rows.append(("error", str(exc)))
    outcome.ms = (time.perf_counter() - started) * 1000
    return outcome


async def _play(url: str, settings: Settings) -> list[Outcome]:
    demo_settings = settings.model_copy(update={"redis_url": url})
    async with (
        DashboardInterface(dashboard_id="dashboard.cmo", settings=demo_settings, timeout=15) as dashboard,
        MessageSender(sender_id="exec.ceo", settings=demo_settings) as executive,
    ):

        async def sales_data(outcome: Outcome) -> None:
            reply = await dashboard.request_sales_data(
                requester_role="cmo",
                query="What's our current sales pipeline and Q4 forecast?",
                context={"priority": "high", "dashboard_request": True},
            )
            outcome.ok = reply.success and isinstance(reply.data, dict) and "pipeline" in reply.data
            outcome.rows += [("answered by", str(reply.responder_id)), ("data", _short(reply.data or reply["error"]))]

        async def collaboration(outcome: Outcome) -> None:
            reply = await dashboard.request_from_role(
                "cmo", "Plan the Q4 campaign around the sales pipeline", requester_role="ceo",
                data={"collaborate_with": "cso"},
            )  # fmt: skip
            data = reply.data if reply.success and isinstance(reply.data, dict) else {}
            from_cso = data.get("from_cso")
            outcome.ok = isinstance(from_cso, dict) and "pipeline" in from_cso
            outcome.rows += [
                ("CMO agent", str(reply.responder_id)),
                ("CMO asked CSO agent, got", _short(from_cso)),
                ("plan", _short(data.get("plan", reply.get("error")))),
            ]

        async def broadcast(outcome: Outcome) -> None:
            before = executive.broker.stats.round_trips
            results = await executive.broadcast_message(
                MessageIntent.AGENT_STATUS, {"message": "Team meeting at 3 PM"}, department="marketing"
            )
            round_trips = executive.broker.stats.round_trips - before
            delivered = [agent for agent, result in results.items() if not isinstance(result, Exception)]
            outcome.ok = len(results) == 4 and len(delivered) == 4
            outcome.rows += [
                ("delivered to", ", ".join(sorted(delivered))),
                ("round trips", f"{round_trips} (discovery, then one pipeline for all inboxes)"),
            ]

        async def department_status(outcome: Outcome) -> None:
            status = await dashboard.exec_request_department_status("marketing")
            outcome.ok = status["online_agents"] == 4 and status["answered"] == 4
            outcome.rows.append(("online / answered", f"{status['online_agents']} / {status['answered']}"))
            for agent in status["agents"]:
                data = (agent["response"] or {}).get("data") or {}
                outcome.rows.append(
                    (agent["agent_id"], f"{agent['role']}: {data.get('state')}, heard: {data.get('last_announcement')}")
                )

        async def discovery(outcome: Outcome) -> None:
            queries: list[tuple[str, dict[str, Any], int]] = [
                ("role=cso", {"role": "cso"}, 1),
                ("department=marketing", {"department": "marketing"}, 4),
                ("capability=content_creation", {"capability": "content_creation"}, 1),
                ("intent=assign_task", {"intent": MessageIntent.ASSIGN_TASK}, 6),
                ("online_only", {"online_only": True}, 6),
            ]
            outcome.ok = True
            for label, filters, expected in queries:
                found = [a.agent_id for a in await executive.discover_agents(**filters)]
                outcome.ok &= len(found) == expected
                outcome.rows.append((label, ", ".join(found) or "(none)"))

        return [
            await _timed(Outcome("CMO dashboard asks the CSO's agent for sales data"), sales_data),
            await _timed(Outcome("CMO's agent collaborates with the CSO's agent"), collaboration),
            await _timed(Outcome("Executive broadcasts to the marketing department"), broadcast),
            await _timed(Outcome("Executive asks for the marketing department's status"), department_status),
            await _timed(Outcome("Discovery by role, department, capability, intent"), discovery),
        ]


def _report(console: Console, outcomes: list[Outcome]) -> None:
    for number, outcome in enumerate(outcomes, 1):
        mark = "[green]answered[/]" if outcome.ok else "[red]FAILED[/]"
        table = Table(
            title=f"{number}. {outcome.title} — {mark} in {outcome.ms:.0f} ms", title_justify="left", show_header=False
        )
        table.add_column("", style="bold", no_wrap=True)
        table.add_column("")
        for key, value in outcome.rows:
            table.add_row(key, value)
        console.print(table)
    answered = sum(o.ok for o in outcomes)
    colour = "green" if answered == len(outcomes) else "red"
    console.print(f"[bold {colour}]{answered} of {len(outcomes)} scenarios answered[/]")


async def run_demo(settings: Settings, console: Console) -> bool:
    """Run the whole demo; ``True`` if every scenario was answered."""
    folder = Path(tempfile.mkdtemp(prefix="agentcomms-demo-"))
    try:
        configs = create_startup_config()
        config_path = save_startup_config(folder / "startup_agents.json", configs)
        async with _redis(settings, folder) as url:
            console.print(f"[bold]agentcomms demo[/] — Redis at {url}")
            started = time.perf_counter()
            async with _team(url, config_path, [c.agent_id for c in configs]):
                console.print(
                    f"{len(configs)} digital twins online, each in its own process "
                    f"({time.perf_counter() - started:.1f}s): " + ", ".join(f"{c.agent_id} ({c.role})" for c in configs)
                )
                outcomes = await _play(url, settings)
        _report(console, outcomes)
        return all(o.ok for o in outcomes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
