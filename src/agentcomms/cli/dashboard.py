"""``agentcomms dashboard``: the web dashboard (page, REST API, live events), served by uvicorn."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from agentcomms.cli._common import LogLevelOption, configure_logging, errors, esc, fail, load_settings, run, write_out
from agentcomms.settings import Settings


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dashboard(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default AGENTCOMMS_DASHBOARD_HOST).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default AGENTCOMMS_DASHBOARD_PORT; 0: any free one).")
    ] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Serve the dashboard on this machine until Ctrl-C / SIGTERM; prints its URL."""
    configure_logging(log_level)
    settings = load_settings()
    host = host or settings.dashboard_host
    port = settings.dashboard_port if port is None else port
    if not _loopback(host) and settings.dashboard_token is None:
        raise fail(f"listening on {host} (not this machine only) needs a token: set AGENTCOMMS_DASHBOARD_TOKEN", 2)
    run(_serve(settings, host, port))


async def _serve(settings: Settings, host: str, port: int) -> None:
    try:
        from agentcomms.web.app import create_app
        from agentcomms.web.serve import serve
    except ImportError as exc:
        raise fail(
            f"the dashboard needs the web extra: pip install 'agentcomms[web]' ({exc.name} is missing)", 2
        ) from None
    shown = f"[{host}]" if ":" in host else host

    def ready(bound: int) -> None:
        write_out(f"READY http://{shown}:{bound}/\n")
        errors.print(f"[dim]dashboard at http://{esc(shown)}:{bound}/ (Ctrl-C stops it)[/]", highlight=False)

    try:
        await serve(create_app(settings), host, port, ready)
    except OSError as exc:
        raise fail(f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}", 1) from None
