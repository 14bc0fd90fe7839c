"""``agentcomms redis status|stop``: the embedded redis-server of the data folder (when no ``REDIS_URL`` is set)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from agentcomms.cli._common import LogLevelOption, configure_logging, esc, load_settings, tilde, write_out
from agentcomms.cli._common import console as out
from agentcomms.embedded import embedded_status, stop_embedded

redis_app = typer.Typer(
    help="The embedded Redis of the data folder (AGENTCOMMS_DATA_DIR): status, stop.", no_args_is_help=True
)


@redis_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Which Redis the commands use: REDIS_URL, or the embedded server of the data folder (running or not)."""
    configure_logging(log_level)
    settings = load_settings()
    info: dict[str, object]
    if settings.redis_url:
        info = {"source": "REDIS_URL", "url": settings.redis_url, "running": None}
    else:
        found = embedded_status(settings.data_dir)
        info = {
            "source": "embedded",
            "data_dir": str(settings.data_dir),
            "running": found is not None,
            "url": found.url if found else None,
            "redis_pid": found.redis_pid if found else None,
            "supervisor_pid": found.supervisor_pid if found else None,
            "version": found.version if found else None,
        }
    if as_json:
        write_out(json.dumps(info, indent=2) + "\n")  # the URL is scrubbed of any password on the way out
        return
    if info["source"] == "REDIS_URL":
        out.print(f"REDIS_URL: {esc(info['url'])} (not managed by agentcomms)", highlight=False)
    elif info["running"]:
        out.print(
            f"embedded redis-server {esc(info['version'] or '')} running at {esc(info['url'])} "
            f"(pid {info['redis_pid']}, data in {esc(tilde(settings.data_dir))}); "
            "it stops when the last process using it ends",
            highlight=False,
        )
    else:
        out.print(
            f"no embedded redis-server running for {esc(tilde(settings.data_dir))}; "
            "the next command that needs one starts it",
            highlight=False,
        )


@redis_app.command("stop")
def stop(log_level: LogLevelOption = None) -> None:
    """Stop the embedded server now, even while agents use it (they reconnect to the next one)."""
    configure_logging(log_level)
    settings = load_settings()
    if settings.redis_url:
        out.print("REDIS_URL is set: agentcomms does not manage that server; nothing to stop", highlight=False)
        return
    stopped = stop_embedded(settings.data_dir)
    folder = esc(tilde(settings.data_dir))
    out.print(f"stopped the embedded redis-server of {folder}" if stopped else f"none running for {folder}")
