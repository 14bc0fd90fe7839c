"""The ``agentcomms`` command: thin wrappers that parse, build settings and call the library.

One module per command group; ``_common`` holds the consoles, logging, settings, the
broker and the runner that maps errors to exit codes; ``_secrets`` keeps the Redis
password out of everything the CLI writes.

Exit codes: 0 success; 1 the agent answered with an error, or another failure;
2 bad input or config, an unusable identity, no permission (not an admin; Redis NOPERM or
WRONGPASS), knowledge search not available (no service, the knowledge extra missing);
3 no such agent / none online for the role / no such dead letter / not in the trust store;
4 timeout; 5 Redis unreachable.

Errors are one line on stderr; so is ``redis: URL (where it comes from)`` for commands
that connect, so stdout holds only the result (``--json`` output stays parseable).
``--log-level`` (before or after the command, default ``LOG_LEVEL``, else WARNING) logs
to stderr through rich.
"""

from __future__ import annotations

from typing import Annotated

import typer

from agentcomms.cli._common import LogLevel, configure_logging
from agentcomms.cli.acl import acl_app
from agentcomms.cli.agents import agents
from agentcomms.cli.ask import ask
from agentcomms.cli.dashboard import dashboard
from agentcomms.cli.demo import demo
from agentcomms.cli.dlq import dlq_app
from agentcomms.cli.identity import identity_app
from agentcomms.cli.knowledge import knowledge_app
from agentcomms.cli.redis import redis_app
from agentcomms.cli.run import run_agent
from agentcomms.cli.schema import schema
from agentcomms.cli.tail import tail

__all__ = ["app", "main"]

app = typer.Typer(
    help="Messaging for digital-twin agents over Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main(
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level",
            envvar="LOG_LEVEL",
            case_sensitive=False,
            help="Log to stderr from this level up; also accepted after the command.",
        ),
    ] = LogLevel.WARNING,
) -> None:
    configure_logging(log_level)


app.command()(demo)
app.command("run-agent")(run_agent)
app.command()(agents)
app.command()(ask)
app.command()(tail)
app.command()(dashboard)
app.add_typer(dlq_app, name="dlq")
app.add_typer(redis_app, name="redis")
app.add_typer(identity_app, name="identity")
app.add_typer(acl_app, name="acl")
app.add_typer(knowledge_app, name="knowledge")
app.command()(schema)


def main() -> None:
    """Entry point of the ``agentcomms`` script."""
    app()
