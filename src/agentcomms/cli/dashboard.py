"""``agentcomms dashboard``: the web dashboard (page, REST API, live events), served by uvicorn."""

from __future__ import annotations

import asyncio
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
        import uvicorn

        from agentcomms.web.app import create_app
    except ImportError as exc:
        raise fail(
            f"the dashboard needs the web extra: pip install 'agentcomms[web]' ({exc.name} is missing)", 2
        ) from None
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)  # uvicorn has no "started" event to wait on
    if serving.done():
        await serving  # it could not start (the port is taken ...): its error
        raise fail(f"the dashboard could not listen on {host}:{port}", 1)
    bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
    shown = f"[{host}]" if ":" in host else host
    write_out(f"READY http://{shown}:{bound}/\n")
    errors.print(f"[dim]dashboard at http://{esc(shown)}:{bound}/ (Ctrl-C stops it)[/]", highlight=False)
    await serving
