"""The knowledge memory: retrieval quality, ingest speed and query latency, in one run.

    python benchmarks/knowledge.py [--quick] [--queries 200]

Starts its own redis-server on a loopback port and keeps the store in a temporary folder.

1. Retrieval quality over the labelled questions of the example corpus (questions.json),
   as a role granted all seven domains: recall@1, recall@3 and MRR (over the top 10
   documents) of the dense embedder alone, the lexical (BM25-style) vectors alone, and
   both fused (hybrid, the default).
2. Ingest of the corpus into a fresh store, then again with nothing changed.
3. Query latency (p50, p99; the query's embedding included) at 1k and 20k chunks (the
   corpus plus filler chunks made of its sentences, shuffled), as a role granted two of
   the seven domains: in-process (the owner's interface, cache off) and over the bus (a
   client asking a knowledge service in another process, cache off; and cache on, each
   query a repeat).
4. The goals.

--quick: fewer queries and 1k chunks only (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Literal

import redis

import agentcomms
from agentcomms import EmbeddedRedis, Settings
from agentcomms.knowledge import AgentMemoryInterface, IngestReport, KnowledgePermissions, scan_folder
from agentcomms.knowledge.chunking import chunk_document
from agentcomms.knowledge.sources import SourceDocument
from agentcomms.knowledge.store import StoredChunk, doc_key, point_id

EXAMPLES = Path(agentcomms.__file__).parent / "examples" / "knowledge"
CORPUS = EXAMPLES / "corpus"
"""The folder of the seven domain folders (the labels, questions.json, are in EXAMPLES)."""
DOMAINS = sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and not p.name.startswith("."))
ALL_ROLE, TWO_ROLE = "bench_all", "bench_two"
TWO_DOMAINS = ["marketing", "sales"]
GRANTS: dict[str, list[str]] = {ALL_ROLE: DOMAINS, TWO_ROLE: TWO_DOMAINS}
METHODS: list[tuple[Literal["dense", "lexical", "hybrid"], str]] = [
    ("dense", "dense (MiniLM embedder alone)"),
    ("lexical", "BM25 (lexical)"),
    ("hybrid", "hybrid (default: both, fused by rank)"),
]
WARMUP = 10
FILLER_BATCH = 512
"""Filler texts embedded (and upserted) per step, shortest first: a batch pads to its longest text."""
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def settings(url: str, store: Path | None = None, cache_ttl: float = 0.0) -> Settings:
    return Settings(redis_url=url, knowledge_dir=store, knowledge_cache_ttl=cache_ttl)


def owner(url: str, store: Path) -> AgentMemoryInterface:
    """The interface that opens the store in this process, cache off."""
    return AgentMemoryInterface(
        settings(url, store), mode="owner", cache=False, permissions=KnowledgePermissions(GRANTS)
    )


# -- the knowledge service, in its own process ---------------------------------------------


def serve_knowledge(url: str, store: str, cache_ttl: float, ready: Event, stop: Event) -> None:
    """Run a KnowledgeService on ``store`` until ``stop`` is set or this process's parent is gone."""
    asyncio.run(_serve(url, Path(store), cache_ttl, ready, stop))


async def _serve(url: str, store: Path, cache_ttl: float, ready: Event, stop: Event) -> None:
    from agentcomms.knowledge.service import KnowledgeService

    config = settings(url, store, cache_ttl)
    memory = AgentMemoryInterface(config, mode="owner", cache=cache_ttl > 0, permissions=KnowledgePermissions(GRANTS))
    service = KnowledgeService(config, memory=memory)
    await service.initialize()
    ready.set()
    parent = os.getppid()
    try:
        while not await asyncio.to_thread(stop.wait, 0.5):
            if os.getppid() != parent:  # the benchmark died: do not outlive it
                break
    finally:
        try:  # bounded: without its parent, Redis (stopped with it) may be gone too
            await asyncio.wait_for(service.shutdown(timeout=2), 10)
        finally:
            await memory.close()


@asynccontextmanager
async def knowledge_service(url: str, store: Path, cache_ttl: float) -> AsyncIterator[None]:
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    process = context.Process(
        target=serve_knowledge, args=(url, str(store), cache_ttl, ready, stop), name="knowledge-service", daemon=True
    )
    process.start()
    try:
        started = time.perf_counter()
        while not await asyncio.to_thread(ready.wait, 0.5):
            if not process.is_alive():
                raise RuntimeError(f"the knowledge service exited with {process.exitcode} before it was ready")
            if time.perf_counter() - started > 120:
                raise RuntimeError("the knowledge service did not start within 120 s")
        log(
            f"knowledge service up (pid {process.pid}, cache ttl {cache_ttl:g}s) in {time.perf_counter() - started:.1f}s"
        )
        yield
    finally:
        stop.set()
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.terminate()
            await asyncio.to_thread(process.join, 5)


# -- the corpus and the filler -------------------------------------------------------------


def load_questions() -> list[dict[str, str]]:
    """The labelled questions: {question, domain, doc ("<domain>/<file>"), answer}."""
    questions: list[dict[str, str]] = json.loads((EXAMPLES / "questions.json").read_text(encoding="utf-8"))
    return questions


def corpus_sentences() -> tuple[dict[str, list[str]], float]:
    """Domain -> the sentences of its chunks (as ingested), of at least four words; and the chunks' mean words."""
    sentences: dict[str, list[str]] = {d: [] for d in DOMAINS}
    words: list[int] = []
    for document in scan_folder(CORPUS):
        if isinstance(document, SourceDocument):
            for chunk in chunk_document(document):
                sentences[document.domain] += [s for s in SENTENCE.split(chunk.text) if len(s.split()) >= 4]
                words.append(len(chunk.text.split()))
    return sentences, statistics.mean(words)


def filler_texts(start: int, count: int, sentences: dict[str, list[str]]) -> list[tuple[int, str, str, str]]:
    """(n, domain, title, text) of filler chunks ``start`` .. ``start + count``: a domain's sentences, shuffled."""
    out = []
    for n in range(start, start + count):
        rng = random.Random(n)
        domain = DOMAINS[n % len(DOMAINS)]
        target, words, picked = rng.randint(10, 30), 0, []
        while words < target:
            sentence = rng.choice(sentences[domain])
            picked.append(sentence)
            words += len(sentence.split())
        out.append((n, domain, f"{domain.capitalize()} notes", " ".join(picked)))
    return out


async def add_filler(memory: AgentMemoryInterface, total: int, sentences: dict[str, list[str]]) -> list[int]:
    """Upsert filler chunks until the store holds ``total`` chunks (embedded with the real embedder): their words."""
    store, embedder, lexical = memory.store, memory._embedder, memory._lexical
    assert store is not None and embedder is not None and lexical is not None
    have = await asyncio.to_thread(store.count)
    existing = await asyncio.to_thread(store.facet, "source_id")
    first = sum(1 for s in existing if s.startswith("filler:"))
    if have >= total:
        return []
    texts = sorted(filler_texts(first, total - have, sentences), key=lambda t: len(t[3]))
    started = time.perf_counter()
    for offset in range(0, len(texts), FILLER_BATCH):
        batch = texts[offset : offset + FILLER_BATCH]
        embedded = [f"{title}\n{text}" for _, _, title, text in batch]
        vectors = await asyncio.to_thread(embedder.embed, embedded)
        points = []
        for (n, domain, title, text), vector, body in zip(batch, vectors, embedded, strict=True):
            source_id = f"filler:{n}"
            version = hashlib.sha256(text.encode()).hexdigest()
            payload = {
                "text": text, "domain": domain, "doc": doc_key(domain, version, source_id), "source_id": source_id,
                "location": f"filler/{domain}/{n}", "title": title, "heading": "", "position": 0, "page": None,
                "kind": "document",
            }  # fmt: skip
            points.append(StoredChunk(point_id(source_id, 0), vector, payload, lexical.document(body)))
        await asyncio.to_thread(store.upsert, points)
        done = offset + len(batch)
        if done == len(texts) or done % (4 * FILLER_BATCH) == 0:
            rate = done / (time.perf_counter() - started)
            log(f"  filler: {done:,}/{len(texts):,} chunks embedded and stored ({rate:,.0f}/s)")
    return [len(text.split()) for _, _, _, text in texts]


# -- the measurements ----------------------------------------------------------------------


@dataclass
class Results:
    quality: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Method -> figure -> its value in each pass."""
    misses: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Question -> the labelled document, in how many passes hybrid missed it in the top 3, and how."""
    questions: int = 0
    passes: int = 0
    first: IngestReport | None = None
    second: IngestReport | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)
    corpus_words: float = 0.0
    """Mean words of the corpus's chunks."""
    filler_words: list[int] = field(default_factory=list)
    outside: int = 0
    """Results of the two-domain role outside its two domains (must be 0)."""


async def quality(memory: AgentMemoryInterface, questions: list[dict[str, str]], passes: int, results: Results) -> None:
    """recall@1, recall@3 and MRR@10 of each method, over ``passes`` passes (each should give the same figures)."""
    results.questions, results.passes = len(questions), passes
    for _ in range(passes):
        for method, label in METHODS:
            memory.retrieval = method
            at1 = at3 = reciprocal = 0.0
            for q in questions:
                found = await memory.search_knowledge("bench.quality", ALL_ROLE, q["question"], limit=10)
                ranked = [r.source.source_id for r in found]
                wanted = f"file:{CORPUS.resolve().as_posix()}/{q['doc']}"
                rank = ranked.index(wanted) + 1 if wanted in ranked else None
                at1 += rank == 1
                at3 += rank is not None and rank <= 3
                reciprocal += 1 / rank if rank else 0.0
                if method == "hybrid" and (rank is None or rank > 3):
                    top = ranked[0].removeprefix(f"file:{CORPUS.resolve().as_posix()}/") if ranked else "nothing"
                    miss = results.misses.setdefault(q["question"], {"doc": q["doc"], "passes": 0, "seen": set()})
                    miss["passes"] += 1
                    miss["seen"].add(f"rank {rank or '>10'}, first {top}")
            n = len(questions)
            figures = results.quality.setdefault(label, {"recall@1": [], "recall@3": [], "mrr": []})
            figures["recall@1"].append(at1 / n)
            figures["recall@3"].append(at3 / n)
            figures["mrr"].append(reciprocal / n)
    memory.retrieval = "hybrid"


async def timed(
    memory: AgentMemoryInterface, agent_id: str, questions: list[str], count: int, warmup: int, results: Results
) -> list[float]:
    """Milliseconds of ``count`` sequential searches (the questions cycled) after ``warmup`` others."""
    for i in range(warmup):
        await memory.search_knowledge(agent_id, TWO_ROLE, questions[(i + count) % len(questions)], limit=3)
    samples = []
    for i in range(count):
        query = questions[i % len(questions)]
        started = time.perf_counter()
        found = await memory.search_knowledge(agent_id, TWO_ROLE, query, limit=3)
        samples.append((time.perf_counter() - started) * 1000)
        results.outside += sum(r.domain not in TWO_DOMAINS for r in found)
    return samples


def row(chunks: int, visible: int, path: str, cache: str, samples: list[float]) -> dict[str, Any]:
    return {"chunks": chunks, "visible": visible, "path": path, "cache": cache, "queries": len(samples),
            "p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)}  # fmt: skip


async def latency_at(
    url: str, store: Path, total: int, sentences: dict[str, list[str]], args: argparse.Namespace, results: Results
) -> None:
    questions = [q["question"] for q in load_questions()]
    memory = await owner(url, store).initialize()
    try:
        log(f"filling the store to {total:,} chunks ...")
        results.filler_words += await add_filler(memory, total, sentences)
        assert memory.store is not None
        chunks = await asyncio.to_thread(memory.store.count)
        per_domain = await asyncio.to_thread(memory.store.facet, "domain")
        visible = sum(per_domain.get(d, 0) for d in TWO_DOMAINS)
        log(f"{chunks:,} chunks; in-process queries ...")
        samples = await timed(memory, "bench.local", questions, args.queries, WARMUP, results)
        results.latency.append(row(chunks, visible, "in-process (owner)", "off", samples))
    finally:
        await memory.close()
    async with knowledge_service(url, store, 0.0):
        client = await AgentMemoryInterface(settings(url), mode="client", sender_id="bench.client").initialize()
        try:
            log("over the bus, cache off ...")
            samples = await timed(client, "bench.client", questions, args.queries, WARMUP, results)
            results.latency.append(row(chunks, visible, "over the bus (client -> service process)", "off", samples))
        finally:
            await client.close()
    if total != args.sizes[-1]:  # the cache-on row: at the largest size only
        return
    async with knowledge_service(url, store, 300.0):
        client = await AgentMemoryInterface(settings(url), mode="client", sender_id="bench.client").initialize()
        try:
            log("over the bus, cache on (every query a repeat) ...")
            distinct = questions[: min(args.queries, len(questions))]
            samples = await timed(client, "bench.client", distinct, args.queries, len(distinct), results)
            results.latency.append(
                row(chunks, visible, "over the bus (client -> service process)", "on (hit)", samples)
            )
        finally:
            await client.close()


async def run(url: str, folder: Path, args: argparse.Namespace) -> Results:
    results = Results()
    store = folder / "store"
    memory = await owner(url, store).initialize()
    try:
        log(f"ingesting {CORPUS} ...")
        results.first = await memory.ingest(CORPUS)
        log(f"  {results.first.summary()}")
        results.second = await memory.ingest(CORPUS)
        log(f"  again: {results.second.summary()}")
        log("retrieval quality ...")
        await quality(memory, load_questions(), args.passes, results)
    finally:
        await memory.close()
    sentences, results.corpus_words = corpus_sentences()
    for total in args.sizes:
        await latency_at(url, store, total, sentences, args, results)
    return results


# -- the report ----------------------------------------------------------------------------


def header(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    versions = {name: metadata.version(name) for name in ("onnxruntime", "qdrant-edge-py")}
    return (
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores "
        f"(load average {os.getloadavg()[0]:.2f} at the start); redis-server {redis_version}, "
        f"Python {platform.python_version()}, onnxruntime {versions['onnxruntime']}, "
        f"qdrant-edge-py {versions['qdrant-edge-py']}."
    )


def report(results: Results, args: argparse.Namespace, head: str) -> str:
    first, second = results.first, results.second
    assert first is not None and second is not None
    lines = [head, ""]
    lines += [
        f"### Retrieval quality ({results.questions} labelled questions, role granted all {len(DOMAINS)} domains)",
        "",
        "| method | recall@1 | recall@3 | MRR (top 10, by document) |",
        "|---|---|---|---|",
    ]
    for label, q in results.quality.items():
        lines.append(f"| {label} | {figure(q['recall@1'])} | {figure(q['recall@3'])} | {figure(q['mrr'])} |")
    lines += [
        "",
        f"Median (min-max) of {results.passes} passes over the questions: the same in every pass (hybrid breaks ties "
        "of the fused score by the dense similarity, then the point id). Fusion's k (5) was chosen on these "
        "same questions (docs/knowledge.md), so hybrid's figures are optimistic for other corpora.",
        "",
    ]
    if results.misses:
        lines += ["Hybrid: the labelled document not in the top 3 (in how many passes; rank and first result):", ""]
        for question, miss in results.misses.items():
            how = "; ".join(sorted(miss["seen"]))
            lines.append(f"- {question} ({miss['doc']}): {miss['passes']}/{results.passes}; {how}")
        lines.append("")
    documents = len(first.added) + len(first.updated)
    seconds = max(first.seconds, 1e-9)
    lines += [
        f"### Ingest ({documents} documents, {first.chunks_embedded} chunks, {len(first.skipped)} files skipped)",
        "",
        "| ingest | seconds | documents/s | chunks/s | chunks embedded |",
        "|---|---|---|---|---|",
        f"| fresh store | {first.seconds:.2f} | {documents / seconds:.1f} | {first.chunks_embedded / seconds:.1f} | {first.chunks_embedded} |",
        f"| again, nothing changed ({second.unchanged} unchanged) | {second.seconds:.3f} | - | - | {second.chunks_embedded} |",
        "",
        f"### Query latency (role granted {len(TWO_DOMAINS)} of {len(DOMAINS)} domains: {', '.join(TWO_DOMAINS)}; limit 3; embedding included)",
        "",
        f"{args.queries} sequential queries per row (the labelled questions cycled) after {WARMUP} warm-up queries; "
        "the cache-on row first asks each question once, so that every timed query is a cache hit. Filler chunks "
        f"bring the store to the size shown: {len(results.filler_words):,} chunks of one to a few sentences of a domain, "
        f"shuffled ({statistics.mean(results.filler_words or [0]):.0f} words on average; the corpus's chunks "
        f"{results.corpus_words:.0f}), embedded by the same embedder.",
        "",
        "| chunks | readable by the role | path | cache | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.latency:
        lines.append(
            f"| {r['chunks']:,} | {r['visible']:,} | {r['path']} | {r['cache']} | {r['p50']:.2f} | {r['p99']:.2f} |"
        )
    lines += ["", f"Results outside the role's domains: {results.outside}.", ""]
    lines += ["### Goals", "", "| goal | met | measured |", "|---|---|---|"]
    for goal, met, value in goals(results):
        lines.append(f"| {goal} | {'yes' if met else '**no**'} | {value} |")
    return "\n".join(lines) + "\n"


def figure(values: list[float]) -> str:
    """The median of ``values``, with their range when they differ."""
    middle = statistics.median(values)
    return f"{middle:.3f}" if min(values) == max(values) else f"{middle:.3f} ({min(values):.3f}-{max(values):.3f})"


def goals(results: Results) -> list[tuple[str, bool, str]]:
    recall_passes = results.quality[METHODS[-1][1]]["recall@3"]
    recall = statistics.median(recall_passes)
    bus = [r for r in results.latency if r["path"].startswith("over the bus") and r["cache"] == "off"]
    largest = max(bus, key=lambda r: r["chunks"])
    second = results.second
    assert second is not None
    return [
        (f"recall@3 (hybrid, median of {results.passes} passes) >= 0.9", recall >= 0.9, figure(recall_passes)),
        (
            f"query p50 <= 20 ms over the bus at {largest['chunks']:,} chunks (embedding included, cache off)",
            largest["p50"] <= 20,
            f"{largest['p50']:.2f} ms",
        ),
        ("a second ingest of an unchanged folder embeds nothing", second.chunks_embedded == 0,
         f"{second.chunks_embedded} chunks embedded, {second.seconds:.3f} s"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer queries, 1k chunks only: a smoke run")
    parser.add_argument("--queries", type=int, default=None, help="timed queries per row (default 200; quick 40)")
    args = parser.parse_args()
    args.queries = args.queries or (40 if args.quick else 200)
    args.sizes = [1_000] if args.quick else [1_000, 20_000]
    args.passes = 1 if args.quick else 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agentcomms-bench-knowledge-") as folder:
        with EmbeddedRedis(Path(folder) / "redis", transport="tcp") as redis_server:
            head = header(redis_server.url)
            log(f"redis-server on {redis_server.url}; store in {folder}")
            results = asyncio.run(run(redis_server.url, Path(folder), args))
    tail = f"Load average at the end: {os.getloadavg()[0]:.2f} (other processes on the machine share its cores).\n"
    sys.stdout.write(report(results, args, head) + "\n" + tail)
    log(f"done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
