"""``agentcomms ask``: send a request to an agent, by id or by role, and print its reply."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agentcomms.cli._common import (
    LogLevelOption,
    check_agent_id,
    configure_logging,
    console,
    errors,
    esc,
    load_settings,
    open_broker,
    reported,
    run,
    write_out,
)
from agentcomms.schemas import AgentResponse
from agentcomms.security import speaking_as
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings

_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def read_data(value: str) -> dict[str, Any]:
    """The JSON object of ``--data``: given inline, ``@FILE`` or ``-`` (stdin).

    Raises:
        typer.BadParameter: the file cannot be read, or the text is not a JSON object (exit code 2).
    """
    source = ""  # how the messages name where the text came from; inline text is not repeated
    if value == "-":
        source, text = "stdin", sys.stdin.read()
    elif value.startswith("@"):
        source = value[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {source}: {exc.strerror}", param_hint="'--data'") from exc
        except UnicodeDecodeError as exc:
            raise typer.BadParameter(f"cannot read {source}: not UTF-8 text", param_hint="'--data'") from exc
    else:
        text = value
    try:
        found = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"(line {exc.lineno}, column {exc.colno}): {exc.msg}"
        raise typer.BadParameter(f"{source} is not JSON {where}".lstrip(), param_hint="'--data'") from exc
    if not isinstance(found, dict):
        kind = _JSON_TYPES.get(type(found), "null")
        problem = f"{source} must hold a JSON object, not {kind}" if source else f"must be a JSON object, not {kind}"
        raise typer.BadParameter(problem, param_hint="'--data'")
    return found


def ask(
    question: Annotated[str, typer.Argument(help="What to ask (sent as data.query).")],
    to: Annotated[str | None, typer.Option("--to", help="Agent id to ask.", callback=check_agent_id)] = None,
    role: Annotated[str | None, typer.Option("--role", help="Ask an online agent with this role.")] = None,
    intent: Annotated[str, typer.Option(help="Intent of the request.")] = "request_knowledge",
    data: Annotated[
        str | None, typer.Option(help="More data: a JSON object, @FILE to read it from a file, - from stdin.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reply as JSON.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Send a request to an agent (by id or by role) and print its reply."""
    configure_logging(log_level)
    if (to is None) == (role is None):
        raise typer.BadParameter("give exactly one of --to AGENT_ID or --role ROLE")
    payload = {"query": question, **(read_data(data) if data else {})}
    settings = load_settings()

    # with security on, the CLI asks as its identity (AGENTCOMMS_IDENTITY); its reply stream is named after it,
    # which is what its Redis ACL user may read (agentcomms acl)
    with reported():
        sender_id = _asker(settings)

    async def send() -> AgentResponse:
        async with (
            open_broker(settings, client_name=sender_id) as broker,
            MessageSender(sender_id=sender_id, broker=broker) as sender,
        ):
            if role is not None:
                return await sender.request_role(role, intent, payload, timeout=timeout)
            assert to is not None
            return await sender.request(to, intent, payload, timeout=timeout)

    reply = run(send())
    responder = esc(reply.responder_id or to or f"the {role} agent")
    if as_json:
        write_out(reply.model_dump_json(indent=2) + "\n")
    elif reply.success:
        console.print(f"[green]{responder}[/] answered:")
        console.print_json(json.dumps(reply.data, default=str))
    else:
        error = reply.error
        detail = f"{error.code}: {error.message}" if error and error.message else (error.code if error else "?")
        errors.print(f"[bold red]{responder} answered with an error:[/] {esc(detail)}", soft_wrap=True)
    if not reply.success:
        raise typer.Exit(1)


def _asker(settings: Settings) -> str:
    """Who the CLI asks as: ``cli``, or with security on the identity it holds (see ``speaking_as``)."""
    return speaking_as(settings, "cli")
