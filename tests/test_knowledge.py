"""Knowledge memory against real parts: the shipped corpus, the real embedder, qdrant-edge, a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import agentcomms
from agentcomms import (
    AgentMemoryInterface,
    BaseAgent,
    KnowledgeError,
    KnowledgePermissions,
    KnowledgeQueryError,
    KnowledgeService,
    KnowledgeStoreBusyError,
    MessageBroker,
    PermissionDeniedError,
    Settings,
    create_agent_config,
)
from agentcomms.embedded import EmbeddedRedis
from agentcomms.knowledge import DEFAULT_PERMISSIONS, ServerStore, SkippedFile
from agentcomms.knowledge.store import EdgeStore, Query
from agentcomms.security import b64encode, create_admin, enrol_team
from conftest import report

CORPUS = Path(agentcomms.__file__).parent / "examples" / "knowledge"
FACTS: list[dict[str, str]] = json.loads((CORPUS / "facts.json").read_text())
DOMAINS = sorted({f["domain"] for f in FACTS})
ROLES = [*sorted(DEFAULT_PERMISSIONS), "intern"]  # the seed's table, and a role with no grant
SECRET = next(f for f in FACTS if f["domain"] == "executive")  # the acquisition codename


@pytest.fixture(scope="session")
def corpus_store(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A knowledge store with the whole shipped corpus ingested once (copied by tests that change it)."""
    folder = tmp_path_factory.mktemp("knowledge")

    async def ingest() -> None:
        settings = Settings(redis_url=redis_server.url, knowledge_dir=folder)
        async with AgentMemoryInterface(settings, mode="owner") as memory:
            ingested = await memory.ingest(CORPUS / "corpus")
            assert len(ingested.added) == 77 and not ingested.skipped, ingested

    asyncio.run(ingest())
    return folder


@pytest.fixture
def store_dir(corpus_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "knowledge"
    shutil.copytree(corpus_store, copy, ignore=shutil.ignore_patterns("owner.lock"))
    return copy


@pytest.fixture
def kb_settings(settings: Settings, store_dir: Path) -> Settings:
    return settings.model_copy(update={"knowledge_dir": store_dir})


@pytest.fixture
async def memory(kb_settings: Settings) -> AsyncIterator[AgentMemoryInterface]:
    async with AgentMemoryInterface(kb_settings, mode="owner") as owner:
        yield owner


def texts(results: list[agentcomms.KnowledgeResult]) -> str:
    return "\n".join(r.text for r in results).casefold()


# -- permissions --------------------------------------------------------------------------------


async def test_every_role_finds_each_domains_fact_exactly_when_granted(memory: AgentMemoryInterface) -> None:
    """The permission matrix: every role x every domain, by each domain's distinctive fact."""
    granted_found = refused_clean = 0
    for role in ROLES:
        granted = DEFAULT_PERMISSIONS.get(role, frozenset())
        for fact in FACTS:
            results = await memory.search_knowledge("agent.test", role, fact["question"], limit=5)
            assert all(r.domain in granted for r in results), (role, fact["domain"], [r.domain for r in results])
            if fact["domain"] in granted:
                assert fact["phrase"].casefold() in texts(results), (role, fact)
                granted_found += 1
            else:
                wide = await memory.search_knowledge("agent.test", role, fact["question"], limit=50)
                assert fact["phrase"].casefold() not in texts(wide), (role, fact)
                refused_clean += 1
    assert granted_found == sum(f["domain"] in DEFAULT_PERMISSIONS.get(r, ()) for r in ROLES for f in FACTS)
    report(
        f"knowledge permissions: {len(ROLES)} roles x {len(FACTS)} domains: the distinctive fact found in "
        f"{granted_found}/{granted_found} granted pairs, absent in {refused_clean}/{refused_clean} others"
    )


async def test_a_role_without_a_grant_gets_nothing_and_never_an_unfiltered_query(
    memory: AgentMemoryInterface,
) -> None:
    assert await memory.search_knowledge("agent.x", "intern", "acquisition codename") == []
    assert await memory.search_knowledge("agent.x", None, "acquisition codename") == []
    # a filter can narrow the grant, never widen it
    narrowed = await memory.search_knowledge("agent.x", "cmo", "pricing", filters={"domains": ["sales"]})
    assert narrowed and {r.domain for r in narrowed} == {"sales"}
    assert await memory.search_knowledge("agent.x", "seo_agent", "codename", filters={"domains": ["executive"]}) == []
    store = memory.store
    assert store is not None
    with pytest.raises(KnowledgeError, match="an empty grant reads nothing"):
        store.search(Query([0.0] * 384), [], {}, 5)  # the store refuses it too: no domain is never "all"


async def test_bad_queries_are_typed_errors(memory: AgentMemoryInterface) -> None:
    with pytest.raises(KnowledgeQueryError, match="empty"):
        await memory.search_knowledge("agent.x", "cmo", "   ")
    with pytest.raises(KnowledgeQueryError, match="unknown knowledge filter"):
        await memory.search_knowledge("agent.x", "cmo", "q", filters={"owner": "me"})
    with pytest.raises(KnowledgeQueryError, match="limit"):
        await memory.search_knowledge("agent.x", "cmo", "q", limit=0)
    with pytest.raises(KnowledgeQueryError, match="limit 2000"):
        await memory.search_knowledge("agent.x", "cmo", "x" * 2001)


def test_permissions_file_extends_or_replaces_the_seed_table(tmp_path: Path) -> None:
    extended = tmp_path / "extend.json"
    extended.write_text(json.dumps({"roles": {"CSO": ["Sales", "executive"], "content_agent": []}}))
    permissions = KnowledgePermissions.from_file(extended)
    assert permissions.domains("cso") == {"sales", "executive"}
    assert permissions.domains("content_agent") == frozenset()  # an explicit empty grant
    assert permissions.domains("cmo") == DEFAULT_PERMISSIONS["cmo"]
    assert permissions.common(["cmo", "cso"]) == {"sales", "executive"}
    replaced = tmp_path / "replace.json"
    replaced.write_text(json.dumps({"replace": True, "roles": {"ceo": ["executive"]}}))
    assert KnowledgePermissions.from_file(replaced).domains("cmo") == frozenset()
    broken = tmp_path / "broken.json"
    broken.write_text('{"roles": {"cso": "sales"}}')
    with pytest.raises(agentcomms.ConfigError, match="broken.json"):
        KnowledgePermissions.from_file(broken)


# -- ingest -------------------------------------------------------------------------------------


async def test_reingest_embeds_only_what_changed_and_removes_what_is_gone(settings: Settings, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    for domain in ("marketing", "sales"):
        shutil.copytree(CORPUS / "corpus" / domain, docs / domain)
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        first = await memory.ingest(docs)
        assert len(first.added) == 22 and first.chunks_embedded > 0
        again = await memory.ingest(docs)
        assert (again.unchanged, again.chunks_embedded, again.added, again.updated) == (22, 0, [], [])
        changed = sorted((docs / "sales").glob("*.md"))[0]
        changed.write_text("# Renamed plan\n\nThe Osprey initiative doubles the Kestrel quota in Ohio.\n")
        gone = sorted((docs / "marketing").glob("*.md"))[0]
        gone.unlink()
        third = await memory.ingest(docs)
        assert third.updated == [str(changed)] and third.removed == [f"file:{gone}"]
        assert third.unchanged == 20 and third.chunks_embedded == 1
        found = await memory.search_knowledge("agent.x", "cmo", "Osprey initiative quota")
        assert found[0].source.location == str(changed) and found[0].source.title == "Renamed plan"
        stored = memory.store
        assert stored is not None
        documents = stored.documents()
        assert f"file:{gone}" not in documents
        assert documents[f"file:{changed}"].chunks == 1  # the old version's chunks are gone
    report(f"knowledge re-ingest: 22 documents, second pass embedded {again.chunks_embedded} chunks")


async def test_ingesting_another_folder_keeps_what_came_from_the_first(settings: Settings, tmp_path: Path) -> None:
    for team in ("north", "south"):  # the same relative paths in both: two documents each, not one
        (tmp_path / team / "ops").mkdir(parents=True)
        (tmp_path / team / "ops" / "dock.md").write_text(f"# Dock\n\nThe {team} dock opens at six.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner", permissions=KnowledgePermissions({"ops": ["ops"]})) as memory:
        await memory.ingest(tmp_path / "north")
        second = await memory.ingest(tmp_path / "south")
        assert second.removed == [] and len(second.added) == 1
        found = await memory.search_knowledge("agent.x", "ops", "when does the dock open?")
        assert sorted(r.text for r in found) == ["The north dock opens at six.", "The south dock opens at six."]
        (tmp_path / "north" / "ops" / "dock.md").unlink()
        third = await memory.ingest(tmp_path / "north")
        assert third.removed == [f"file:{(tmp_path / 'north' / 'ops' / 'dock.md').resolve()}"]
        shutil.rmtree(tmp_path / "south")  # a folder gone: its documents are removed by name
        gone = await memory.remove(tmp_path / "south")
        assert gone.removed == [f"file:{(tmp_path / 'south' / 'ops' / 'dock.md').resolve()}"]
        assert await memory.search_knowledge("agent.x", "ops", "when does the dock open?") == []


async def test_bad_files_are_skipped_with_a_reason(settings: Settings, tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "ops"
    docs.mkdir(parents=True)
    (docs / "good.md").write_text("# Good\n\nThe loading dock opens at six.\n")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (docs / "empty.md").write_text("  \n")
    (docs / "huge.txt").write_text("word " * 300_000)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n")
    (docs / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "dangling.md").symlink_to(tmp_path / "nowhere.md")
    (tmp_path / "docs" / "loose.md").write_text("no domain folder")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        result = await memory.ingest(tmp_path / "docs", max_file_bytes=1_000_000)
    reasons = {Path(s["location"]).name: s["reason"] for s in result.skipped}
    assert [Path(p).name for p in result.added] == ["good.md"]
    assert reasons["binary.txt"].startswith("cannot extract text: binary content")
    assert reasons["empty.md"] == "empty"
    assert reasons["huge.txt"].startswith("too large: 1500000 bytes")
    assert reasons["broken.pdf"].startswith("cannot extract text")
    assert reasons["photo.png"] == "unsupported file type .png"
    assert reasons["latin1.md"].startswith("cannot extract text: not UTF-8")
    assert reasons["dangling.md"].startswith("unreadable")
    assert reasons["loose.md"].startswith("no domain")


async def test_a_file_that_cannot_be_read_this_time_keeps_its_stored_copy(settings: Settings, tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "ops"
    docs.mkdir(parents=True)
    (docs / "dock.md").write_text("# Dock\n\nThe loading dock opens at six.\n")
    (docs / "yard.md").write_text("# Yard\n\nThe yard closes at ten.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        await memory.ingest(tmp_path / "docs")
        (docs / "dock.md").unlink()
        (docs / "dock.md").symlink_to(tmp_path / "unmounted" / "dock.md")  # unreadable now, not deleted
        again = await memory.ingest(tmp_path / "docs")
        assert again.removed == [] and again.skipped[0]["reason"].startswith("unreadable")
        listing_failed = SkippedFile("gdrive folder", "cannot list the folder: HTTP 500", incomplete=True)
        third = await memory.ingest_documents([listing_failed], scope="file:")
        assert third.removed == [] and third.removal_skipped is not None
        assert memory.store is not None and set(memory.store.documents()) == {
            f"file:{docs}/dock.md",
            f"file:{docs}/yard.md",
        }


async def test_ingest_of_a_missing_path_is_a_clear_error(memory: AgentMemoryInterface, tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="no such file or folder"):
        await memory.ingest(tmp_path / "nope")


# -- results, cache, insights -------------------------------------------------------------------


async def test_results_carry_text_source_domain_and_score(memory: AgentMemoryInterface) -> None:
    results = await memory.search_knowledge("agent.x", "cmo", "who is buying the camera startup and for how much")
    top = results[0]
    assert top.domain == "executive" and "Larkspur" in top.text
    assert (
        top.source.source_id == f"file:{(CORPUS / 'corpus').resolve()}/executive/project-nightjar-acquisition-memo.md"
    )
    assert top.source.title.startswith("Project Nightjar") and top.source.location.endswith(".md")
    assert top.score > 0 and [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert len({r.source.source_id for r in results}) == len(results)  # one chunk per document


async def test_a_repeated_search_is_served_from_the_cache_until_its_domain_changes(
    memory: AgentMemoryInterface, tmp_path: Path
) -> None:
    first = await memory.search_knowledge("agent.x", "seo_agent", "how many monthly searches for the arm keyword")
    assert (memory.embedded_queries, memory.cache_hits) == (1, 0)
    second = await memory.search_knowledge("agent.x", "seo_agent", "how many  monthly searches for the arm keyword ")
    assert (memory.embedded_queries, memory.cache_hits) == (1, 1) and second == first
    extra = tmp_path / "seo"
    extra.mkdir()
    (extra / "new.md").write_text("# Arm keyword\n\nThe arm keyword now gets 9,999 monthly searches.\n")
    await memory.ingest(extra, domain="seo")  # the seo domain changed: its cached searches are stale
    third = await memory.search_knowledge("agent.x", "seo_agent", "how many monthly searches for the arm keyword")
    assert memory.embedded_queries == 2 and third != first
    await memory.search_knowledge("agent.x", "content_agent", "how many monthly searches for the arm keyword")
    assert memory.embedded_queries == 3  # another role, another grant: another entry


async def test_insights_are_shared_into_granted_domains_only(memory: AgentMemoryInterface) -> None:
    insight = "Trade-show leads from Chicago convert twice as well when demoed on the Wren W3."
    insight_id = await memory.share_insight("agent.cmo", "cmo", insight, ["marketing", "sales"], title="Lead quality")
    assert insight_id.startswith("insight:")
    seen = await memory.search_knowledge(
        "agent.seo", "seo_agent", "which leads convert best", filters={"kind": "insight"}
    )
    assert seen and seen[0].kind == "insight" and seen[0].author == "agent.cmo" and seen[0].domain == "marketing"
    by_author = await memory.search_knowledge("agent.x", "cmo", "leads", filters={"author": "agent.cmo"})
    assert {r.domain for r in by_author} == {"marketing", "sales"}
    with pytest.raises(PermissionDeniedError, match="may not share into \\['executive'\\]"):
        await memory.share_insight("agent.seo", "seo_agent", "Rankings fell.", ["seo", "executive"])
    with pytest.raises(KnowledgeQueryError):
        await memory.share_insight("agent.seo", "seo_agent", "x", [])


# -- one owner ----------------------------------------------------------------------------------


async def test_the_embedded_store_has_one_owner(kb_settings: Settings, store_dir: Path) -> None:
    async with AgentMemoryInterface(kb_settings, mode="owner"):
        with pytest.raises(KnowledgeStoreBusyError, match="open in another process"):
            EdgeStore(store_dir, embedder_name="all-MiniLM-L6-v2-int8", dimension=384)
        other = subprocess.run(  # another process: refused, and the owner's data is untouched
            [sys.executable, "-c", "from pathlib import Path; from agentcomms.knowledge.store import EdgeStore; "
             f"EdgeStore(Path({str(store_dir)!r}), embedder_name='all-MiniLM-L6-v2-int8', dimension=384)"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode != 0 and "KnowledgeStoreBusyError" in other.stderr
        async with AgentMemoryInterface(kb_settings) as second:  # auto: the store is taken, so ask the service
            assert second.mode == "client"
            with pytest.raises(agentcomms.KnowledgeNotConfiguredError, match="agentcomms knowledge serve"):
                await second.search_knowledge("agent.x", "cmo", "anything")


async def test_a_store_made_by_another_embedder_is_refused(kb_settings: Settings, store_dir: Path) -> None:
    with pytest.raises(agentcomms.KnowledgeNotConfiguredError, match="was built with all-MiniLM-L6-v2-int8"):
        EdgeStore(store_dir, embedder_name="my-api-embedder", dimension=1536)


# -- the knowledge service, over the bus -----------------------------------------------------------


@pytest.fixture
async def service(kb_settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with KnowledgeService(kb_settings) as running:
        yield running


async def test_other_processes_search_through_the_service(kb_settings: Settings, service: KnowledgeService) -> None:
    async with AgentMemoryInterface(kb_settings) as client:
        assert client.mode == "client"
        cmo = await client.search_knowledge("agent.cmo", "cmo", SECRET["question"])
        assert "project nightjar" in texts(cmo)
        content = await client.search_knowledge("agent.content", "content_agent", SECRET["question"], limit=50)
        assert "project nightjar" not in texts(content) and {r.domain for r in content} <= {"marketing", "content"}
        stats = await client.stats()
        assert stats["documents"] == 77 and stats["domains"]["executive"]["documents"] == 11
        insight = await client.share_insight("agent.cmo", "cmo", "Chicago leads convert best.", ["marketing"])
        assert insight.startswith("insight:")
        with pytest.raises(PermissionDeniedError):
            await client.share_insight("agent.seo", "seo_agent", "Hidden.", ["executive"])
        with pytest.raises(KnowledgeQueryError, match="unknown knowledge filter"):
            await client.search_knowledge("agent.cmo", "cmo", "q", filters={"nope": "x"})


async def test_an_agent_answers_only_with_what_the_asker_may_see(
    kb_settings: Settings, service: KnowledgeService
) -> None:
    """BaseAgent's default REQUEST_KNOWLEDGE answer searches the domains both roles may read."""
    cmo_config = create_agent_config("agent.cmo.john", "john", "cmo", "executive")
    content_config = create_agent_config("agent.content.sarah", "sarah", "content_agent", "marketing")
    async with BaseAgent(cmo_config, settings=kb_settings) as cmo, BaseAgent(content_config, settings=kb_settings):
        own = await cmo.search_knowledge(SECRET["question"])
        assert "project nightjar" in texts(own)  # the CMO itself may read executive knowledge
        async with MessageBroker(settings=kb_settings) as broker:
            asker = agentcomms.MessageSender(sender_id="agent.content.sarah", broker=broker)
            reply = await asker.request("agent.cmo.john", "request_knowledge", {"query": SECRET["question"]})
        assert reply.success, reply
        found = reply.data["results"]
        assert found and all(r["domain"] == "marketing" for r in found)  # content_agent ∩ cmo = marketing
        assert "nightjar" not in json.dumps(found).casefold()


TEAM = [("agent.cmo.john", ["cmo"]), ("agent.content.sarah", ["content_agent"])]


@pytest.fixture
async def secure_kb(redis_url: str, tmp_path: Path, store_dir: Path) -> Settings:
    folder = tmp_path / "identities"
    admin = create_admin(folder, "admin.ops")
    async with MessageBroker(settings=Settings(redis_url=redis_url)) as broker:
        await enrol_team(broker.pipeliner, folder, admin, [*TEAM, ("knowledge", ["knowledge_service"])])
    return Settings(
        redis_url=redis_url, security="on", identity_dir=folder, trust_anchors=[b64encode(admin.public.ed25519)],
        knowledge_dir=store_dir, message_timeout=10,
    )  # fmt: skip


async def test_with_security_the_service_takes_the_role_from_the_verified_sender(secure_kb: Settings) -> None:
    async with KnowledgeService(secure_kb), AgentMemoryInterface(secure_kb, mode="client") as client:
        question = SECRET["question"]
        with pytest.raises(PermissionDeniedError, match="does not hold role 'cmo'"):
            await client.search_knowledge("agent.content.sarah", "cmo", question)  # claiming another role
        own = await client.search_knowledge("agent.content.sarah", None, question, limit=50)
        assert own and {r.domain for r in own} <= {"marketing", "content"}
        cmo = await client.search_knowledge("agent.cmo.john", None, question)
        assert "project nightjar" in texts(cmo)
        with pytest.raises(PermissionDeniedError, match="only an admin"):
            await client.ingest(CORPUS / "corpus", agent_id="agent.cmo.john")
        stats = await client.stats("agent.content.sarah")  # not an admin: only what its role may read
        assert set(stats["domains"]) == {"marketing", "content"} and stats["permissions"] == {}
        assert "knowledge" not in stats["store"]


# -- a Qdrant server's API (qdrant-client's own local engine stands in for the server) -----------


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local Qdrant")
async def test_the_server_store_builds_the_same_permission_filter(settings: Settings, tmp_path: Path) -> None:
    from qdrant_client import QdrantClient

    docs = tmp_path / "docs"
    for domain in ("executive", "marketing", "content"):
        shutil.copytree(CORPUS / "corpus" / domain, docs / domain)
    server = ServerStore(None, collection="kb", dimension=384, client=QdrantClient(location=":memory:"))
    async with AgentMemoryInterface(settings, store=server, cache=False) as memory:
        assert memory.mode == "owner"
        await memory.ingest(docs)
        fact = next(f for f in FACTS if f["domain"] == "executive")
        cmo = await memory.search_knowledge("agent.x", "cmo", fact["question"])
        assert fact["phrase"].casefold() in texts(cmo)
        content = await memory.search_knowledge("agent.x", "content_agent", fact["question"], limit=50)
        assert fact["phrase"].casefold() not in texts(content)
        assert {r.domain for r in content} <= {"marketing", "content"}
        assert (await memory.ingest(docs)).chunks_embedded == 0
    server.close()


class LetterEmbedder:
    """A user's own embedder (here: letter frequencies), to show the interface takes any."""

    name = "letters-26"
    dimension = 26

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            counts = [float(text.casefold().count(chr(ord("a") + i))) for i in range(26)]
            norm = sum(c * c for c in counts) ** 0.5 or 1.0
            out.append([c / norm for c in counts])
        return out


async def test_an_embedder_of_your_own_is_used_and_its_store_refuses_another(
    settings: Settings, tmp_path: Path
) -> None:
    docs = tmp_path / "docs" / "ops"
    docs.mkdir(parents=True)
    (docs / "dock.md").write_text("# Dock\n\nThe loading dock opens at six.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    grants = KnowledgePermissions({"ops": ["ops"]})
    async with AgentMemoryInterface(kb, mode="owner", embedder=LetterEmbedder(), permissions=grants) as memory:
        assert isinstance(LetterEmbedder(), agentcomms.Embedder)
        await memory.ingest(tmp_path / "docs")
        found = await memory.search_knowledge("agent.x", "ops", "when does the loading dock open?")
        assert found[0].source.title == "Dock"
        assert (await memory.stats())["embedder"] == "letters-26"
    with pytest.raises(agentcomms.KnowledgeNotConfiguredError, match="built with letters-26"):
        async with AgentMemoryInterface(kb, mode="owner"):  # the default embedder on that store
            pass


# -- what the review found: typed errors, nothing lost, nothing shared across stores --------------


async def test_an_invalid_domain_is_refused_before_anything_is_removed(
    memory: AgentMemoryInterface, tmp_path: Path
) -> None:
    before = len(memory.store.documents()) if memory.store else 0
    with pytest.raises(KnowledgeQueryError, match="invalid domain 'Bad Domain!'"):
        await memory.ingest(CORPUS / "corpus", domain="Bad Domain!")
    assert memory.store is not None and len(memory.store.documents()) == before


async def test_a_folder_that_cannot_be_listed_removes_nothing(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = tmp_path / "docs"
    for domain in ("sales", "marketing"):
        (docs / domain).mkdir(parents=True)
        (docs / domain / "a.md").write_text(f"# A\n\nThe {domain} plan.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        await memory.ingest(docs)
        real_scandir = os.scandir

        def refuse_sales(path: Any) -> Any:  # what a user without the rights to list it gets (root always may)
            if Path(path).name == "sales":
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", refuse_sales)
        again = await memory.ingest(docs)
        assert again.removed == [] and again.removal_skipped is not None
        assert again.skipped[0]["reason"] == "cannot list the folder: Permission denied"


async def test_two_stores_on_one_redis_do_not_share_cached_results(settings: Settings, tmp_path: Path) -> None:
    grants = KnowledgePermissions({"ops": ["ops"]})
    found = []
    for tenant in ("a", "b"):
        (tmp_path / tenant / "ops").mkdir(parents=True)
        (tmp_path / tenant / "ops" / "plan.md").write_text(f"# Plan\n\nTenant {tenant} launches in spring.\n")
        kb = settings.model_copy(update={"knowledge_dir": tmp_path / f"kb-{tenant}"})
        async with AgentMemoryInterface(kb, mode="owner", permissions=grants) as memory:
            await memory.ingest(tmp_path / tenant)
            found.append((await memory.search_knowledge("agent.x", "ops", "when is the launch?"))[0].text)
    assert found == ["Tenant a launches in spring.", "Tenant b launches in spring."]


class FailingEmbedder(LetterEmbedder):
    """An embedder of the user's own whose service fails after a while (an API going down)."""

    calls = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        FailingEmbedder.calls += 1
        if FailingEmbedder.calls > 3:
            raise ConnectionError("embedding API unreachable")
        return super().embed(texts)


async def test_an_ingest_that_fails_midway_is_typed_and_leaves_no_stale_cache(
    settings: Settings, tmp_path: Path
) -> None:
    docs = tmp_path / "docs" / "ops"
    docs.mkdir(parents=True)
    (docs / "a.md").write_text("# Dates\n\nThe launch is in May.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    grants = KnowledgePermissions({"ops": ["ops"]})
    async with AgentMemoryInterface(kb, mode="owner", embedder=FailingEmbedder(), permissions=grants) as memory:
        await memory.ingest(tmp_path / "docs")  # embedder call 1
        assert "May" in (await memory.search_knowledge("agent.x", "ops", "launch date"))[0].text  # call 2, cached
        (docs / "a.md").write_text("# Dates\n\nThe launch moved to June.\n")
        (docs / "b.md").write_text("# More\n\nAnother document.\n")
        with pytest.raises(KnowledgeError, match="embedding API unreachable"):
            await memory.ingest(tmp_path / "docs")  # a.md stored (call 3), b.md fails (call 4)
        with pytest.raises(KnowledgeError, match="embedder letters-26 failed"):
            await memory.search_knowledge("agent.x", "ops", "launch date")  # not the stale cached May


async def test_odd_inputs_are_typed_errors(memory: AgentMemoryInterface) -> None:
    for filters in (["domains"], 5, "executive"):
        with pytest.raises(KnowledgeQueryError, match="filters must be an object"):
            await memory.search_knowledge("agent.x", "cmo", "q", filters=filters)  # type: ignore[arg-type]
    with pytest.raises(KnowledgeQueryError, match="limit"):
        await memory.search_knowledge("agent.x", "cmo", "q", limit=True)
    with pytest.raises(KnowledgeQueryError, match=r"\['bad domain!'\] are not domain names"):
        await memory.search_knowledge("agent.x", "cmo", "q", filters={"domains": ["sales", "bad domain!"]})
    with pytest.raises(KnowledgeQueryError, match="cannot be embedded"):
        await memory.search_knowledge("agent.x", "cmo", "bad \ud800 text")
    one = await memory.share_insight("agent.x", "cmo", "One domain as a string.", "marketing")
    assert one.startswith("insight:")


async def test_a_qdrant_server_password_never_shows(settings: Settings) -> None:
    with pytest.raises(agentcomms.KnowledgeNotConfiguredError) as refused:
        ServerStore("http://admin:S3CRETPW@127.0.0.1:1", collection="kb", dimension=384)
    assert "S3CRETPW" not in str(refused.value) and "127.0.0.1:1" in str(refused.value)


def test_permission_domains_are_normalised_and_checked() -> None:
    assert KnowledgePermissions({"cso": ["Product Marketing"]}).domains("CSO") == {"product_marketing"}
    with pytest.raises(agentcomms.ConfigError, match="'sales/eu' is not a domain name"):
        KnowledgePermissions({"cso": ["sales/eu"]})


async def test_the_service_ingests_only_under_its_roots_and_leaves_no_connection_when_busy(
    kb_settings: Settings, store_dir: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed" / "ops"
    allowed.mkdir(parents=True)
    (allowed / "a.md").write_text("# A\n\nAllowed.\n")
    async with (
        KnowledgeService(kb_settings, ingest_roots=[tmp_path / "allowed"]),
        AgentMemoryInterface(kb_settings, mode="client") as client,
    ):
        assert len((await client.ingest(tmp_path / "allowed")).added) == 1
        with pytest.raises(
            PermissionDeniedError, match="not under the folders this knowledge service ingests.*for the service"
        ):
            await client.ingest(Path("/etc"))
        second = KnowledgeService(kb_settings)
        with pytest.raises(KnowledgeStoreBusyError):
            await second.initialize()
        assert not second.broker.connected


async def test_ingesting_a_domain_folder_by_mistake_removes_nothing(settings: Settings, tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "hr"
    docs.mkdir(parents=True)
    (docs / "leave.md").write_text("# Leave\n\nTwenty-five days a year.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        await memory.ingest(tmp_path / "docs")
        mistaken = await memory.ingest(docs)  # the domain folder itself: its files have no domain now
        assert mistaken.removed == [] and "pass --domain NAME" in mistaken.skipped[0]["reason"]
        assert memory.store is not None and len(memory.store.documents()) == 1


async def test_a_search_while_the_service_is_offline_fails_at_once(kb_settings: Settings) -> None:
    async with KnowledgeService(kb_settings):
        pass  # registered, then gone: offline
    async with AgentMemoryInterface(kb_settings, mode="client") as client:
        with pytest.raises(agentcomms.KnowledgeNotConfiguredError, match="is offline"):
            await client.search_knowledge("agent.x", "cmo", "anything")
