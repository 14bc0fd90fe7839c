"""AgentMemoryInterface: search the knowledge a role may see, ingest documents, share insights.

Three ways to reach the store, chosen by :meth:`AgentMemoryInterface.initialize`:

- **owner**: this process opens the embedded store (qdrant-edge, in
  ``AGENTCOMMS_KNOWLEDGE_DIR``) and holds its lock; or a Qdrant server
  (``VECTOR_STORE_URL``), which every process may use directly;
- **client**: another process owns the embedded store (the knowledge service, or a
  CLI ingest): every call becomes a request to the knowledge service over the bus.

Permissions are decided by the owner, from the role (with security on, the knowledge
service takes it from the verified sender) and enforced inside the vector query.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field

from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    KnowledgeError,
    KnowledgeNotConfiguredError,
    KnowledgeQueryError,
    KnowledgeStoreBusyError,
    PermissionDeniedError,
    RequestTimeoutError,
)
from agentcomms.knowledge.chunking import chunk_document
from agentcomms.knowledge.embedder import Embedder, LexicalEncoder, MiniLMEmbedder
from agentcomms.knowledge.permissions import KnowledgePermissions
from agentcomms.knowledge.sources import (
    SkippedFile,
    SourceDocument,
    UnchangedDocument,
    normalise_domain,
    scan_folder,
)
from agentcomms.knowledge.store import (
    DocumentEntry,
    EdgeStore,
    KnowledgeStore,
    Query,
    ServerStore,
    StoredChunk,
    doc_key,
    point_id,
)
from agentcomms.schemas import AgentResponse, AgentStatus, MessageIntent

__all__ = [
    "INGEST_INTENT",
    "REMOVE_INTENT",
    "STATS_INTENT",
    "AgentMemoryInterface",
    "IngestReport",
    "KnowledgeResult",
    "KnowledgeSource",
]

logger = logging.getLogger(__name__)

INGEST_INTENT = "knowledge_ingest"
"""Intent of a request to the knowledge service to ingest a folder it can read."""
REMOVE_INTENT = "knowledge_remove"
"""Intent of a request to the knowledge service to remove what was ingested from a path."""
STATS_INTENT = "knowledge_stats"
"""Intent of a request to the knowledge service for what it holds."""

FILTER_KEYS = frozenset({"domains", "kind", "author", "source_id"})
"""What ``filters`` may narrow a search by (never widen it: ``domains`` intersects the grant)."""
MAX_LIMIT = 50
MAX_QUERY_CHARS = 2000
_EMBED_BATCH = 64


class KnowledgeSource(BaseModel):
    """Where a result comes from: the document (path or Drive file), its title, heading and chunk position."""

    source_id: str
    location: str
    title: str
    heading: str = ""
    position: int = 0
    page: int | None = None


class KnowledgeResult(BaseModel):
    """One search result: the chunk's text, its domain, where it comes from, and its similarity score."""

    text: str
    score: float
    domain: str
    kind: Literal["document", "insight"] = "document"
    source: KnowledgeSource
    author: str | None = None
    """The agent that shared an insight."""
    created_at: datetime | None = None


class IngestReport(BaseModel):
    """What an ingest did: documents added, updated, unchanged, removed, skipped (with reasons), chunks embedded."""

    added: list[str] = Field(default_factory=list)
    updated: list[str] = Field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = Field(default_factory=list)
    skipped: list[dict[str, str]] = Field(default_factory=list)
    chunks_embedded: int = 0
    seconds: float = 0.0
    removal_skipped: str | None = None
    """Why no stored document was removed although some were not seen (a folder could not be listed)."""

    def summary(self) -> str:
        """One line: the counts."""
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {self.unchanged} unchanged, "
            f"{len(self.removed)} removed, {len(self.skipped)} skipped; {self.chunks_embedded} chunks embedded "
            f"in {self.seconds:.1f}s"
        )


Progress = Callable[[int, int, str], None]
"""Called as documents are ingested: (done, total, location)."""


def _clean_filters(filters: Mapping[str, Any] | None) -> tuple[frozenset[str] | None, dict[str, str]]:
    """``filters`` as (domains to narrow to, field -> value); refuses unknown keys and odd values."""
    if filters is None:
        return None, {}
    if not isinstance(filters, Mapping):
        raise KnowledgeQueryError(f"filters must be an object of {sorted(FILTER_KEYS)}, not {type(filters).__name__}")
    unknown = {str(k) for k in filters} - FILTER_KEYS
    if unknown:
        raise KnowledgeQueryError(f"unknown knowledge filter(s) {sorted(unknown)}: use {sorted(FILTER_KEYS)}")
    domains: frozenset[str] | None = None
    equal: dict[str, str] = {}
    for key, value in filters.items():
        if key == "domains":
            items = [value] if isinstance(value, str) else value  # one domain, or a list of them
            if not isinstance(items, list | tuple | set | frozenset) or not all(isinstance(d, str) for d in items):
                raise KnowledgeQueryError("filter 'domains' must be a domain name or a list of them")
            names = {d: normalise_domain(d) for d in items}
            bad = sorted(d for d, name in names.items() if name is None)
            if bad:
                raise KnowledgeQueryError(f"filter 'domains': {bad} are not domain names (letters, digits, _ and -)")
            domains = frozenset(name for name in names.values() if name is not None)
        elif isinstance(value, str) and value:
            equal[key] = value
        else:
            raise KnowledgeQueryError(f"filter {key!r} must be a non-empty string")
    return domains, equal


def _result(score: float, payload: Mapping[str, Any]) -> KnowledgeResult:
    created = payload.get("created_at")
    return KnowledgeResult(
        text=str(payload.get("text", "")),
        score=round(score, 6),
        domain=str(payload.get("domain", "")),
        kind="insight" if payload.get("kind") == "insight" else "document",
        source=KnowledgeSource(
            source_id=str(payload.get("source_id", "")),
            location=str(payload.get("location", "")),
            title=str(payload.get("title", "")),
            heading=str(payload.get("heading", "")),
            position=int(payload.get("position", 0)),
            page=payload.get("page"),
        ),
        author=payload.get("author"),
        created_at=datetime.fromisoformat(created) if isinstance(created, str) else None,
    )


class AgentMemoryInterface:
    """Role-based knowledge search, ingestion and shared insights (the seed's Memory Interface).

    Args:
        settings: where the store, Redis and the permissions are (default: the environment).
        broker: a connected-or-not :class:`MessageBroker` to share (for the query cache and
            for asking the knowledge service); by default one of its own.
        embedder: turns text into vectors (default: the local :class:`MiniLMEmbedder`).
        store: a :class:`KnowledgeStore` to use instead of the configured one.
        permissions: role -> domains (default: ``AGENTCOMMS_KNOWLEDGE_PERMISSIONS`` over the seed's table).
        mode: ``"auto"`` (own the store if free, else ask the service), ``"owner"`` or ``"client"``.
        sender_id: the id to ask the knowledge service as (a client with security on must
            hold its identity); by default the ``agent_id`` of each call.
        cache: whether searches use the Redis query cache (``AGENTCOMMS_KNOWLEDGE_CACHE_TTL``).
        retrieval: ``"hybrid"`` (dense and lexical rankings fused, the default), ``"dense"``
            or ``"lexical"`` alone (docs/knowledge.md has the figures of each).
        one_per_document: results are the best chunk of each document (``limit`` documents);
            ``False``: the best chunks, several of one document if they rank so.
    """

    def __init__(
        self,
        settings: Any = None,
        *,
        broker: Any = None,
        embedder: Embedder | None = None,
        store: KnowledgeStore | None = None,
        permissions: KnowledgePermissions | None = None,
        mode: Literal["auto", "owner", "client"] = "auto",
        sender_id: str | None = None,
        cache: bool = True,
        retrieval: Literal["hybrid", "dense", "lexical"] = "hybrid",
        one_per_document: bool = True,
    ) -> None:
        from agentcomms.settings import Settings

        self.settings: Settings = settings or (broker.settings if broker is not None else Settings())
        self._broker = broker
        self._owns_broker = broker is None
        self._embedder = embedder
        self._store = store
        self._owns_store = store is None
        self.permissions = permissions or KnowledgePermissions.from_file(self.settings.knowledge_permissions)
        self._mode_wanted = mode
        self.mode: Literal["owner", "client"] | None = None
        self._sender_id = sender_id
        self._senders: dict[str, Any] = {}
        self._cache = cache
        self.retrieval: Literal["hybrid", "dense", "lexical"] = retrieval
        self.one_per_document = one_per_document
        self._lexical: LexicalEncoder | None = None
        self._write_lock = asyncio.Lock()
        self._init_lock = asyncio.Lock()
        self._prefix = f"ac:{{{self.settings.knowledge_service_id}}}:kb"
        self.embedded_queries = 0
        self.cache_hits = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def initialize(self) -> Self:
        """Open the store (or find it taken and become a client of the knowledge service), connect to Redis.

        Raises:
            KnowledgeNotConfiguredError: the knowledge extra is missing or the store cannot be used.
            KnowledgeStoreBusyError: ``mode="owner"`` and another process owns the embedded store.
            BrokerConnectionError: Redis is unreachable.
        """
        async with self._init_lock:  # two callers at once (an agent's first searches): one opens
            if self.mode is None:
                await self._initialize()
        return self

    async def _initialize(self) -> None:
        if self._broker is None:
            from agentcomms.broker import MessageBroker

            self._broker = MessageBroker(settings=self.settings, client_name="knowledge")
        await self._broker.connect()
        try:
            if self._store is None and self._mode_wanted != "client":
                try:
                    self._store = await asyncio.to_thread(self._open_store)
                except KnowledgeStoreBusyError:
                    if self._mode_wanted == "owner":
                        raise
            if self._store is not None:
                if self._embedder is None:
                    self._embedder = await asyncio.to_thread(MiniLMEmbedder)
                self._lexical = await asyncio.to_thread(LexicalEncoder)
                self.mode = "owner"
            else:
                self.mode = "client"
        except BaseException:
            await self.close()
            raise
        logger.info("knowledge memory ready (%s, %s)", self.mode, self._store.location if self._store else "service")

    def _open_store(self) -> KnowledgeStore:
        settings = self.settings
        embedder_name = self._embedder.name if self._embedder else MiniLMEmbedder.name
        dimension = self._embedder.dimension if self._embedder else MiniLMEmbedder.dimension
        if settings.vector_store_url:
            key = settings.vector_store_api_key.get_secret_value() if settings.vector_store_api_key else None
            return ServerStore(
                settings.vector_store_url, collection=settings.vector_store_collection, dimension=dimension, api_key=key
            )
        return EdgeStore(settings.knowledge_folder, embedder_name=embedder_name, dimension=dimension)

    async def close(self) -> None:
        """Release the store (and its lock) and the broker this interface made. Safe to call twice."""
        store = self._store
        if store is not None and self._owns_store:  # a store given by the caller stays theirs (and set)
            self._store = None
            await asyncio.to_thread(store.close)
        for sender in self._senders.values():
            await sender.close()
        self._senders.clear()
        if self._broker is not None and self._owns_broker:
            await self._broker.close()
        self.mode = None

    async def __aenter__(self) -> Self:
        return await self.initialize()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def store(self) -> KnowledgeStore | None:
        """The store, when this process owns it (or uses a Qdrant server)."""
        return self._store

    def _need_mode(self) -> Literal["owner", "client"]:
        if self.mode is None:
            raise KnowledgeNotConfiguredError("the knowledge memory is not initialised: await initialize() first")
        return self.mode

    # -- search -------------------------------------------------------------------------------

    def domains_for(self, role: str | None, on_behalf_of: Iterable[str] = ()) -> frozenset[str]:
        """The domains a search by ``role`` may read; answering for other roles, only what all of them may."""
        roles = [role or "", *on_behalf_of]
        return self.permissions.common(roles)

    async def search_knowledge(
        self,
        agent_id: str,
        role: str | None,
        query: str,
        intent: MessageIntent | str = MessageIntent.REQUEST_KNOWLEDGE,
        filters: Mapping[str, Any] | None = None,
        limit: int = 5,
        *,
        on_behalf_of: Sequence[str] = (),
    ) -> list[KnowledgeResult]:
        """The ``limit`` chunks closest to ``query`` among those ``role`` may read, best first.

        ``filters`` narrows: ``domains`` (intersected with the grant), ``kind``
        (``document`` / ``insight``), ``author``, ``source_id``. ``on_behalf_of``: the roles
        of whoever the answer is for: only domains every role may read are searched. A
        role without a grant gets ``[]``, exactly as if nothing matched.

        Raises:
            KnowledgeQueryError: an empty or too long query, an unknown filter, a bad limit.
            KnowledgeNotConfiguredError: no store here and no knowledge service answers.
        """
        text = query.strip() if isinstance(query, str) else ""
        if not text:
            raise KnowledgeQueryError("the query is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise KnowledgeQueryError(f"the query is {len(text)} characters, limit {MAX_QUERY_CHARS}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
            raise KnowledgeQueryError(f"limit must be 1-{MAX_LIMIT}, not {limit!r}")
        narrow, equal = _clean_filters(filters)
        if self._need_mode() == "client":
            data = {"query": text, "role": role, "limit": limit, "filters": dict(filters or {}),
                    "on_behalf_of": list(on_behalf_of), "intent": str(intent)}  # fmt: skip
            reply = await self._ask(agent_id, MessageIntent.REQUEST_KNOWLEDGE, data)
            return [KnowledgeResult.model_validate(r) for r in reply.get("results", [])]
        domains = self.domains_for(role, on_behalf_of)
        if narrow is not None:
            domains &= narrow
        if not domains:
            return []  # no grant: nothing, exactly like no match (and no query runs without a filter)
        return await self._search(text, domains, equal, limit)

    async def _search(
        self, text: str, domains: frozenset[str], equal: dict[str, str], limit: int
    ) -> list[KnowledgeResult]:
        store, embedder = self._store, self._embedder
        assert store is not None and embedder is not None
        key, versions = await self._cache_key(text, domains, equal, limit)
        if key is not None:
            cached = await self._cache_get(key)
            if cached is not None:
                self.cache_hits += 1
                return cached
        try:
            vector = (await asyncio.to_thread(embedder.embed, [text]))[0] if self.retrieval != "lexical" else []
            lexical = self._lexical.query(text) if self._lexical is not None else ([], [])
        except (TypeError, ValueError) as exc:  # text the tokenizer cannot take (a lone surrogate ...)
            raise KnowledgeQueryError(f"the query cannot be embedded: {exc}") from None
        except Exception as exc:
            raise KnowledgeError(f"the embedder {embedder.name} failed: {exc}") from exc
        query = Query(vector, lexical, self.retrieval)
        wanted = min(limit * 8, 400) if self.one_per_document else limit
        hits = await asyncio.to_thread(store.search, query, sorted(domains), equal, wanted)
        self.embedded_queries += 1
        if self.one_per_document:  # the best chunk of each document: `limit` sources, not one source many times
            best: dict[str, Any] = {}
            for hit in hits:
                best.setdefault(str(hit.payload.get("source_id")), hit)
            hits = list(best.values())[:limit]
        results = [_result(h.score, h.payload) for h in hits]
        if key is not None:
            await self._cache_put(key, results)
        return results

    # -- the query cache (Redis) ------------------------------------------------------------------

    def _cache_on(self) -> bool:
        return self._cache and self.settings.knowledge_cache_ttl > 0 and self._broker is not None

    async def _cache_key(
        self, text: str, domains: frozenset[str], equal: dict[str, str], limit: int
    ) -> tuple[str | None, list[int]]:
        if not self._cache_on():
            return None, []
        ordered = sorted(domains)
        try:
            raw = await self._broker.pipeliner.call("HMGET", f"{self._prefix}:versions", *ordered, replay=True)
        except AgentCommsError as exc:
            logger.debug("knowledge cache unavailable: %s", exc)
            return None, []
        versions = [int(v) if v is not None else 0 for v in raw]
        embedder = self._embedder.name if self._embedder else ""
        normalised = " ".join(text.split())
        store = self._store.location if self._store is not None else ""  # two stores may share one Redis
        shape = [store, self.retrieval, self.one_per_document]
        material = json.dumps([embedder, shape, normalised, ordered, versions, equal, limit])
        return f"{self._prefix}:q:{hashlib.sha256(material.encode()).hexdigest()[:32]}", versions

    async def _cache_get(self, key: str) -> list[KnowledgeResult] | None:
        try:
            raw = await self._broker.pipeliner.call("GET", key, replay=True)
        except AgentCommsError:
            return None
        if raw is None:
            return None
        try:
            return [KnowledgeResult.model_validate(r) for r in json.loads(raw)]
        except ValueError:
            return None

    async def _cache_put(self, key: str, results: list[KnowledgeResult]) -> None:
        body = json.dumps([r.model_dump(mode="json") for r in results])
        ttl_ms = int(self.settings.knowledge_cache_ttl * 1000)
        try:
            await self._broker.pipeliner.call("SET", key, body, "PX", ttl_ms, replay=True)
        except AgentCommsError as exc:
            logger.debug("knowledge cache not written: %s", exc)

    async def _invalidate(self, domains: Iterable[str]) -> None:
        """A domain changed: searches over it miss the cache from now on (its version is part of the key)."""
        if self._broker is None:
            return
        for domain in sorted(set(domains)):
            try:
                await self._broker.pipeliner.call("HINCRBY", f"{self._prefix}:versions", domain, 1, replay=False)
            except AgentCommsError as exc:  # the cached entries then live until their TTL
                logger.warning("knowledge cache of domain %s not invalidated: %s", domain, exc)

    # -- ingest -------------------------------------------------------------------------------

    async def ingest(
        self,
        path: str | Path,
        *,
        domain: str | None = None,
        progress: Progress | None = None,
        agent_id: str = "knowledge.ingest",
        max_file_bytes: int = 20_000_000,
    ) -> IngestReport:
        """Ingest a folder (domains from its sub-folders, or ``domain`` for all) or one file, incrementally.

        Unchanged documents (same sha256) cost nothing; changed ones are re-chunked and
        re-embedded; documents under ``path`` that are gone are removed; bad files are
        skipped with a reason in the report (so is a file over ``max_file_bytes``).

        Raises:
            KnowledgeError: ``path`` does not exist.
        """
        root = Path(path).expanduser()
        if self._need_mode() == "client":
            data = {"path": str(root.resolve()), "domain": domain}
            return IngestReport.model_validate(await self._ask(agent_id, INGEST_INTENT, data, long=True))
        if not root.exists():
            raise KnowledgeQueryError(f"nothing to ingest at {root}: no such file or folder")
        if domain is not None and normalise_domain(domain) is None:  # else every file is skipped, and so removed
            raise KnowledgeQueryError(f"invalid domain {domain!r}: letters, digits, _ and - (lower case)")
        # documents gone from this folder are removed; what was ingested from elsewhere stays
        scope = f"file:{root.resolve().as_posix()}/" if root.is_dir() else None
        found = await asyncio.to_thread(
            lambda: list(scan_folder(root, domain=domain, max_file_bytes=max_file_bytes))
        )  # fmt: skip
        return await self.ingest_documents(found, scope=scope, progress=progress)

    async def remove(self, path: str | Path, *, agent_id: str = "knowledge.ingest") -> IngestReport:
        """Remove every document ingested from ``path`` (a file, or a folder and all under it).

        For a folder that moved or is gone (ids are absolute paths); nothing else is touched.
        """
        target = Path(path).expanduser().resolve()
        if self._need_mode() == "client":
            data = {"path": str(target)}
            return IngestReport.model_validate(await self._ask(agent_id, REMOVE_INTENT, data, long=True))
        store = self._store
        assert store is not None
        started = time.perf_counter()
        report = IngestReport()
        exact, under = f"file:{target.as_posix()}", f"file:{target.as_posix().rstrip('/')}/"
        async with self._write_lock:
            stored = await asyncio.to_thread(store.documents)
            domains = set()
            for source_id, entry in stored.items():
                if source_id == exact or source_id.startswith(under):
                    await asyncio.to_thread(store.delete_where, "source_id", source_id)
                    report.removed.append(source_id)
                    domains.add(entry.domain)
            await self._invalidate(domains)
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    async def ingest_drive(
        self,
        config_path: str | Path | Any = None,
        *,
        progress: Progress | None = None,
        agent_id: str = "knowledge.ingest",
        drive_service: Any = None,
    ) -> IngestReport:
        """Ingest the Google Drive folders of ``config_path`` (default ``GDRIVE_CONFIG_PATH``), incrementally.

        Files whose ``modifiedTime`` (and domain) is unchanged are not downloaded; files gone
        from the folders are removed, unless a folder could not be listed. ``config_path``
        may also be a loaded ``DriveConfig``; ``drive_service`` a Drive v3 API object of
        your own (default: one built from the config's service account).

        Raises:
            ConfigError: the config or the service account key cannot be used.
            KnowledgeError: no config path is given or set.
        """
        from agentcomms.knowledge.gdrive import DriveConfig, build_drive_service, drive_root, scan_drive

        if self._need_mode() == "client":  # the service reads its own GDRIVE_CONFIG_PATH, never a client's file
            return IngestReport.model_validate(await self._ask(agent_id, INGEST_INTENT, {"drive": True}, long=True))
        path = config_path or self.settings.gdrive_config_path
        if path is None:
            raise KnowledgeError("no Google Drive config: set GDRIVE_CONFIG_PATH (docs/knowledge.md)")
        store = self._store
        assert store is not None
        config = path if isinstance(path, DriveConfig) else DriveConfig.load(path)
        service = drive_service or await asyncio.to_thread(build_drive_service, config)
        stored = await asyncio.to_thread(store.documents)
        known = {sid: entry.version for sid, entry in stored.items() if sid.startswith("gdrive:")}
        found = await asyncio.to_thread(lambda: list(scan_drive(service, config, known)))

        def in_this_config(source_id: str, entry: DocumentEntry) -> bool:  # another config's files stay
            return source_id.startswith("gdrive:") and drive_root(entry.version) in config.folders

        return await self.ingest_documents(found, scope=in_this_config, progress=progress)

    async def ingest_documents(
        self,
        documents: Sequence[SourceDocument | SkippedFile | UnchangedDocument],
        *,
        scope: str | Callable[[str, DocumentEntry], bool] | None = None,
        progress: Progress | None = None,
    ) -> IngestReport:
        """Store ``documents`` incrementally (by ``version``).

        With ``scope`` (a source id prefix such as ``"file:/srv/docs/"``, or a test of a stored
        document's id and entry), stored documents of that scope that are not among
        ``documents`` are removed.
        """
        self._need_owner()
        store, embedder = self._store, self._embedder
        assert store is not None and embedder is not None
        started = time.perf_counter()
        report = IngestReport()
        async with self._write_lock:
            stored = await asyncio.to_thread(store.documents)
            seen: set[str] = set()
            changed_domains: set[str] = set()
            try:
                await self._ingest_items(documents, stored, seen, changed_domains, report, progress)
                if scope is not None and report.removal_skipped is None:
                    for source_id, entry in stored.items():
                        inside = scope(source_id, entry) if callable(scope) else source_id.startswith(scope)
                        if inside and source_id not in seen:
                            await asyncio.to_thread(store.delete_where, "source_id", source_id)
                            report.removed.append(source_id)
                            changed_domains.add(entry.domain)
            finally:  # also after a failure midway: what was stored so far must not be hidden by the cache
                await self._invalidate(changed_domains)
        report.seconds = round(time.perf_counter() - started, 3)
        logger.info("knowledge ingest: %s", report.summary())
        return report

    async def _ingest_items(
        self,
        documents: Sequence[SourceDocument | SkippedFile | UnchangedDocument],
        stored: Mapping[str, DocumentEntry],
        seen: set[str],
        changed_domains: set[str],
        report: IngestReport,
        progress: Progress | None,
    ) -> None:
        """Store each changed document; note in ``seen`` every source id that is still there."""
        total = len(documents)
        for done, item in enumerate(documents, start=1):
            if isinstance(item, SkippedFile):
                report.skipped.append({"location": item.location, "reason": item.reason})
                if item.source_id is not None:  # not readable this time: its stored copy stays
                    seen.add(item.source_id)
                if item.incomplete:
                    report.removal_skipped = f"{item.location} could not be listed: {item.reason}"
            elif isinstance(item, UnchangedDocument):
                seen.add(item.source_id)
                report.unchanged += 1
            else:
                seen.add(item.source_id)
                before = stored.get(item.source_id)
                if before is not None and before.version == item.version and before.domain == item.domain:
                    report.unchanged += 1
                else:
                    changed_domains.add(item.domain)
                    if before is not None:
                        changed_domains.add(before.domain)
                    report.chunks_embedded += await self._store_document(item, before is not None)
                    (report.updated if before is not None else report.added).append(item.location)
            if progress is not None:
                progress(done, total, getattr(item, "location", ""))

    async def _store_document(self, document: SourceDocument, replacing: bool) -> int:
        store, embedder = self._store, self._embedder
        assert store is not None and embedder is not None
        chunks = chunk_document(document)
        if not chunks:
            return 0
        texts = [c.embedding_text(document.title) for c in chunks]
        vectors: list[list[float]] = []
        try:
            for start in range(0, len(texts), _EMBED_BATCH):
                vectors.extend(await asyncio.to_thread(embedder.embed, texts[start : start + _EMBED_BATCH]))
        except Exception as exc:  # an embedder of the user's own (an API) may fail any way: typed, with its cause
            raise KnowledgeError(f"the embedder {embedder.name} failed on {document.location}: {exc}") from exc
        doc = doc_key(document.domain, document.version, document.source_id)
        lexical = self._lexical
        points = [
            StoredChunk(
                point_id(document.source_id, chunk.position),
                vector,
                {
                    "text": chunk.text,
                    "domain": document.domain,
                    "doc": doc,
                    "source_id": document.source_id,
                    "location": document.location,
                    "title": document.title,
                    "heading": chunk.heading,
                    "position": chunk.position,
                    "page": chunk.page,
                    "kind": "document",
                },
                lexical.document(text) if lexical is not None else ([], []),
            )
            for chunk, vector, text in zip(chunks, vectors, texts, strict=True)
        ]
        if replacing:  # a shorter new version must not leave old chunks behind
            await asyncio.to_thread(store.delete_where, "source_id", document.source_id)
        await asyncio.to_thread(store.upsert, points)
        return len(points)

    def _need_owner(self) -> None:
        if self._need_mode() != "owner":
            raise KnowledgeError("only the process that owns the knowledge store can do this")

    # -- insights -----------------------------------------------------------------------------

    async def share_insight(
        self,
        agent_id: str,
        role: str | None,
        insight: str,
        domains: Sequence[str],
        *,
        title: str | None = None,
    ) -> str:
        """Store an insight (what a SHARE_INSIGHTS message carries), tagged with its author and domains.

        An author may share only into domains its role may read. Returns the insight's id.

        Raises:
            KnowledgeQueryError: an empty insight or no domain.
            PermissionDeniedError: ``role`` may not read one of ``domains``.
        """
        text = insight.strip() if isinstance(insight, str) else ""
        if not text:
            raise KnowledgeQueryError("the insight is empty")
        if len(text) > 20_000:
            raise KnowledgeQueryError(f"the insight is {len(text)} characters, limit 20000")
        if isinstance(domains, str):
            domains = [domains]
        wanted = [normalise_domain(d) if isinstance(d, str) else None for d in domains] if domains else []
        if not wanted or any(d is None for d in wanted):
            raise KnowledgeQueryError(f"an insight needs valid domain names, not {list(domains)!r}")
        if self._need_mode() == "client":
            data = {"insight": text, "domains": list(domains), "title": title, "role": role}
            reply = await self._ask(agent_id, MessageIntent.SHARE_INSIGHTS, data)
            return str(reply.get("insight_id", ""))
        granted = self.permissions.domains(role)
        refused = sorted({d for d in wanted if d is not None} - granted)
        if refused:
            raise PermissionDeniedError(f"role {role!r} may not share into {refused}: it cannot read them")
        store, embedder = self._store, self._embedder
        assert store is not None and embedder is not None
        insight_id = f"insight:{uuid.uuid4().hex}"
        embedded = f"{title}\n{text}" if title else text
        vector = (await asyncio.to_thread(embedder.embed, [embedded]))[0]
        lexical = self._lexical.document(embedded) if self._lexical is not None else ([], [])
        created = datetime.now(UTC).isoformat()
        points = []
        for domain in sorted({d for d in wanted if d is not None}):
            source_id = f"{insight_id}:{domain}"  # one point per domain: the domain filter stays one value
            points.append(
                StoredChunk(
                    point_id(source_id, 0),
                    vector,
                    {
                        "text": text,
                        "domain": domain,
                        "doc": doc_key(domain, created, source_id),
                        "source_id": source_id,
                        "location": f"insight from {agent_id}",
                        "title": title or "Insight",
                        "heading": "",
                        "position": 0,
                        "page": None,
                        "kind": "insight",
                        "author": agent_id,
                        "created_at": created,
                    },
                    lexical,
                )
            )
        # not behind an ingest's lock: an insight's points are new (a unique id), the store serialises writes
        await asyncio.to_thread(store.upsert, points)
        await self._invalidate(p.payload["domain"] for p in points)
        return insight_id

    # -- stats --------------------------------------------------------------------------------

    async def stats(self, agent_id: str = "knowledge.stats") -> dict[str, Any]:
        """What the store holds: chunks and documents per domain, the store, the embedder, the mode."""
        if self._need_mode() == "client":
            stats: dict[str, Any] = await self._ask(agent_id, STATS_INTENT, {})
            return stats
        store = self._store
        assert store is not None
        domains = await asyncio.to_thread(store.facet, "domain")
        documents = await asyncio.to_thread(store.documents)
        per_domain: dict[str, int] = {}
        for entry in documents.values():
            per_domain[entry.domain] = per_domain.get(entry.domain, 0) + 1
        return {
            "store": store.location,
            "embedder": self._embedder.name if self._embedder else None,
            "chunks": sum(domains.values()),
            "documents": len(documents),
            "domains": {d: {"chunks": n, "documents": per_domain.get(d, 0)} for d, n in sorted(domains.items())},
            "permissions": self.permissions.as_dict(),
        }

    # -- asking the knowledge service -------------------------------------------------------------

    async def _ask(
        self, agent_id: str, intent: MessageIntent | str, data: dict[str, Any], *, long: bool = False
    ) -> Any:
        from agentcomms.sender import MessageSender

        sender_id = self._sender_id or agent_id
        sender = self._senders.get(sender_id)
        if sender is None:
            sender = MessageSender(sender_id=sender_id, broker=self._broker)
            self._senders[sender_id] = sender
        service = self.settings.knowledge_service_id
        timeout = self.settings.knowledge_timeout * (30 if long else 1)
        try:
            found = await sender.registry.get_agent(service)
        except AgentNotFoundError:
            found = None
        if found is not None and found.status == AgentStatus.OFFLINE:  # say so now: do not queue a question
            seen = f" (last seen {found.last_seen:%Y-%m-%d %H:%M:%S} UTC)" if found.last_seen else ""
            raise KnowledgeNotConfiguredError(
                f"the knowledge service {service!r} is offline{seen}: start it with agentcomms knowledge serve"
            )
        try:
            reply: AgentResponse = await sender.request(service, intent, data, timeout=timeout)
        except AgentNotFoundError:
            raise KnowledgeNotConfiguredError(
                f"the knowledge store is owned by another process and no knowledge service {service!r} is "
                "registered: start one with agentcomms knowledge serve"
            ) from None
        except RequestTimeoutError:
            raise KnowledgeNotConfiguredError(
                f"the knowledge service {service!r} did not answer within {timeout:g}s (is it running?)"
            ) from None
        if not reply.success:
            code = reply.error.code if reply.error else "error"
            message = reply.error.message if reply.error else ""
            if code == "forbidden":
                raise PermissionDeniedError(f"knowledge service: {message}")
            if code in {"invalid_query", "bad_request"}:
                raise KnowledgeQueryError(f"knowledge service: {message}")
            raise KnowledgeError(f"knowledge service: {code}: {message}")
        return reply.data
