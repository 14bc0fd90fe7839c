"""``agentcomms run-agent``: serve the agents of a config file until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import signal
from pathlib import Path
from typing import Annotated

import typer

from agentcomms.agent import BaseAgent
from agentcomms.agent_metrics import AgentMetricsServer, require_prometheus, serve_agent_metrics
from agentcomms.cli._common import (
    LogLevelOption,
    configure_logging,
    errors,
    esc,
    fail,
    load_settings,
    open_broker,
    reported,
    run,
    write_out,
)
from agentcomms.exceptions import ConfigError
from agentcomms.health import HealthServer, serve_health
from agentcomms.settings import Settings, load_agents_config


def _agent_class(path: str) -> type[BaseAgent]:
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load agent class {path!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, BaseAgent)):
        raise ConfigError(f"{path!r} is not a BaseAgent subclass")
    return found


def run_agent(
    config: Annotated[Path, typer.Option("--config", "-c", help='JSON file in the seed\'s {"agents": [...]} format.')],
    agent_id: Annotated[list[str] | None, typer.Option("--agent-id", help="Run only these agents of the file.")] = None,
    agent_class: Annotated[
        str, typer.Option("--class", help="module:Class of the agents (a BaseAgent subclass).")
    ] = "agentcomms:BaseAgent",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            show_default=False,
            help="Serve the agents' Prometheus metrics on this port (0: any free one; default AGENTCOMMS_METRICS_PORT, "
            "else none); prints METRICS <url>.",
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Address the metrics listen on.")] = "127.0.0.1",
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            min=0,
            max=65535,
            show_default=False,
            help="Serve /healthz and /readyz on this port (0: any free one; default AGENTCOMMS_HEALTH_PORT, else "
            "none); prints HEALTH <url>.",
        ),
    ] = None,
    health_host: Annotated[
        str, typer.Option("--health-host", help="Address the health endpoints listen on (0.0.0.0 in a pod).")
    ] = "127.0.0.1",
    log_level: LogLevelOption = None,
) -> None:
    """Run agents from a config file until SIGINT or SIGTERM (REDIS_URL overrides the file's redis_url)."""
    configure_logging(log_level)
    settings = load_settings()
    port = settings.metrics_port if metrics_port is None else metrics_port
    metrics = None if port is None else (metrics_host, port)
    if metrics is not None:
        with reported():
            require_prometheus()
    port = settings.health_port if health_port is None else health_port
    health = None if port is None else (health_host, port)
    run(_run_agents(settings, config, agent_id or [], agent_class, metrics, health))


def _serve_metrics(agents: list[BaseAgent], host: str, port: int) -> AgentMetricsServer:
    """Serve the agents' metrics and print ``METRICS <url>`` on stdout."""
    try:
        server = serve_agent_metrics(agents, port=port, host=host)
    except OSError as exc:
        raise fail(f"the metrics cannot listen on {host}:{port}: {exc.strerror or exc}", 1) from None
    write_out(f"METRICS {server.url}\n")
    try:
        local = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        local = False
    if not local:
        errors.print(f"[dim]metrics at {esc(server.url)}: readable by anyone who can reach it[/]", highlight=False)
    return server


def _serve_health(agents: list[BaseAgent], host: str, port: int) -> HealthServer:
    """Serve the agents' health endpoints and print ``HEALTH <url>`` on stdout."""
    try:
        server = serve_health(agents, port=port, host=host)
    except OSError as exc:
        raise fail(f"the health endpoints cannot listen on {host}:{port}: {exc.strerror or exc}", 1) from None
    write_out(f"HEALTH {server.url}\n")
    return server


async def _run_agents(
    settings: Settings,
    config: Path,
    only: list[str],
    agent_class: str,
    metrics: tuple[str, int] | None,
    health: tuple[str, int] | None,
) -> None:
    selected = load_agents_config(config).agents
    if only:
        unknown = sorted(set(only) - {a.agent_id for a in selected})
        if unknown:
            raise ConfigError(f"no agent {', '.join(unknown)} in the file", path=str(config))
        selected = [a for a in selected if a.agent_id in only]
    if not selected:
        raise ConfigError("the file lists no agents", path=str(config))
    cls = _agent_class(agent_class)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    file_url = None if settings.redis_url else selected[0].redis_url
    async with open_broker(settings, redis_url=file_url, origin=f"redis_url in {config}") as broker:
        agents = [cls(agent, broker=broker) for agent in selected]
        server = None if metrics is None else _serve_metrics(agents, *metrics)
        probes = None if health is None else _serve_health(agents, *health)  # alive, not ready, while starting
        started: list[BaseAgent] = []
        try:
            for agent in agents:
                started.append(await agent.initialize())
            write_out("READY " + " ".join(a.agent_id for a in agents) + "\n")
            await stop.wait()
        finally:
            try:
                for agent in reversed(started):
                    await agent.shutdown()
            finally:
                if server is not None:  # last: scrapes still answer while the agents stop
                    await asyncio.to_thread(server.close)
                if probes is not None:
                    await asyncio.to_thread(probes.close)
