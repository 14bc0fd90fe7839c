"""``agentcomms ask``: send a request to an agent, by id or by role, and print its reply."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from agentcomms.cli._common import console, errors, esc, load_settings, run
from agentcomms.schemas import AgentResponse
from agentcomms.sender import MessageSender


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
        async with MessageSender(sender_id="cli", settings=load_settings()) as sender:
            if role is not None:
                return await sender.request_role(role, intent, payload, timeout=timeout)
            assert to is not None
            return await sender.request(to, intent, payload, timeout=timeout)

    reply = run(send())
    if as_json:
        sys.stdout.write(reply.model_dump_json(indent=2) + "\n")
    elif reply.success:
        console.print(f"[green]{esc(reply.responder_id)}[/] answered:")
        console.print_json(json.dumps(reply.data, default=str))
    else:
        error = reply.error
        detail = f"{error.code}: {error.message}" if error and error.message else (error.code if error else "?")
        errors.print(f"[bold red]{esc(reply.responder_id)} answered with an error:[/] {esc(detail)}", soft_wrap=True)
    if not reply.success:
        raise typer.Exit(1)
