"""The ``agentcomms`` command: thin wrappers that parse, build settings and call the library."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from agentcomms.broker import MessageBroker
from agentcomms.exceptions import AgentCommsError
from agentcomms.schemas import AgentMessage, AgentResponse, MessageIntent, MessagePayload, export_json_schemas
from agentcomms.settings import Settings

app = typer.Typer(
    help="Messaging for digital-twin agents over Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
errors = Console(stderr=True)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=errors, show_path=False)])


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(coro)
    except AgentCommsError as exc:
        errors.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    _configure_logging(log_level.upper())


@app.command()
def demo() -> None:
    """Start the embedded Redis (unless REDIS_URL is set) and round-trip one request to an agent."""
    _run(_demo())


async def _demo() -> None:
    settings = Settings()
    async with MessageBroker(settings=settings, client_name="demo") as broker:
        console.print(f"[bold]agentcomms demo[/] on {broker.url}")

        async def cso(message: AgentMessage) -> dict[str, Any]:
            return {"pipeline": "$2.4M", "q4_forecast": "$3.1M", "question": message.payload.data.get("query")}

        subscription = await broker.subscribe_to_agent("agent.cso.demo", cso)
        started = time.perf_counter()
        reply = await broker.request(
            AgentMessage(
                sender_id="dashboard.cmo",
                recipient_id="agent.cso.demo",
                intent=MessageIntent.REQUEST_KNOWLEDGE,
                payload=MessagePayload(data={"query": "What's our current sales pipeline and Q4 forecast?"}),
            ),
            timeout=10,
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        await subscription.stop()
        _print_reply(reply, elapsed_ms)
        if not reply.success:
            raise AgentCommsError(f"the demo agent answered with an error: {reply.error}")


def _print_reply(reply: AgentResponse, elapsed_ms: float) -> None:
    table = Table(title="dashboard.cmo → agent.cso.demo (request_knowledge)")
    table.add_column("field")
    table.add_column("value")
    table.add_row("success", str(reply.success))
    table.add_row("data", json.dumps(reply.data))
    table.add_row("responder", str(reply.responder_id))
    table.add_row("round trip", f"{elapsed_ms:.1f} ms")
    console.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of every message type."""
    sys.stdout.write(json.dumps(export_json_schemas(), indent=2) + "\n")


def main() -> None:
    """Entry point of the ``agentcomms`` script."""
    app()
