"""The ``agentcomms`` command: thin wrappers that parse, build settings and call the library.

Exit codes: 0 success; 1 the agent answered with an error, or another failure;
2 bad input or config; 3 no such agent / none online for the role; 4 timeout;
5 Redis unreachable.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from agentcomms.agent import BaseAgent
from agentcomms.broker import MessageBroker
from agentcomms.demo import run_demo
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerConnectionError,
    ConfigError,
    MessageValidationError,
    NoAgentAvailableError,
    RegistrationError,
    RequestTimeoutError,
)
from agentcomms.registry import AgentRegistry
from agentcomms.schemas import AgentInfo, AgentResponse, export_json_schemas
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings, load_agents_config

app = typer.Typer(
    help="Messaging for digital-twin agents over Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
dlq_app = typer.Typer(help="Dead letters: list, show, redrive, purge.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
console = Console()
errors = Console(stderr=True)

T = TypeVar("T")

_EXIT_CODES: list[tuple[type[AgentCommsError], int]] = [
    (BrokerConnectionError, 5),
    (RequestTimeoutError, 4),
    (NoAgentAvailableError, 3),
    (AgentNotFoundError, 3),
    (ConfigError, 2),
    (MessageValidationError, 2),
    (RegistrationError, 2),
]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; an AgentCommsError becomes a one-line message and its exit code."""
    try:
        return asyncio.run(coro)
    except AgentCommsError as exc:
        errors.print(f"[bold red]error:[/] {exc}")
        code = next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), 1)
        raise typer.Exit(code) from exc


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(message)s", handlers=[RichHandler(console=errors, show_path=False)]
    )


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        errors.print(f"[bold red]error:[/] invalid settings in the environment: {exc}")
        raise typer.Exit(2) from exc


# -- demo ----------------------------------------------------------------------------------


@app.command()
def demo() -> None:
    """Run a startup's digital-twin team, each agent in its own process, through the seed's scenarios."""
    if not _run(run_demo(_settings(), console)):
        raise typer.Exit(1)


# -- run-agent -----------------------------------------------------------------------------


def _agent_class(path: str) -> type[BaseAgent]:
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load agent class {path!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, BaseAgent)):
        raise ConfigError(f"{path!r} is not a BaseAgent subclass")
    return found


@app.command("run-agent")
def run_agent(
    config: Annotated[Path, typer.Option("--config", "-c", help='JSON file in the seed\'s {"agents": [...]} format.')],
    agent_id: Annotated[list[str] | None, typer.Option("--agent-id", help="Run only these agents of the file.")] = None,
    agent_class: Annotated[
        str, typer.Option("--class", help="module:Class of the agents (a BaseAgent subclass).")
    ] = "agentcomms.examples:TwinAgent",
) -> None:
    """Run agents from a config file until SIGINT or SIGTERM (REDIS_URL overrides the file's redis_url)."""
    _run(_run_agents(config, agent_id or [], agent_class))


async def _run_agents(config: Path, only: list[str], agent_class: str) -> None:
    selected = load_agents_config(config).agents
    if only:
        unknown = sorted(set(only) - {a.agent_id for a in selected})
        if unknown:
            raise ConfigError(f"no agent {', '.join(unknown)} in the file", path=str(config))
        selected = [a for a in selected if a.agent_id in only]
    if not selected:
        raise ConfigError("the file lists no agents", path=str(config))
    cls = _agent_class(agent_class)
    settings = _settings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with MessageBroker(settings.redis_url or selected[0].redis_url, settings=settings) as broker:
        agents = [cls(agent, broker=broker) for agent in selected]
        started: list[BaseAgent] = []
        try:
            for agent in agents:
                started.append(await agent.initialize())
            sys.stdout.write("READY " + " ".join(a.agent_id for a in agents) + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            for agent in reversed(started):
                await agent.shutdown()


# -- agents, ask, tail ---------------------------------------------------------------------


def _agents_table(found: list[AgentInfo]) -> Table:
    table = Table(title=f"{len(found)} agents")
    for column in ("agent id", "role", "department", "status", "instances", "capabilities", "last seen"):
        table.add_column(column)
    for agent in found:
        colour = {"online": "green", "busy": "yellow"}.get(str(agent.status), "red")
        last_seen = agent.last_seen.astimezone().strftime("%H:%M:%S") if agent.last_seen else "-"
        table.add_row(
            agent.agent_id, agent.role, agent.department, f"[{colour}]{agent.status}[/]",
            str(agent.instance_count), ", ".join(agent.capabilities), last_seen,
        )  # fmt: skip
    return table


@app.command()
def agents(
    role: Annotated[str | None, typer.Option(help="Only this role.")] = None,
    department: Annotated[str | None, typer.Option(help="Only this department.")] = None,
    capability: Annotated[list[str] | None, typer.Option(help="Only agents with this capability (repeatable).")] = None,
    intent: Annotated[str | None, typer.Option(help="Only agents handling this intent.")] = None,
    online: Annotated[bool, typer.Option("--online", help="Only online agents.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List registered agents, filtered like discover_agents()."""

    async def find() -> list[AgentInfo]:
        async with AgentRegistry(settings=_settings()) as registry:
            return await registry.discover_agents(
                role=role, department=department, capability=capability, intent=intent, online_only=online
            )

    found = _run(find())
    if as_json:
        sys.stdout.write(json.dumps([a.model_dump(mode="json") for a in found], indent=2) + "\n")
    else:
        console.print(_agents_table(found))


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="What to ask (sent as data.query).")],
    to: Annotated[str | None, typer.Option("--to", help="Agent id to ask.")] = None,
    role: Annotated[str | None, typer.Option("--role", help="Ask an online agent with this role.")] = None,
    intent: Annotated[str, typer.Option(help="Intent of the request.")] = "request_knowledge",
    data: Annotated[str | None, typer.Option(help="More data, as a JSON object.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reply as JSON.")] = False,
) -> None:
    """Send a request to an agent (by id or by role) and print its reply."""
    if (to is None) == (role is None):
        raise typer.BadParameter("give exactly one of --to AGENT_ID or --role ROLE")
    extra: dict[str, Any] = {}
    if data:
        try:
            extra = json.loads(data)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--data is not JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise typer.BadParameter("--data must be a JSON object")
    payload = {"query": question, **extra}

    async def send() -> AgentResponse:
        async with MessageSender(sender_id="cli", settings=_settings()) as sender:
            if role is not None:
                return await sender.request_role(role, intent, payload, timeout=timeout)
            assert to is not None
            return await sender.request(to, intent, payload, timeout=timeout)

    reply = _run(send())
    if as_json:
        sys.stdout.write(reply.model_dump_json(indent=2) + "\n")
    elif reply.success:
        console.print(f"[green]{reply.responder_id}[/] answered:")
        console.print_json(json.dumps(reply.data, default=str))
    else:
        errors.print(f"[bold red]{reply.responder_id} answered with an error:[/] {reply['error']}")
    if not reply.success:
        raise typer.Exit(1)


@app.command()
def tail(
    agent: Annotated[str | None, typer.Option(help="Only messages from or to this agent.")] = None,
    count: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
) -> None:
    """Follow the live message feed (sent, handled, dead-lettered). Lossy: for watching, not auditing."""

    async def follow() -> None:
        seen = 0
        async with MessageBroker(settings=_settings(), client_name="tail") as broker:
            async for event in broker.events():
                kind = event.get("event")
                if kind in ("subscribed", "resubscribed"):
                    errors.print(f"[dim]{kind} to the event feed on {broker.url}[/]")
                    continue
                if agent and agent not in (event.get("sender_id"), event.get("recipient_id")):
                    continue
                when = datetime.fromtimestamp(float(event.get("ts", 0))).strftime("%H:%M:%S.%f")[:-3]
                reason = f" ({event['reason']})" if event.get("reason") else ""
                console.print(
                    f"{when} {kind:<13} {event.get('sender_id')} → {event.get('recipient_id')} "
                    f"{event.get('intent')} {str(event.get('message_id'))[:8]}{reason}",
                    highlight=False,
                )
                seen += 1
                if count is not None and seen >= count:
                    return

    try:
        _run(follow())
    except KeyboardInterrupt:
        pass


# -- dead letters --------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(agent: Annotated[str | None, typer.Argument(help="Agent id; all agents if omitted.")] = None) -> None:
    """Agents with dead letters, or one agent's dead letters."""

    async def collect() -> Table:
        async with MessageBroker(settings=_settings(), client_name="dlq") as broker:
            if agent is None:
                table = Table(title="dead letters by agent")
                table.add_column("agent id")
                table.add_column("dead letters")
                for agent_id in await broker.dead_letter_agents():
                    table.add_row(agent_id, str(len(await broker.dead_letters(agent_id, count=100_000))))
                return table
            table = Table(title=f"dead letters of {agent}")
            for column in ("entry id", "deliveries", "from", "intent", "reason"):
                table.add_column(column)
            for letter in await broker.dead_letters(agent, count=1000):
                message = letter.message
                table.add_row(
                    letter.entry_id, str(letter.deliveries), message.sender_id if message else "-",
                    str(message.intent) if message else "-", letter.reason,
                )  # fmt: skip
            return table

    console.print(_run(collect()))


@dlq_app.command("show")
def dlq_show(agent: str, entry_id: str) -> None:
    """One dead letter in full, as JSON."""

    async def find() -> dict[str, Any]:
        async with MessageBroker(settings=_settings(), client_name="dlq") as broker:
            for letter in await broker.dead_letters(agent, count=100_000):
                if letter.entry_id == entry_id:
                    message = letter.message
                    return {
                        "entry_id": letter.entry_id,
                        "reason": letter.reason,
                        "deliveries": letter.deliveries,
                        "source_id": letter.source_id,
                        "message": message.model_dump(mode="json") if message else None,
                        "payload": None if message else letter.payload.decode(errors="replace"),
                        "raw": letter.raw,
                    }
        raise AgentNotFoundError(f"{agent} (no dead letter {entry_id})")

    console.print_json(json.dumps(_run(find())))


@dlq_app.command("redrive")
def dlq_redrive(
    agent: str,
    entry_id: Annotated[str | None, typer.Argument(help="Entry id; all with --all.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Redrive every dead letter of the agent.")] = False,
) -> None:
    """Send dead letters back into the agent's inbox."""
    if (entry_id is None) == (not all_):
        raise typer.BadParameter("give an entry id or --all")

    async def redrive() -> tuple[int, list[str]]:
        async with MessageBroker(settings=_settings(), client_name="dlq") as broker:
            ids = [entry_id] if entry_id else [d.entry_id for d in await broker.dead_letters(agent, count=100_000)]
            done, skipped = 0, []
            for one in ids:
                try:
                    await broker.redrive_dead_letter(agent, one)
                    done += 1
                except AgentCommsError as exc:
                    if entry_id:
                        raise
                    skipped.append(f"{one}: {exc}")
            return done, skipped

    done, skipped = _run(redrive())
    console.print(f"redriven: {done}")
    for line in skipped:
        errors.print(f"[yellow]skipped[/] {line}")


@dlq_app.command("purge")
def dlq_purge(
    agent: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False
) -> None:
    """Delete all dead letters of an agent."""
    if not yes and not typer.confirm(f"delete every dead letter of {agent}?"):
        raise typer.Exit(1)

    async def purge() -> int:
        async with MessageBroker(settings=_settings(), client_name="dlq") as broker:
            return await broker.purge_dead_letters(agent)

    console.print(f"purged: {_run(purge())}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of every message type."""
    sys.stdout.write(json.dumps(export_json_schemas(), indent=2) + "\n")


def main() -> None:
    """Entry point of the ``agentcomms`` script."""
    app()
