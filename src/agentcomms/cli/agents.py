"""``agentcomms agents``: list and discover registered agents."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from agentcomms.cli._common import (
    LogLevelOption,
    configure_logging,
    console,
    load_settings,
    open_broker,
    plural,
    run,
    write_out,
)
from agentcomms.registry import AgentRegistry
from agentcomms.schemas import AgentInfo


def _agents_table(found: list[AgentInfo]) -> Table:
    table = Table(title=plural(len(found), "agent"))
    for column in ("agent id", "role", "department", "status", "instances", "capabilities", "last seen"):
        table.add_column(column)
    for agent in found:
        colour = {"online": "green", "busy": "yellow"}.get(str(agent.status), "red")
        last_seen = agent.last_seen.astimezone().strftime("%H:%M:%S") if agent.last_seen else "-"
        table.add_row(  # Text, not str: names are printed as stored, never read as markup
            Text(agent.agent_id), Text(agent.role), Text(agent.department), Text(str(agent.status), style=colour),
            str(agent.instance_count), Text(", ".join(agent.capabilities)), last_seen,
        )  # fmt: skip
    return table


def agents(
    role: Annotated[str | None, typer.Option(help="Only this role.")] = None,
    department: Annotated[str | None, typer.Option(help="Only this department.")] = None,
    capability: Annotated[list[str] | None, typer.Option(help="Only agents with this capability (repeatable).")] = None,
    intent: Annotated[str | None, typer.Option(help="Only agents handling this intent.")] = None,
    online: Annotated[bool, typer.Option("--online", help="Only online agents.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """List registered agents, filtered like discover_agents()."""
    configure_logging(log_level)
    settings = load_settings()

    async def find() -> list[AgentInfo]:
        async with open_broker(settings) as broker:
            return await AgentRegistry(broker).discover_agents(
                role=role, department=department, capability=capability, intent=intent, online_only=online
            )

    found = run(find())
    if as_json:
        write_out(json.dumps([a.model_dump(mode="json") for a in found], indent=2) + "\n")
    else:
        console.print(_agents_table(found))
