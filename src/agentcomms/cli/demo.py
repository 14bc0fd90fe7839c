"""``agentcomms demo``: the seed's scenarios played by a team of twins, each in its own process."""

from __future__ import annotations

import typer

from agentcomms.cli._common import LogLevelOption, configure_logging, console, load_settings, run
from agentcomms.demo import run_demo


def demo(log_level: LogLevelOption = None) -> None:
    """Run a startup's digital-twin team, each agent in its own process, through the seed's scenarios."""
    configure_logging(log_level)
    if not run(run_demo(load_settings(), console)):
        raise typer.Exit(1)
