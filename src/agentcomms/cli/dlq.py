"""``agentcomms dlq``: list, show, redrive and purge dead letters."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from agentcomms.broker import MessageBroker
from agentcomms.cli._common import (
    LogLevelOption,
    check_agent_id,
    check_entry_id,
    configure_logging,
    console,
    errors,
    esc,
    fail,
    load_settings,
    open_broker,
    plural,
    run,
)
from agentcomms.exceptions import AgentCommsError, AgentNotFoundError
from agentcomms.registry import AgentRegistry

dlq_app = typer.Typer(help="Dead letters: list, show, redrive, purge.", no_args_is_help=True)


AgentArgument = Annotated[str, typer.Argument(help="Agent id.", callback=check_agent_id)]
EntryArgument = Annotated[str, typer.Argument(help="Entry id (see dlq list AGENT).", callback=check_entry_id)]

_SHOWN = 1000
"""Dead letters one listing shows, the oldest first."""
_PAGE = 500
"""Dead letters read at a time by ``redrive --all``."""


async def _all_entry_ids(broker: MessageBroker, agent: str) -> list[str]:
    ids: list[str] = []
    while page := await broker.dead_letters(agent, count=_PAGE, after=ids[-1] if ids else None):
        ids += [letter.entry_id for letter in page]
    return ids


@dlq_app.callback()
def _dlq(log_level: LogLevelOption = None) -> None:
    configure_logging(log_level)


@dlq_app.command("list")
def dlq_list(
    agent: Annotated[
        str | None, typer.Argument(help="Agent id; all agents if omitted.", callback=check_agent_id)
    ] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Agents with dead letters, or one agent's dead letters."""
    configure_logging(log_level)
    settings = load_settings()

    async def collect() -> Table:
        async with open_broker(settings, client_name="dlq") as broker:
            if agent is None:
                agent_ids = await broker.dead_letter_agents()
                table = Table(title=f"{plural(len(agent_ids), 'agent')} with dead letters")
                table.add_column("agent id")
                table.add_column("dead letters")
                for agent_id in agent_ids:
                    table.add_row(Text(agent_id), str(await broker.count_dead_letters(agent_id)))
                return table
            letters = await broker.dead_letters(agent, count=_SHOWN)
            if not letters:
                try:
                    await AgentRegistry(broker).get_agent(agent)
                except AgentNotFoundError:
                    raise fail(f"agent {agent!r} is not registered and has no dead letters", 3) from None
            counted = plural(len(letters), "dead letter")
            if len(letters) == _SHOWN:
                counted = f"the oldest {counted}"
            table = Table(title=f"{counted} of {esc(agent)}")
            for column in ("entry id", "deliveries", "from", "intent", "reason"):
                table.add_column(column)
            for letter in letters:
                message = letter.message
                table.add_row(  # Text: a reason or a sender id is printed as stored, never read as markup
                    Text(letter.entry_id), str(letter.deliveries), Text(message.sender_id if message else "-"),
                    Text(str(message.intent) if message else "-"), Text(letter.reason),
                )  # fmt: skip
            return table

    console.print(run(collect()))


@dlq_app.command("show")
def dlq_show(agent: AgentArgument, entry_id: EntryArgument, log_level: LogLevelOption = None) -> None:
    """One dead letter in full, as JSON."""
    configure_logging(log_level)
    settings = load_settings()

    async def find() -> dict[str, Any]:
        async with open_broker(settings, client_name="dlq") as broker:
            letter = await broker.get_dead_letter(agent, entry_id)
        shown = letter.as_dict()
        del shown["agent_id"]
        return shown

    console.print_json(json.dumps(run(find())))


@dlq_app.command("redrive")
def dlq_redrive(
    agent: AgentArgument,
    entry_id: Annotated[
        str | None, typer.Argument(help="Entry id; all with --all.", callback=check_entry_id, show_default=False)
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Redrive every dead letter of the agent.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Send dead letters back into the agent's inbox."""
    configure_logging(log_level)
    if (entry_id is None) == (not all_):
        raise typer.BadParameter("give an entry id or --all")
    settings = load_settings()

    async def redrive() -> tuple[int, list[str]]:
        async with open_broker(settings, client_name="dlq") as broker:
            ids = [entry_id] if entry_id else await _all_entry_ids(broker, agent)
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

    done, skipped = run(redrive())
    console.print(f"redriven: {plural(done, 'dead letter')}")
    for line in skipped:
        errors.print(f"[yellow]skipped[/] {esc(line)}", soft_wrap=True)


@dlq_app.command("purge")
def dlq_purge(
    agent: AgentArgument,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Delete all dead letters of an agent."""
    configure_logging(log_level)
    settings = load_settings()
    if not yes and not typer.confirm(f"delete every dead letter of {agent}?"):
        raise typer.Exit(1)

    async def purge() -> int:
        async with open_broker(settings, client_name="dlq") as broker:
            return await broker.purge_dead_letters(agent)

    console.print(f"purged: {plural(run(purge()), 'dead letter')}")
