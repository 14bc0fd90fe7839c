"""``agentcomms demo``: the seed's scenarios played by a team of twins, each in its own process."""

from __future__ import annotations

from typing import Annotated

import typer

from agentcomms.cli._common import LogLevelOption, configure_logging, console, errors, load_settings, open_broker, run
from agentcomms.demo import run_demo
from agentcomms.settings import Settings


async def _demo(settings: Settings, dashboard_port: int | None) -> bool:
    if settings.redis_url:  # unreachable: exit code 5 now, not a failed start of six agent processes
        async with open_broker(settings, client_name="demo"):
            pass
    else:
        errors.print("[dim]redis: the demo's own embedded server, in a temporary folder[/]", highlight=False)
    return await run_demo(settings, console, dashboard_port=dashboard_port)


def demo(
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="Keep the team up afterwards and serve the dashboard, until Ctrl-C.")
    ] = False,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="The dashboard's port (default 8765).")] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run a startup's digital-twin team, each agent in its own process, through the seed's scenarios."""
    configure_logging(log_level)
    settings = load_settings()
    dashboard_port = (settings.dashboard_port if port is None else port) if dashboard else None
    if not run(_demo(settings, dashboard_port)):
        raise typer.Exit(1)
