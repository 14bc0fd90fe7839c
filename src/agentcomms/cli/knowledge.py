"""``agentcomms knowledge``: ingest, search, serve, stats.

The embedded store belongs to one process. While a knowledge service runs
(``agentcomms knowledge serve``) these commands ask it over the bus; otherwise they open
the store themselves for the length of the command.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from agentcomms.cli._common import (
    LogLevelOption,
    configure_logging,
    console,
    errors,
    esc,
    fail,
    load_settings,
    open_broker,
    plural,
    reported,
    run,
    write_out,
)
from agentcomms.cli.ask import _asker
from agentcomms.health import serve_health
from agentcomms.knowledge.interface import AgentMemoryInterface, IngestReport, KnowledgeResult
from agentcomms.knowledge.service import KnowledgeService
from agentcomms.settings import Settings

knowledge_app = typer.Typer(help="Knowledge memory: ingest documents, search as a role, serve.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@knowledge_app.callback()
def _knowledge(log_level: LogLevelOption = None) -> None:
    configure_logging(log_level)


def _where(memory: AgentMemoryInterface) -> str:
    store = memory.store
    if memory.mode == "owner" and store is not None:
        return f"store: {store.location}"
    return f"asking the knowledge service {memory.settings.knowledge_service_id!r}"


@asynccontextmanager
async def _memory(settings: Settings, sender_id: str, *, say_where: bool = True) -> AsyncIterator[AgentMemoryInterface]:
    """The knowledge memory for one command: the store itself if free, else the knowledge service (said on stderr)."""
    async with open_broker(settings, client_name=sender_id) as broker:
        async with AgentMemoryInterface(settings, broker=broker, sender_id=sender_id) as memory:
            if say_where:
                errors.print(f"[dim]{esc(_where(memory))}[/]", soft_wrap=True, highlight=False)
            yield memory


def _sender(settings: Settings) -> str:
    with reported():
        return _asker(settings)


@knowledge_app.command("ingest")
def knowledge_ingest(
    path: Annotated[
        Path | None, typer.Argument(help="A folder (one sub-folder per domain) or a file.", show_default=False)
    ] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="The domain of every file (default: its sub-folder's name).")
    ] = None,
    drive: Annotated[
        bool, typer.Option("--drive", help="Ingest the Google Drive folders of GDRIVE_CONFIG_PATH instead.")
    ] = False,
    as_json: JsonOption = False,
    log_level: LogLevelOption = None,
) -> None:
    """Ingest documents incrementally: unchanged files cost nothing, deleted ones are removed."""
    configure_logging(log_level)
    if (path is None) != drive:
        raise typer.BadParameter("give a PATH or --drive")
    settings = load_settings()
    sender_id = _sender(settings)

    async def ingest() -> IngestReport:
        async with _memory(settings, sender_id) as memory:
            if drive:
                return await memory.ingest_drive()
            assert path is not None
            if memory.mode != "owner" or as_json:
                return await memory.ingest(path, domain=domain)
            with Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=errors, transient=True,
            ) as progress:  # fmt: skip
                task = progress.add_task("ingesting", total=None)

                def advance(done: int, total: int, location: str) -> None:
                    progress.update(task, completed=done, total=total, description=Path(location).name[:40])

                return await memory.ingest(path, domain=domain, progress=advance)

    report = run(ingest())
    if as_json:
        write_out(report.model_dump_json(indent=2) + "\n")
        return
    console.print(esc(report.summary()), highlight=False)
    for name, items in (("added", report.added), ("updated", report.updated), ("removed", report.removed)):
        for item in items[:50]:
            console.print(f"  [green]{name}[/] {esc(item)}", highlight=False, soft_wrap=True)
    if report.skipped:
        table = Table(title=plural(len(report.skipped), "file") + " skipped")
        table.add_column("file")
        table.add_column("reason")
        for skipped in report.skipped:
            table.add_row(Text(skipped["location"]), Text(skipped["reason"]))
        console.print(table)


@knowledge_app.command("remove")
def knowledge_remove(
    path: Annotated[Path, typer.Argument(help="A file or folder whose ingested documents go (it may be gone).")],
    as_json: JsonOption = False,
    log_level: LogLevelOption = None,
) -> None:
    """Remove the documents ingested from PATH (a folder that moved, or that you no longer want searched)."""
    configure_logging(log_level)
    settings = load_settings()
    sender_id = _sender(settings)

    async def remove() -> IngestReport:
        async with _memory(settings, sender_id) as memory:
            return await memory.remove(path)

    report = run(remove())
    if as_json:
        write_out(report.model_dump_json(indent=2) + "\n")
    elif report.removed:
        console.print(f"{plural(len(report.removed), 'document')} removed", highlight=False)
    else:
        console.print(f"nothing removed: no document was ingested from {esc(path)}", highlight=False)


@knowledge_app.command("search")
def knowledge_search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    role: Annotated[str, typer.Option("--role", help="Search as this role: only its domains are searched.")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=50, help="Results to show.")] = 5,
    domain: Annotated[
        list[str] | None, typer.Option("--domain", help="Only these domains (within the role's).")
    ] = None,
    as_json: JsonOption = False,
    log_level: LogLevelOption = None,
) -> None:
    """Search the knowledge ROLE may read, best first."""
    configure_logging(log_level)
    settings = load_settings()
    sender_id = _sender(settings)
    filters: dict[str, Any] | None = {"domains": domain} if domain else None

    async def search() -> tuple[list[KnowledgeResult], list[str], bool]:
        async with _memory(settings, sender_id) as memory:
            found = await memory.search_knowledge(sender_id, role, query, filters=filters, limit=limit)
            granted = sorted(memory.domains_for(role)) if memory.mode == "owner" else []
            return found, granted, memory.mode == "owner"

    results, granted, owner = run(search())
    if as_json:
        write_out(json.dumps([r.model_dump(mode="json") for r in results], indent=2) + "\n")
        return
    if not results:
        if granted:
            console.print(f"nothing found for role {esc(role)} (its domains: {esc(', '.join(granted))})")
        elif owner:
            console.print(
                f"nothing found: role {esc(role)} may read no knowledge domain (the default table, or "
                "AGENTCOMMS_KNOWLEDGE_PERMISSIONS: docs/knowledge.md)",
                highlight=False,
            )
        else:
            console.print(f"nothing found for role {esc(role)}", highlight=False)
        return
    table = Table(title=f"{plural(len(results), 'result')} for role {esc(role)}", show_lines=True)
    for column in ("score", "domain", "source", "text"):
        table.add_column(column)
    for result in results:
        source = result.source
        where = source.title + (f" › {source.heading}" if source.heading else "")
        text = result.text if len(result.text) <= 400 else result.text[:400] + "…"
        table.add_row(f"{result.score:.3f}", Text(result.domain), Text(f"{where}\n{source.location}"), Text(text))
    console.print(table)


@knowledge_app.command("serve")
def knowledge_serve(
    ingest: Annotated[
        list[Path] | None, typer.Option("--ingest", help="Ingest this folder first (incremental; repeatable).")
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            min=0,
            max=65535,
            show_default=False,
            help="Serve /healthz and /readyz on this port (default AGENTCOMMS_HEALTH_PORT, else none); prints "
            "HEALTH <url>.",
        ),
    ] = None,
    health_host: Annotated[str, typer.Option("--health-host", help="Address the health endpoints listen on.")] = (
        "127.0.0.1"
    ),
    log_level: LogLevelOption = None,
) -> None:
    """Run the knowledge service (owns the embedded store, answers everyone) until SIGINT or SIGTERM."""
    configure_logging(log_level)
    settings = load_settings()
    port = settings.health_port if health_port is None else health_port
    run(_serve(settings, ingest or [], None if port is None else (health_host, port)))


async def _serve(settings: Settings, folders: list[Path], health: tuple[str, int] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_broker(settings, client_name=settings.knowledge_service_id) as broker:
        service = KnowledgeService(settings, broker=broker, ingest_roots=folders)
        probes = None
        if health is not None:  # alive, not ready, while the store opens and the folders are ingested
            try:
                probes = serve_health([service], host=health[0], port=health[1])
            except OSError as exc:
                raise fail(f"the health endpoints cannot listen on {health[0]}:{health[1]}: {exc}", 1) from None
            write_out(f"HEALTH {probes.url}\n")
        await service.initialize()
        try:
            for folder in folders:  # online already: searches meanwhile see what is ingested so far
                report = await service.memory.ingest(folder)
                errors.print(f"[dim]ingested {esc(folder)}: {esc(report.summary())}[/]", soft_wrap=True)
            stats = await service.memory.stats()
            errors.print(
                f"[dim]knowledge store {esc(stats['store'])}: {plural(stats['documents'], 'document')}, "
                f"{plural(stats['chunks'], 'chunk')}[/]",
                soft_wrap=True,
                highlight=False,
            )
            write_out(f"READY {service.agent_id}\n")
            await stop.wait()
        finally:
            await service.shutdown()
            if probes is not None:
                await asyncio.to_thread(probes.close)


@knowledge_app.command("stats")
def knowledge_stats(as_json: JsonOption = False, log_level: LogLevelOption = None) -> None:
    """What the knowledge store holds: documents and chunks per domain, and who may read what."""
    configure_logging(log_level)
    settings = load_settings()
    sender_id = _sender(settings)

    async def stats() -> dict[str, Any]:
        async with _memory(settings, sender_id, say_where=False) as memory:
            return await memory.stats(sender_id)

    found = run(stats())
    if as_json:
        write_out(json.dumps(found, indent=2) + "\n")
        return
    table = Table(
        title=f"{esc(found['store'])}: {plural(found['documents'], 'document')}, {plural(found['chunks'], 'chunk')}"
    )
    table.add_column("domain")
    table.add_column("documents")
    table.add_column("chunks")
    table.add_column("roles that may read it")
    readers: dict[str, list[str]] = {}
    for role, domains in found.get("permissions", {}).items():
        for one in domains:
            readers.setdefault(one, []).append(role)
    for name, counts in found["domains"].items():
        table.add_row(
            Text(name), str(counts["documents"]), str(counts["chunks"]), Text(", ".join(readers.get(name, [])) or "-")
        )
    console.print(table)
