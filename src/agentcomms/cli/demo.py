"""``agentcomms demo``: the seed's scenarios played by a team of twins, each in its own process."""

from __future__ import annotations

import typer

from agentcomms.cli._common import LogLevelOption, configure_logging, console, errors, load_settings, open_broker, run
from agentcomms.demo import run_demo
from agentcomms.settings import Settings


async def _demo(settings: Settings) -> bool:
    if settings.redis_url:  # unreachable: exit code 5 now, not a failed start of six agent processes
        async with open_broker(settings, client_name="demo"):
            pass
    else:
        errors.print("[dim]redis: the demo's own embedded server, in a temporary folder[/]", highlight=False)
    return await run_demo(settings, console)


def demo(log_level: LogLevelOption = None) -> None:
    """Run a startup's digital-twin team, each agent in its own process, through the seed's scenarios."""
    configure_logging(log_level)
    if not run(_demo(load_settings())):
        raise typer.Exit(1)
