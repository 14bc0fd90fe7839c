"""The demo: a startup's digital-twin team, each agent in its own process, playing the seed's scenarios.

``agentcomms demo`` (or ``python demo.py``) starts an embedded redis-server in a temporary
folder (unless ``REDIS_URL`` is set), runs the CMO, CSO, CTO, marketing manager, content
and SEO twins as separate ``agentcomms run-agent`` processes, then plays: a CMO dashboard
request for sales data, CMO-CSO agent-to-agent collaboration, a department broadcast,
an executive's department status, discovery queries, security, and knowledge: a knowledge
service process ingests the shipped Halcyon Robotics corpus, and the CMO's and the content
agent's twins answer the same question from the documents each role may read. It prints a
report and returns whether every scenario was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

from agentcomms import keys
from agentcomms.broker import MessageBroker
from agentcomms.deadletters import count_dead_letters, list_dead_letters
from agentcomms.embedded import EmbeddedRedis
from agentcomms.examples.config import create_startup_config, save_startup_config
from agentcomms.examples.dashboard import DashboardInterface
from agentcomms.exceptions import AgentCommsError
from agentcomms.record import RecordedMessage
from agentcomms.schemas import AgentMessage, MessageIntent
from agentcomms.security import create_admin, enrol_team
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings

__all__ = ["run_demo"]

_PEOPLE = [("dashboard.cmo", ["cmo"]), ("exec.ceo", ["ceo"]), ("dashboard.intern", ["intern"])]
"""The people's tools the demo process speaks as (the twins are enrolled with their configured roles)."""

_KNOWLEDGE = "knowledge"
"""The knowledge service's agent id (and its identity)."""

_KNOWLEDGE_GRANTS = {
    "ceo": ["executive", "marketing", "sales", "product", "content", "seo", "engineering"],
    "cso": ["executive", "sales"],
    "cto": ["executive", "product", "engineering"],
}
"""Added to the seed's table (CMO, marketing manager, content agent, SEO agent) for the demo's other roles."""

_POLICY = {
    "default": "allow",
    "rules": [{"intents": ["assign_task"], "to_roles": ["cto"], "from_roles": ["ceo", "cmo", "cso", "cto"]}],
}


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


async def _enrol(url: str, folder: Path, team: list[tuple[str, list[str]]]) -> Path:
    """Make an admin and an identity for each twin and each person's tool, enrolled with their roles.

    Each process gets a folder of its own, ``identities/<id>``, holding its identity and the
    admin's public key (``trust_anchors``); the demo process's is ``identities/people``.
    Returns the policy file.
    """
    base = folder / "identities"
    admin = create_admin(base / "admin", "admin.demo")
    async with MessageBroker(settings=Settings(redis_url=url), client_name="demo.admin") as broker:
        await enrol_team(broker.pipeliner, base / "new", admin, [*team, *_PEOPLE, (_KNOWLEDGE, ["knowledge_service"])])
    anchors = (base / "admin" / "trust_anchors").read_text()
    people = {identity_id for identity_id, _ in _PEOPLE}
    for identity_id, _ in [*team, *_PEOPLE, (_KNOWLEDGE, [])]:
        own = base / ("people" if identity_id in people else identity_id)
        own.mkdir(mode=0o700, exist_ok=True)
        (base / "new" / f"{identity_id}.json").rename(own / f"{identity_id}.json")
        (own / "trust_anchors").write_text(anchors)
    policy = folder / "policy.json"
    policy.write_text(json.dumps(_POLICY, indent=2))
    (folder / "knowledge_permissions.json").write_text(json.dumps({"roles": _KNOWLEDGE_GRANTS}, indent=2))
    return policy


def _secure_env(folder: Path, identity_folder: str, policy: Path) -> dict[str, str]:
    """The environment of a process that speaks as the identities in ``identities/<identity_folder>``."""
    return {
        "AGENTCOMMS_SECURITY": "on",
        "AGENTCOMMS_IDENTITY_DIR": str(folder / "identities" / identity_folder),
        "AGENTCOMMS_POLICY": str(policy),
        "AGENTCOMMS_RECORD": "true",  # the dashboard shows the team's conversations
    }


@contextlib.asynccontextmanager
async def _team(
    url: str, config: Path, agent_ids: list[str], policy: Path
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    env = {**os.environ, "REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    log = config.parent / "agents.log"  # what the agents print on stderr: shown only if one fails to start
    with log.open("ab") as sink:
        processes = await _start_team(config, agent_ids, env, sink.fileno(), policy)
        processes.append(await _start_knowledge(config.parent, env, sink.fileno(), policy))
    names = [*agent_ids, _KNOWLEDGE]
    try:
        async with asyncio.timeout(120):  # the knowledge service ingests the corpus first (~10 s)
            for process, agent_id in zip(processes, names, strict=True):
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
    config: Path, agent_ids: list[str], env: dict[str, str], stderr: int, policy: Path
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
            env={**env, **_secure_env(config.parent, agent_id, policy)},
        )  # fmt: skip
        for agent_id in agent_ids
    ]


async def _start_knowledge(folder: Path, env: dict[str, str], stderr: int, policy: Path) -> asyncio.subprocess.Process:
    """``agentcomms knowledge serve``, ingesting the shipped corpus first, as the ``knowledge`` identity."""
    corpus = Path(__file__).parent / "examples" / "knowledge" / "corpus"
    knowledge_env = {
        "AGENTCOMMS_KNOWLEDGE_DIR": str(folder / "knowledge"),
        "AGENTCOMMS_KNOWLEDGE_PERMISSIONS": str(folder / "knowledge_permissions.json"),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentcomms", "knowledge", "serve", "--ingest", str(corpus),
        stdout=asyncio.subprocess.PIPE, stderr=stderr,
        env={**env, **_secure_env(folder, _KNOWLEDGE, policy), **knowledge_env},
    )  # fmt: skip


async def _timed(outcome: Outcome, scenario: Callable[[Outcome], Awaitable[None]]) -> Outcome:
    started = time.perf_counter()
    try:
        await scenario(outcome)
    except AgentCommsError as exc:
        outcome.ok = False
        outcome.rows.append(("error", str(exc)))
    outcome.ms = (time.perf_counter() - started) * 1000
    return outcome


async def _knowledge(executive: MessageSender, outcome: Outcome) -> None:
    """The CEO asks the CMO's and the content agent's twins the same question, answered from the documents."""
    question = "What is the secret name for the deal to buy the camera startup?"
    answers: dict[str, list[dict[str, Any]]] = {}
    for twin in ("agent.cmo.john", "agent.sarah"):
        reply = await executive.request(twin, "request_knowledge", {"query": question, "from_documents": True})
        found = reply.data.get("results", []) if reply.success and isinstance(reply.data, dict) else []
        answers[twin] = found
        shown = "; ".join(f"{r['domain']}: {r['source']['title']}" for r in found[:3]) or _short(reply.get("error"))
        outcome.rows.append((f"{twin} answers the CEO from", shown))
    cmo_knows = any("Project Nightjar" in r["text"] for r in answers["agent.cmo.john"])
    content_knows = any("Project Nightjar" in r["text"] for r in answers["agent.sarah"])
    outcome.rows.append(
        ("the codename (executive domain)", f"CMO's twin: {'found' if cmo_knows else 'not found'}; "
         f"content agent's twin: {'found' if content_knows else 'not found (not its domain)'}")
    )  # fmt: skip
    outcome.ok = cmo_knows and not content_knows and bool(answers["agent.sarah"])


async def _play(url: str, settings: Settings, folder: Path, policy: Path) -> list[Outcome]:
    demo_settings = settings.model_copy(
        update={
            "redis_url": url, "security": "on", "identity_dir": folder / "identities" / "people",
            "identity_file": None, "trust_anchors": [], "policy_file": policy,
        }
    )  # fmt: skip
    async with (
        DashboardInterface(dashboard_id="dashboard.cmo", settings=demo_settings, timeout=15) as dashboard,
        MessageSender(sender_id="exec.ceo", settings=demo_settings) as executive,
        MessageSender(sender_id="dashboard.intern", settings=demo_settings) as intern,
    ):

        async def sales_data(outcome: Outcome) -> None:
            reply = await dashboard.request_sales_data(
                requester_role="cmo",
                query="What's our current sales pipeline and Q4 forecast?",
                context={"priority": "high", "dashboard_request": True},
            )
            outcome.ok = reply.success and isinstance(reply.data, dict) and "pipeline" in reply.data
            outcome.rows += [("answered by", str(reply.responder_id)), ("data", _short(reply.data or reply["error"]))]

        asked: dict[str, str] = {}

        async def collaboration(outcome: Outcome) -> None:
            reply = await dashboard.request_from_role(
                "cmo", "Plan the Q4 campaign around the sales pipeline", requester_role="ceo",
                data={"collaborate_with": "cso"},
            )  # fmt: skip
            data = reply.data if reply.success and isinstance(reply.data, dict) else {}
            from_cso = data.get("from_cso")
            asked.update(message_id=reply.correlation_id or "", agent_id=reply.responder_id or "")
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
                ("online_only", {"online_only": True}, 7),  # the six twins and the knowledge service
            ]
            outcome.ok = True
            for label, filters, expected in queries:
                found = [a.agent_id for a in await executive.discover_agents(**filters)]
                outcome.ok &= len(found) == expected
                outcome.rows.append((label, ", ".join(found) or "(none)"))

        async def security(outcome: Outcome) -> None:
            secret = "board only: shortlist for the Q1 acquisition"
            sealed = await executive.request("agent.cso.jane", "request_knowledge", {"query": secret}, seal=True)
            aof = [p.read_bytes() for p in (folder / "redis").rglob("*.aof*") if p.is_file()]
            stored = any((sealed.correlation_id or "-").encode() in a for a in aof)  # the request is in the AOF
            in_aof = "yes" if any(secret.encode() in a for a in aof) else "no (it is there, sealed)"
            if not stored:
                in_aof = "not checked (an external Redis)"
            outcome.rows.append(
                ("sealed request, CEO to CSO's twin", f"answered: {sealed.success}; plaintext in the AOF: {in_aof}")
            )

            # someone with access to Redis, but not the CEO's keys, writes a message in the CEO's name
            forged = AgentMessage(sender_id="exec.ceo", recipient_id="agent.cso.jane", intent="assign_task")
            inbox = keys.inbox("agent.cso.jane")
            before = await count_dead_letters(executive.broker.pipeliner, "agent.cso.jane")
            await executive.broker.pipeliner.call("XADD", inbox, "*", "m", forged.model_dump_json(), replay=False)
            async with asyncio.timeout(10):
                while await count_dead_letters(executive.broker.pipeliner, "agent.cso.jane") == before:
                    await asyncio.sleep(0.05)
            letter = (await list_dead_letters(executive.broker.pipeliner, "agent.cso.jane"))[-1]
            outcome.rows.append(("forged message in the CEO's name", f"not handled, dead-lettered: {letter.reason}"))

            refused = await intern.request("agent.cto.raj", "assign_task", {"task_id": "T-1", "title": "rewrite auth"})
            accepted = await executive.request("agent.cto.raj", "assign_task", {"task_id": "T-2", "title": "hire SRE"})
            error = refused.error
            outcome.rows += [
                ("intern's tool assigns the CTO's twin a task", f"{error.code}: {error.message}" if error else "done"),
                ("CEO assigns the CTO's twin a task", "accepted" if accepted.success else str(accepted.error)),
            ]
            outcome.ok = (
                sealed.success and in_aof != "yes" and letter.reason.startswith("unauthenticated")
                and error is not None and error.code == "forbidden" and accepted.success
            )  # fmt: skip

        return [
            await _timed(Outcome("CMO dashboard asks the CSO's agent for sales data"), sales_data),
            await _timed(Outcome("CMO's agent collaborates with the CSO's agent"), collaboration),
            await _timed(Outcome("Executive broadcasts to the marketing department"), broadcast),
            await _timed(Outcome("Executive asks for the marketing department's status"), department_status),
            await _timed(Outcome("Discovery by role, department, capability, intent"), discovery),
            await _timed(Outcome("Security: sealed payloads, forged senders and the policy"), security),
            await _timed(
                Outcome("Knowledge: one question, answered from what each role may read"),
                functools.partial(_knowledge, executive),
            ),
            await _timed(
                Outcome("The record: scenario 2's conversation, every hop and where the time went"),
                functools.partial(_record, executive, asked),
            ),
        ]


async def _record(sender: MessageSender, asked: dict[str, str], outcome: Outcome) -> None:
    """Scenario 2's conversation as the record keeps it: each hop across agents, with its timings."""
    timeline = await _recorded_conversation(sender, asked.get("message_id", ""), asked.get("agent_id", ""))
    for number, hop in enumerate(timeline, 1):
        message, shown = hop.message, hop.as_dict()
        outcome.rows.append((
            f"{number}. {message.sender_id if message else '?'} → {hop.agent_id}",
            f"{message.intent if message else '?'}: {hop.outcome}; waited {shown['queued_ms'] or 0:g} ms in the "
            f"inbox, handled in {shown['handling_ms'] or 0:g} ms",
        ))  # fmt: skip
    outcome.ok = len(timeline) >= 2 and all(hop.outcome == "replied" for hop in timeline)
    if not timeline:
        outcome.rows.append(("record", "scenario 2's conversation is not in the record"))


async def _recorded_conversation(sender: MessageSender, message_id: str, agent_id: str) -> list[RecordedMessage]:
    """The conversation of a request answered by ``agent_id``, from the record ([] if it is not there in 5 s)."""
    record = sender.broker.record
    conversation: list[RecordedMessage] = []
    if not (message_id and agent_id):
        return conversation
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while len(conversation) < 2:  # each hop is recorded with its acknowledgement, a round trip after its reply
                found = await record.receipts(message_id, agent_id=agent_id)
                if found and found[-1].record_id:
                    conversation = await record.conversation(found[-1].conversation_id)
                if len(conversation) < 2:
                    await asyncio.sleep(0.05)
    return conversation


async def _serve_dashboard(
    url: str, settings: Settings, folder: Path, policy: Path, port: int, console: Console
) -> None:
    """The dashboard on the demo's Redis, as ``dashboard.cmo``, until SIGINT or SIGTERM."""
    from agentcomms.web.app import create_app
    from agentcomms.web.serve import serve

    as_cmo = settings.model_copy(
        update={
            "redis_url": url, "security": "on", "identity_dir": folder / "identities" / "people",
            "trust_anchors": [], "policy_file": policy,
            "identity_file": folder / "identities" / "people" / "dashboard.cmo.json",
        }
    )  # fmt: skip

    def ready(bound: int) -> None:
        console.print(f"[bold]dashboard[/] at http://127.0.0.1:{bound}/ (as dashboard.cmo); Ctrl-C stops the demo")

    await serve(create_app(as_cmo), "127.0.0.1", port, ready)


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


async def run_demo(settings: Settings, console: Console, *, dashboard_port: int | None = None) -> bool:
    """Run the whole demo; ``True`` if every scenario was answered.

    With ``dashboard_port`` the team stays up afterwards and the dashboard is served on
    127.0.0.1 at that port (0: any free one), as the CMO's dashboard identity, until SIGINT
    or SIGTERM.
    """
    folder = Path(tempfile.mkdtemp(prefix="agentcomms-demo-"))
    try:
        configs = create_startup_config()
        config_path = save_startup_config(folder / "startup_agents.json", configs)
        async with _redis(settings, folder) as url:
            console.print(f"[bold]agentcomms demo[/] — Redis at {url}")
            started = time.perf_counter()
            policy = await _enrol(url, folder, [(c.agent_id, [c.role]) for c in configs])
            console.print(
                f"security on: {len(configs) + len(_PEOPLE)} identities enrolled by admin.demo, each process holding "
                "only its own; every message and reply authenticated; only executives assign tasks to the CTO"
            )
            async with _team(url, config_path, [c.agent_id for c in configs], policy):
                console.print(
                    f"{len(configs)} digital twins and the knowledge service (77 documents ingested) online, "
                    "each in its own process "
                    f"({time.perf_counter() - started:.1f}s): " + ", ".join(f"{c.agent_id} ({c.role})" for c in configs)
                )
                outcomes = await _play(url, settings, folder, policy)
                _report(console, outcomes)
                if dashboard_port is not None:
                    await _serve_dashboard(url, settings, folder, policy, dashboard_port, console)
        return all(o.ok for o in outcomes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
