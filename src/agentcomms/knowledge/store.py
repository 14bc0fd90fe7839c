"""Where the chunks live: Qdrant, embedded (qdrant-edge) by default, or a Qdrant server.

Both stores take the same calls and build the same filter: the domains a role may read
are a condition of the vector query itself (``domain`` must be one of them), so a
forbidden chunk is never scored, never returned, never counted. An empty list of
domains never becomes "no filter": such a search is not run at all.

The embedded store opens from one process only: it takes ``owner.lock`` in its folder
(``flock``) before opening, and a second opener gets :class:`KnowledgeStoreBusyError`.
Its calls block (a query at 20k chunks takes ~1-2 ms); the memory interface runs them
in a worker thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agentcomms.exceptions import KnowledgeError, KnowledgeNotConfiguredError, KnowledgeStoreBusyError

__all__ = [
    "DENSE",
    "LEXICAL",
    "DocumentEntry",
    "EdgeStore",
    "Hit",
    "KnowledgeStore",
    "Query",
    "ServerStore",
    "StoredChunk",
    "fuse",
    "point_id",
]

DENSE = "dense"
"""Name of the dense vector of each chunk (the embedder's)."""
LEXICAL = "lexical"
"""Name of the sparse term vector of each chunk (IDF applied by the store)."""

_NAMESPACE = uuid.UUID("8b9f3b4e-3f0c-4b7e-9a51-6a1d2c0e4f11")
INDEXED_FIELDS = ("domain", "doc", "source_id", "kind", "author")
"""Keyword-indexed payload fields: the permission filter (``domain``), the document manifest (``doc``), filters."""
_FACET_LIMIT = 1_000_000


def point_id(source_id: str, position: int) -> str:
    """The chunk's point id: the same for the same document and position, so a re-ingest overwrites."""
    return str(uuid.uuid5(_NAMESPACE, f"{source_id}#{position}"))


def doc_key(domain: str, version: str, source_id: str) -> str:
    """The ``doc`` payload: a document's domain, version and id in one indexed field (the manifest is its facet)."""
    return f"{domain}\t{version}\t{source_id}"


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk ready to store: its point id, vector and payload (text, source, domain ...)."""

    id: str
    vector: Sequence[float]
    payload: Mapping[str, Any]
    lexical: tuple[list[int], list[float]] = ([], [])
    """The sparse term vector (token ids, weights) for the lexical half of hybrid search."""


@dataclass(frozen=True, slots=True)
class Query:
    """What to search with: the dense vector, the sparse term vector, and how to combine them.

    ``hybrid``: both rankings fused by reciprocal rank (the default); ``dense`` or
    ``lexical``: one of them alone (for comparison).
    """

    vector: Sequence[float]
    lexical: tuple[list[int], list[float]] = ([], [])
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"
    candidates: int = 40
    """How many chunks each half proposes before fusion."""
    rrf_k: int = 5
    """Reciprocal rank fusion's k: a larger k flattens the difference between ranks (docs/knowledge.md)."""
    weights: tuple[float, float] = (1.0, 1.0)
    """Weights of the dense and the lexical ranking in the fusion."""


@dataclass(frozen=True, slots=True)
class Hit:
    """A search result: its score (higher is better), the chunk's payload and point id."""

    score: float
    payload: dict[str, Any]
    id: str = ""


def fuse(dense: Sequence[Hit], lexical: Sequence[Hit], query: Query, limit: int) -> list[Hit]:
    """Reciprocal rank fusion of two rankings: ``weight / (k + rank)`` summed per chunk (rank from 0).

    Done here rather than in Qdrant so that ties (frequent with small k) are broken the
    same way every time: by the dense similarity, then the point id.
    """
    scores: dict[str, float] = {}
    hits: dict[str, Hit] = {}
    for ranking, weight in ((dense, query.weights[0]), (lexical, query.weights[1])):
        for rank, hit in enumerate(ranking):
            scores[hit.id] = scores.get(hit.id, 0.0) + weight / (query.rrf_k + rank)
            hits.setdefault(hit.id, hit)
    similarity = {hit.id: hit.score for hit in dense}
    order = sorted(scores, key=lambda i: (-scores[i], -similarity.get(i, -2.0), i))
    return [Hit(round(scores[i], 6), hits[i].payload, i) for i in order[:limit]]


@dataclass(frozen=True, slots=True)
class DocumentEntry:
    """A stored document, from the store itself: its domain, version and number of chunks."""

    source_id: str
    domain: str
    version: str
    chunks: int


class KnowledgeStore(ABC):
    """The calls the memory interface makes; blocking, called from one worker thread at a time."""

    location: str

    @abstractmethod
    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        """Add or overwrite chunks."""

    @abstractmethod
    def delete_where(self, field: str, value: str) -> None:
        """Delete every chunk whose payload ``field`` equals ``value``."""

    def search(self, query: Query, domains: Sequence[str], equal: Mapping[str, str], limit: int) -> list[Hit]:
        """The best ``limit`` chunks for ``query`` among those of ``domains`` whose fields equal ``equal``."""
        _check_domains(domains)
        if query.mode == "hybrid" and query.lexical[0]:
            candidates = max(query.candidates, limit)
            dense, lexical = self._nearest(query, domains, equal, [(DENSE, candidates), (LEXICAL, candidates)])
            return fuse(dense, lexical, query, limit)
        return self._nearest(query, domains, equal, [(LEXICAL if query.mode == "lexical" else DENSE, limit)])[0]

    @abstractmethod
    def _nearest(
        self, query: Query, domains: Sequence[str], equal: Mapping[str, str], asks: Sequence[tuple[str, int]]
    ) -> list[list[Hit]]:
        """One batch of nearest-neighbour queries, one per (vector name, limit), each with the permission filter."""

    @abstractmethod
    def facet(self, field: str) -> dict[str, int]:
        """Each value of the indexed payload ``field`` with its number of chunks."""

    @abstractmethod
    def count(self) -> int:
        """Chunks stored."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store (and its lock)."""

    def documents(self) -> dict[str, DocumentEntry]:
        """Source id -> what is stored of it (from the ``doc`` facet: no scan of the chunks)."""
        out: dict[str, DocumentEntry] = {}
        for value, count in self.facet("doc").items():
            domain, version, source_id = value.split("\t", 2)
            out[source_id] = DocumentEntry(source_id, domain, version, count)
        return out


def _vector(query: Query, using: str, sparse: Any) -> Any:
    """The query's dense vector, or its term vector as the store library's ``SparseVector``."""
    return list(query.vector) if using == DENSE else sparse(indices=query.lexical[0], values=query.lexical[1])


def _hits(points: Sequence[Any]) -> list[Hit]:
    """Qdrant's scored points as hits."""
    return [Hit(float(p.score), dict(p.payload or {}), str(p.id)) for p in points]


def _check_domains(domains: Sequence[str]) -> None:
    if not domains:  # defence in depth: the interface never asks, and an empty filter must not mean "all"
        raise KnowledgeError("a knowledge search needs at least one domain (an empty grant reads nothing)")


class EdgeStore(KnowledgeStore):
    """The embedded store: a qdrant-edge shard in ``path``, owned by this process while open.

    Raises:
        KnowledgeStoreBusyError: another process has it open.
        KnowledgeNotConfiguredError: qdrant-edge is not installed, or the folder holds a
            store made with another embedder (its name or dimension differ).
    """

    def __init__(self, path: Path, *, embedder_name: str, dimension: int) -> None:
        try:
            import qdrant_edge as qe
        except ImportError:
            raise KnowledgeNotConfiguredError(
                "the embedded knowledge store needs the knowledge extra: pip install 'agentcomms[knowledge]'"
            ) from None
        self._qe: Any = qe
        self.location = str(path)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = (path / "owner.lock").open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            owner = self._lock_file.read().strip()
            self._lock_file.close()
            raise KnowledgeStoreBusyError(str(path), owner) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        try:
            self._shard = self._open(path / "shard", embedder_name, dimension)
        except BaseException:
            self._release()
            raise
        self._mutex = threading.Lock()

    def _open(self, shard_path: Path, embedder_name: str, dimension: int) -> Any:
        qe = self._qe
        meta_path = shard_path.parent / "store.json"
        meta = {"embedder": embedder_name, "dimension": dimension, "layout": 2}
        if meta_path.exists():
            found = json.loads(meta_path.read_text(encoding="utf-8"))
            if found != meta:
                raise KnowledgeNotConfiguredError(
                    f"the knowledge store {self.location} was built with {found.get('embedder')} "
                    f"({found.get('dimension')} dimensions, layout {found.get('layout', 1)}), not "
                    f"{embedder_name} ({dimension}, layout 2): use another AGENTCOMMS_KNOWLEDGE_DIR, "
                    "or delete this one and ingest again"
                )
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine)},
            sparse_vectors={LEXICAL: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        if meta_path.exists() and shard_path.exists():
            shard = qe.EdgeShard.load(str(shard_path))
        else:
            if shard_path.exists():  # a create that never finished (store.json is written last)
                shutil.rmtree(shard_path)
            shard = qe.EdgeShard.create(str(shard_path), config)
            for field in INDEXED_FIELDS:
                shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
            meta_path.write_text(json.dumps(meta), encoding="utf-8")
        return shard

    def _release(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def _filter(self, domains: Sequence[str] | None, equal: Mapping[str, str]) -> Any:
        qe = self._qe
        must = [qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in equal.items()]
        if domains is not None:
            must.append(qe.FieldCondition(key="domain", match=qe.MatchAny(any=list(domains))))
        return qe.Filter(must=must) if must else None

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:  # noqa: D102
        qe = self._qe
        points = [
            qe.Point(
                id=c.id,
                vector={DENSE: list(c.vector), LEXICAL: qe.SparseVector(indices=c.lexical[0], values=c.lexical[1])},
                payload=dict(c.payload),
            )
            for c in chunks
        ]
        with self._mutex:
            self._shard.update(qe.UpdateOperation.upsert_points(points))

    def delete_where(self, field: str, value: str) -> None:  # noqa: D102
        with self._mutex:
            self._shard.update(self._qe.UpdateOperation.delete_points_by_filter(self._filter(None, {field: value})))

    def _nearest(
        self, query: Query, domains: Sequence[str], equal: Mapping[str, str], asks: Sequence[tuple[str, int]]
    ) -> list[list[Hit]]:
        qe = self._qe
        where = self._filter(domains, equal)  # the permission filter, in every query
        requests = []
        for using, limit in asks:
            vector = _vector(query, using, qe.SparseVector)
            requests.append(
                qe.QueryRequest(
                    query=qe.Query.Nearest(vector, using=using), filter=where, limit=limit, with_payload=True
                )
            )
        with self._mutex:
            return [_hits(points) for points in self._shard.query_batch(qe.QueryBatchRequest(requests))]

    def facet(self, field: str) -> dict[str, int]:  # noqa: D102
        with self._mutex:
            response = self._shard.facet(self._qe.FacetRequest(key=field, limit=_FACET_LIMIT, exact=True))
        return {str(h.value): int(h.count) for h in response.hits if h.count}  # deleted values stay, counted 0

    def count(self) -> int:  # noqa: D102
        with self._mutex:
            return int(self._shard.count(self._qe.CountRequest(exact=True)))

    def close(self) -> None:  # noqa: D102
        try:
            if self._shard is not None:
                with self._mutex:
                    self._shard.flush()
                    self._shard.close()
                self._shard = None
        finally:
            self._release()


class ServerStore(KnowledgeStore):
    """A collection on a Qdrant server (``VECTOR_STORE_URL``), through qdrant-client, with the same filters.

    ``client`` may be any ``QdrantClient`` (its local mode too); by default one for ``url``.

    Raises:
        KnowledgeNotConfiguredError: qdrant-client is not installed, the server does not
            answer, or the collection has vectors of another size.
    """

    def __init__(
        self,
        url: str | None,
        *,
        collection: str,
        dimension: int,
        client: Any = None,
        api_key: str | None = None,
    ) -> None:
        try:
            from qdrant_client import QdrantClient, models
        except ImportError:
            raise KnowledgeNotConfiguredError(
                "a Qdrant server store needs the knowledge extra: pip install 'agentcomms[knowledge]'"
            ) from None
        self._models: Any = models
        from agentcomms.settings import redact_url

        self.collection = collection
        self.location = f"{redact_url(url) or 'qdrant'}#{collection}"  # shown to users: never a password
        if client is None:  # no version check in a thread of its own: its failure would escape us
            client = QdrantClient(url=url, api_key=api_key, timeout=10, check_compatibility=False)
        self._client: Any = client
        try:
            if not self._client.collection_exists(collection):
                self._client.create_collection(
                    collection,
                    vectors_config={DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)},
                    sparse_vectors_config={LEXICAL: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                )
                for field in INDEXED_FIELDS:
                    self._client.create_payload_index(collection, field, models.PayloadSchemaType.KEYWORD)
            else:
                info = self._client.get_collection(collection)
                vectors = info.config.params.vectors
                size = getattr(vectors.get(DENSE) if isinstance(vectors, dict) else None, "size", None)
                if size != dimension:
                    raise KnowledgeNotConfiguredError(
                        f"Qdrant collection {collection!r} has no {dimension}-dimensional vector {DENSE!r} "
                        "(made by another embedder or program): use another VECTOR_STORE_COLLECTION"
                    )
        except KnowledgeError:
            raise
        except Exception as exc:  # the client's own errors: connection refused, HTTP errors ...
            where = redact_url(url)
            reason = str(exc).replace(url, where) if url else str(exc)
            raise KnowledgeNotConfiguredError(f"the Qdrant server at {where} cannot be used: {reason}") from None

    def _filter(self, domains: Sequence[str] | None, equal: Mapping[str, str]) -> Any:
        models = self._models
        must: list[Any] = [models.FieldCondition(key=k, match=models.MatchValue(value=v)) for k, v in equal.items()]
        if domains is not None:
            must.append(models.FieldCondition(key="domain", match=models.MatchAny(any=list(domains))))
        return models.Filter(must=must)

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:  # noqa: D102
        models = self._models
        points = [
            models.PointStruct(
                id=c.id,
                vector={DENSE: list(c.vector), LEXICAL: models.SparseVector(indices=c.lexical[0], values=c.lexical[1])},
                payload=dict(c.payload),
            )
            for c in chunks
        ]
        self._client.upsert(self.collection, points=points, wait=True)

    def delete_where(self, field: str, value: str) -> None:  # noqa: D102
        selector = self._models.FilterSelector(filter=self._filter(None, {field: value}))
        self._client.delete(self.collection, points_selector=selector, wait=True)

    def _nearest(
        self, query: Query, domains: Sequence[str], equal: Mapping[str, str], asks: Sequence[tuple[str, int]]
    ) -> list[list[Hit]]:
        models = self._models
        where = self._filter(domains, equal)  # the permission filter, in every query
        requests = []
        for using, limit in asks:
            vector = _vector(query, using, models.SparseVector)
            requests.append(
                models.QueryRequest(query=vector, using=using, filter=where, limit=limit, with_payload=True)
            )
        answers = self._client.query_batch_points(self.collection, requests=requests)
        return [_hits(answer.points) for answer in answers]

    def facet(self, field: str) -> dict[str, int]:  # noqa: D102
        response = self._client.facet(self.collection, key=field, limit=_FACET_LIMIT, exact=True)
        return {str(h.value): int(h.count) for h in response.hits if h.count}

    def count(self) -> int:  # noqa: D102
        return int(self._client.count(self.collection, exact=True).count)

    def close(self) -> None:  # noqa: D102
        self._client.close()
