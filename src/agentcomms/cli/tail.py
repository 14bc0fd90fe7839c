"""``agentcomms tail``: follow the live message feed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

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
    run,
)


def tail(
    agent: Annotated[
        str | None, typer.Option(help="Only messages from or to this agent.", callback=check_agent_id)
    ] = None,
    count: Annotated[int | None, typer.Option(help="Stop after this many events.", min=1)] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Follow the live message feed (sent, handled, dead-lettered). Lossy: for watching, not auditing."""
    configure_logging(log_level)
    settings = load_settings()

    async def follow() -> None:
        seen = 0
        async with open_broker(settings, client_name="tail") as broker:
            async for event in broker.events():
                kind = event.get("event")
                if kind in ("subscribed", "resubscribed"):
                    errors.print(f"[dim]{kind} to the event feed[/]")
                    continue
                if agent and agent not in (event.get("sender_id"), event.get("recipient_id")):
                    continue
                when = datetime.fromtimestamp(float(event.get("ts", 0))).strftime("%H:%M:%S.%f")[:-3]
                reason = f" ({event['reason']})" if event.get("reason") else ""
                line = (
                    f"{when} {kind:<13} {event.get('sender_id')} → {event.get('recipient_id')} "
                    f"{event.get('intent')} {str(event.get('message_id'))[:8]}{reason}"
                )
                console.print(esc(line), highlight=False, soft_wrap=True)
                seen += 1
                if count is not None and seen >= count:
                    return

    try:
        run(follow())
    except KeyboardInterrupt:
        pass
