"""The dashboard's REST API on a real redis-server, with real agents in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis
from sse_starlette.sse import AppStatus

import agentcomms
import agentcomms.web.api
from agentcomms import (
    AgentInfo,
    AgentMemoryInterface,
    AgentMessage,
    AgentRegistry,
    BaseAgent,
    BrokerConnectionError,
    CommandOutcomeUnknownError,
    ConfigError,
    IdentityError,
    InboxFullError,
    KnowledgeService,
    MessageBroker,
    MessageTooLargeError,
    RedisPermissionError,
    Settings,
    keys,
)
from agentcomms.examples import TwinAgent, create_agent_config
from agentcomms.security import create_admin, enrol_team
from agentcomms.web import create_app
from agentcomms.web.problems import problem_for
from conftest import Listener, wait_for_dead_letters, wait_for_entries
from faultkit import RedisServer

pytestmark = pytest.mark.record  # the record on, as a dashboard's agents would keep it

BASE = "http://dashboard"
TOKEN = "s3cret-token-for-tests"


class Stalling(BaseAgent):
    """Never answers a question until released (at the end of the test, so that it can stop)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        await self.release.wait()
        return {}


class StreamingTransport(httpx.AsyncBaseTransport):
    """Like ``httpx.ASGITransport``, but hands the body over as the app sends it; closing the response disconnects.

    ``httpx.ASGITransport`` answers only once the app has finished, which an event stream never does.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        started: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = asyncio.get_running_loop().create_future()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.set_result((message["status"], message.get("headers", [])))
            elif message["type"] == "http.response.body":
                chunks.put_nowait(message.get("body", b""))
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw], "scheme": request.url.scheme,
            "path": request.url.path, "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query, "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123), "root_path": "",
        }  # fmt: skip
        app = asyncio.create_task(self.app(scope, receive, send))
        first: list[asyncio.Future[Any]] = [started, app]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            app.result()  # what the app raised
            raise AssertionError("the app ended without answering")
        status, headers = started.result()
        return httpx.Response(status, headers=headers, stream=_LiveBody(chunks, disconnected, app))


class _LiveBody(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue[bytes | None], disconnected: asyncio.Event, app: asyncio.Task[None]):
        self.chunks, self.disconnected, self.app = chunks, disconnected, app

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.disconnected.set()
        async with asyncio.timeout(10):
            await self.app


@contextlib.asynccontextmanager
async def serve(settings: Settings, *, streaming: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a dashboard app whose lifespan runs meanwhile."""
    app = create_app(settings)
    transport = StreamingTransport(app) if streaming else httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as instance:
        yield instance


async def register_offline(
    broker: MessageBroker, agent_id: str, role: str = "cfo", department: str = "finance"
) -> None:
    registry = AgentRegistry(broker)
    await registry.register_agent(AgentInfo(agent_id=agent_id, user_name="o", role=role, department=department))
    await registry.leave(agent_id)  # registered, not running


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response's problem detail, checked for its RFC 9457 shape, status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"urn:agentcomms:problem:{code}"
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    return body


# -- health, docs, errors -----------------------------------------------------------------------


async def test_health_reports_redis_and_the_dashboard(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["error"] is None and body["redis_version"]
    assert body["sender_id"] == "dashboard" and body["client_id"].startswith("dashboard.")
    assert body["version"] == agentcomms.__version__ and body["stats"]["round_trips"] >= 1
    problem(await client.post("/api/health"), 405, "method_not_allowed")
    problem(await client.get("/api/nothing/here"), 404, "not_found")


async def test_openapi_documents_every_route_and_its_problem_codes(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/api/openapi.json")).json()
    assert schema["info"] == {
        "title": "agentcomms", "version": agentcomms.__version__, "summary": schema["info"]["summary"]
    }  # fmt: skip
    assert set(schema["paths"]) == {
        "/api/health", "/api/agents", "/api/agents/{agent_id}", "/api/send", "/api/ask", "/api/broadcast",
        "/api/deadletters", "/api/deadletters/{agent_id}", "/api/deadletters/{agent_id}/{entry_id}",
        "/api/deadletters/{agent_id}/{entry_id}/redrive", "/api/stats", "/api/knowledge/search", "/api/events",
        "/api/conversations", "/api/conversations/{conversation_id}", "/api/messages",
        "/api/messages/{message_id}/receipts",
    }  # fmt: skip
    ask = schema["paths"]["/api/ask"]["post"]
    assert ask["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AskRequest")
    assert ask["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/AgentResponse")
    assert "`timeout`" in ask["responses"]["504"]["description"]
    assert "`no_agent_available`" in ask["responses"]["404"]["description"]
    assert "`invalid_request`" in ask["responses"]["422"]["description"]
    assert "`redis_unavailable`" in ask["responses"]["503"]["description"]
    problem_body = ask["responses"]["404"]["content"]["application/problem+json"]["schema"]
    assert problem_body["$ref"] == "#/components/schemas/Problem"
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # 422s are problems too
    assert {"type", "title", "status", "detail", "code"} <= set(schema["components"]["schemas"]["Problem"]["required"])
    events = schema["paths"]["/api/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in events
    docs = await client.get("/api/docs")
    assert docs.status_code == 200 and "/api/openapi.json" in docs.text


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InboxFullError(agent_id="agent.a", length=3, limit=3), 503, "inbox_full"),
        (MessageTooLargeError(size=2000, limit=1024), 422, "invalid_message"),
        (BrokerConnectionError("Redis unreachable", url="redis://:hunter2@127.0.0.1:1/0"), 503, "redis_unavailable"),
        (CommandOutcomeUnknownError("lost mid-command"), 503, "redis_unavailable"),
        (RedisPermissionError("NOPERM no", code="NOPERM", command="XRANGE"), 403, "forbidden"),
        (ConfigError("bad url rediss://user:hunter2@127.0.0.1:1"), 500, "ConfigError"),
    ],
)
def test_every_error_maps_to_a_status_and_code_without_secrets(error: Exception, status: int, code: str) -> None:
    assert isinstance(error, agentcomms.AgentCommsError)
    found = problem_for(error, secrets=["s3cret"])
    assert (found.status, found.code) == (status, code)
    assert "hunter2" not in found.detail and found.detail


# -- access ----------------------------------------------------------------------------------------


async def test_a_token_is_required_when_set_and_never_shown(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(update={"dashboard_token": SecretStr(TOKEN)})  # AGENTCOMMS_DASHBOARD_TOKEN
    async with serve(settings) as client:
        missing = await client.get("/api/agents")
        problem(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.get("/api/stats", headers={"Authorization": "Bearer not-it"})
        problem(wrong, 401, "unauthorized")
        basic = await client.get("/api/health", headers={"Authorization": f"Basic {TOKEN}"})
        problem(basic, 401, "unauthorized")
        invalid = await client.post("/api/send", json={}, headers={"Authorization": f"Bearer {TOKEN}x"})
        problem(invalid, 401, "unauthorized")  # refused before its body is looked at
        good = await client.get("/api/agents", headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200 and good.json() == []
        schema = await client.get("/api/openapi.json")  # the description of the API, not its data
        assert schema.status_code == 200
        assert "`unauthorized`" in schema.json()["paths"]["/api/agents"]["get"]["responses"]["401"]["description"]
        # the probes want no token (a kubelet has none) and say only up or down
        alive, ready = await client.get("/healthz"), await client.get("/readyz")
        assert (alive.status_code, alive.json()) == (200, {"status": "alive"})
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        for response in (missing, wrong, basic, invalid, good, schema, alive, ready):
            assert TOKEN not in response.text and TOKEN not in str(response.headers)
    assert TOKEN not in caplog.text


async def test_readiness_is_503_while_redis_does_not_answer(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", binary=os.environ.get("AGENTCOMMS_REDIS_SERVER")) as server:
        settings = Settings(redis_url=server.url, reconnect_timeout=0.5)
        async with serve(settings) as client:
            assert (await client.get("/readyz")).status_code == 200
            server.kill()
            assert (await client.get("/readyz")).json() == {"ready": False}
            assert (await client.get("/healthz")).status_code == 200  # the process itself is fine


async def test_with_security_on_the_dashboard_asks_as_its_identity(redis_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "identities"
    admin = create_admin(folder, "admin.ops")
    async with MessageBroker(settings=Settings(redis_url=redis_url)) as broker:
        await enrol_team(broker.pipeliner, folder, admin, [("agent.cso.jane", ["cso"]), ("dashboard.ops", ["cmo"])])
    anchors = (folder / "trust_anchors").read_text().split()
    secure: dict[str, Any] = {"redis_url": redis_url, "security": "on", "trust_anchors": anchors}
    own = {**secure, "identity_dir": tmp_path / "none"}
    jane = create_agent_config("agent.cso.jane", "jane", "cso", "sales")
    async with (
        TwinAgent(jane, settings=Settings(**own, identity_file=folder / "agent.cso.jane.json")),
        serve(Settings(**own, identity_file=folder / "dashboard.ops.json")) as client,
    ):
        assert (await client.get("/api/health")).json()["sender_id"] == "dashboard.ops"
        asked = await client.post("/api/ask", json={"role": "cso", "data": {"query": "Pipeline?"}})
        assert asked.status_code == 200, asked.text  # both ways authenticated: jane took it, the dashboard its reply
        assert asked.json()["success"] is True and asked.json()["data"]["pipeline"]
        not_admin = await client.post("/api/deadletters/agent.cso.jane/1-0/redrive")
        assert "admin" in problem(not_admin, 403, "forbidden")["detail"]
    with pytest.raises(IdentityError, match="AGENTCOMMS_IDENTITY"):  # three identities there: which one?
        async with serve(Settings(**secure, identity_dir=folder)):
            pass


# -- agents ----------------------------------------------------------------------------------------


async def test_agents_are_listed_filtered_and_fetched(
    client: httpx.AsyncClient, sarah: TwinAgent, broker: MessageBroker
) -> None:
    await register_offline(broker, "agent.cfo")
    everyone = (await client.get("/api/agents")).json()
    assert sorted(a["agent_id"] for a in everyone) == ["agent.cfo", "agent.sarah"]

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/api/agents", params=params)
        assert response.status_code == 200, response.text
        return sorted(AgentInfo.model_validate(a).agent_id for a in response.json())

    assert await ids(online_only="true") == ["agent.sarah"]
    assert await ids(role="CONTENT_AGENT") == ["agent.sarah"]
    assert await ids(department="finance") == ["agent.cfo"]
    assert await ids(capability="content_creation", intent="assign_task") == ["agent.sarah"]
    assert await ids(role="cto") == []
    one = await client.get("/api/agents/agent.sarah")
    info = AgentInfo.model_validate(one.json())
    assert info.role == "content_agent" and info.status == "online" and "request_knowledge" in info.supported_intents
    body = problem(await client.get("/api/agents/agent.nobody"), 404, "agent_not_found")
    assert "agent.nobody" in body["detail"]
    problem(await client.get("/api/agents/%7Bbraces%7D"), 422, "invalid_request")
    problem(await client.get("/api/agents", params={"online_only": "perhaps"}), 422, "invalid_request")


# -- sending and asking --------------------------------------------------------------------------------


async def test_send_delivers_a_message_and_answers_where_it_went(client: httpx.AsyncClient, listener: Listener) -> None:
    response = await client.post(
        "/api/send",
        json={
            "recipient_id": "agent.listener", "intent": "share_insights", "data": {"insight": "Chicago converts"},
            "priority": "high", "context": {"campaign": "q4"}, "conversation_id": "conv-1",
        },
    )  # fmt: skip
    assert response.status_code == 200, response.text
    sent = response.json()
    assert sent["recipient_id"] == "agent.listener" and sent["entry_id"] and sent["duplicate"] is False
    async with asyncio.timeout(10):
        message = await listener.insights.get()
    assert message.message_id == sent["message_id"] and message.sender_id == "dashboard"
    assert message.payload.data == {"insight": "Chicago converts"} and message.payload.priority == "high"
    assert message.payload.context == {"campaign": "q4"} and message.conversation_id == "conv-1"

    unknown = await client.post("/api/send", json={"recipient_id": "agent.nobody", "intent": "share_insights"})
    problem(unknown, 404, "agent_not_found")
    missing = problem(await client.post("/api/send", json={"recipient_id": "agent.listener"}), 422, "invalid_request")
    assert missing["errors"] == [{"loc": ["body", "intent"], "message": "Field required", "type": "missing"}]
    bad_intent = await client.post("/api/send", json={"recipient_id": "agent.listener", "intent": "Not An Intent"})
    problem(bad_intent, 422, "invalid_request")  # the form the OpenAPI document states
    not_json = await client.post("/api/send", content=b"{not json", headers={"content-type": "application/json"})
    problem(not_json, 422, "invalid_request")
    extra = await client.post("/api/send", json={"recipient_id": "agent.listener", "intent": "x", "sender_id": "ceo"})
    problem(extra, 422, "invalid_request")  # the sender is the dashboard, never the body's say


async def test_ask_an_agent_by_id_or_by_role(client: httpx.AsyncClient, sarah: TwinAgent) -> None:
    by_id = await client.post("/api/ask", json={"recipient_id": "agent.sarah", "data": {"query": "Drafts?"}})
    assert by_id.status_code == 200, by_id.text
    reply = by_id.json()
    assert reply["success"] is True and reply["responder_id"] == "agent.sarah"
    assert reply["data"]["query"] == "Drafts?" and reply["data"]["drafts"]
    by_role = await client.post(
        "/api/ask", json={"role": "content_agent", "department": "marketing", "intent": "get_roadmap", "timeout": 5}
    )
    assert by_role.status_code == 200 and by_role.json()["responder_id"] == "agent.sarah"
    refused = await client.post("/api/ask", json={"recipient_id": "agent.sarah", "intent": "review_budget"})
    assert refused.status_code == 200  # the agent answered: with an error of its own
    assert refused.json()["success"] is False and refused.json()["error"]["code"] == "unsupported_intent"

    problem(await client.post("/api/ask", json={"role": "cfo"}), 404, "no_agent_available")
    problem(await client.post("/api/ask", json={"recipient_id": "agent.nobody"}), 404, "agent_not_found")
    both = await client.post("/api/ask", json={"recipient_id": "agent.sarah", "role": "content_agent"})
    assert "exactly one" in problem(both, 422, "invalid_request")["detail"]
    problem(await client.post("/api/ask", json={}), 422, "invalid_request")
    stray = await client.post("/api/ask", json={"recipient_id": "agent.sarah", "department": "marketing"})
    problem(stray, 422, "invalid_request")
    too_long = await client.post("/api/ask", json={"recipient_id": "agent.sarah", "timeout": 121})
    assert problem(too_long, 422, "invalid_request")["errors"][0]["loc"] == ["body", "timeout"]


async def test_ask_times_out_with_504(client: httpx.AsyncClient, settings: Settings) -> None:
    config = create_agent_config("agent.slow", "slow", "cto", "engineering")
    async with Stalling(config, settings=settings) as slow:
        try:
            response = await client.post("/api/ask", json={"recipient_id": "agent.slow", "timeout": 0.2})
            body = problem(response, 504, "timeout")
            assert "agent.slow" in body["detail"]
        finally:
            slow.release.set()


async def test_the_record_shows_conversations_messages_and_receipts_to_every_dashboard(
    settings: Settings, client: httpx.AsyncClient, sarah: TwinAgent, raw: Redis
) -> None:
    asked = await client.post(
        "/api/ask", json={"recipient_id": "agent.sarah", "data": {"query": "Drafts?"}, "conversation_id": "conv-web"}
    )
    assert asked.status_code == 200, asked.text
    await wait_for_entries(raw, keys.record("agent.sarah"), 1)
    [conversation] = (await client.get("/api/conversations")).json()
    assert conversation["conversation_id"] == "conv-web" and conversation["messages"] == 1
    assert (
        conversation["agents"] == ["dashboard", "agent.sarah"] and conversation["first_intent"] == "request_knowledge"
    )
    timeline = (await client.get("/api/conversations/conv-web")).json()
    [hop] = timeline["messages"]
    assert (hop["sender_id"], hop["agent_id"], hop["outcome"]) == ("dashboard", "agent.sarah", "replied")
    assert [r["state"] for r in hop["receipts"]] == ["sent", "delivered", "replied"]
    assert hop["reply"]["data"]["query"] == "Drafts?" and hop["message"]["payload"]["data"] == {"query": "Drafts?"}
    assert hop["queued_ms"] >= 0 and hop["handling_ms"] >= 0 and timeline["duration_ms"] >= hop["handling_ms"]
    [listed] = (await client.get("/api/messages", params={"agent": "agent.sarah"})).json()
    assert listed["message_id"] == hop["message_id"]
    assert (await client.get("/api/messages", params={"intent": "assign_task"})).json() == []
    assert (await client.get("/api/messages", params={"sender": "dashboard", "since": 0})).json() == [listed]
    assert (await client.get("/api/messages", params={"since": 2**40})).json() == []
    receipts = await client.get(f"/api/messages/{hop['message_id']}/receipts", params={"agent": "agent.sarah"})
    assert receipts.status_code == 200 and [m["record_id"] for m in receipts.json()] == [hop["record_id"]]
    async with serve(settings) as another:  # a second dashboard (or this one restarted) sees the same record
        assert (await another.get("/api/conversations/conv-web")).json() == timeline
    problem(await client.get("/api/conversations/no-such"), 404, "conversation_not_found")
    problem(await client.get("/api/messages/no-such/receipts"), 404, "message_not_found")
    problem(await client.get("/api/messages", params={"since": -1}), 422, "invalid_request")
    problem(await client.get("/api/conversations/has space"), 422, "invalid_request")


async def test_broadcast_answers_per_recipient(redis_url: str, broker: MessageBroker) -> None:
    await register_offline(broker, "agent.cfo.ann", role="cfo", department="finance")
    await register_offline(broker, "agent.controller", role="controller", department="finance")
    await register_offline(broker, "agent.cmo", role="cmo", department="marketing")
    async with serve(Settings(redis_url=redis_url, max_inbox_length=1)) as client:
        first = await client.post("/api/send", json={"recipient_id": "agent.controller", "intent": "share_insights"})
        assert first.status_code == 200  # its inbox is now full
        response = await client.post(
            "/api/broadcast",
            json={"intent": "agent_status", "data": {"message": "Close at 5"}, "department": "finance"},
        )
        assert response.status_code == 200, response.text
        results = response.json()
        assert set(results) == {"agent.cfo.ann", "agent.controller"}
        assert results["agent.cfo.ann"]["ok"] is True and results["agent.cfo.ann"]["message_id"]
        assert results["agent.controller"]["ok"] is False
        assert results["agent.controller"]["error"]["code"] == "inbox_full"
        assert "agent.controller" in results["agent.controller"]["error"]["message"]
        everyone = await client.post("/api/broadcast", json={"intent": "agent_status", "everyone": True})
        assert set(everyone.json()) == {"agent.cfo.ann", "agent.controller", "agent.cmo"}
        unfiltered = await client.post("/api/broadcast", json={"intent": "agent_status"})
        problem(unfiltered, 422, "invalid_message")
        problem(await client.post("/api/broadcast", json={"department": "finance"}), 422, "invalid_request")


# -- dead letters --------------------------------------------------------------------------------------


async def test_dead_letters_are_listed_shown_redriven_and_purged(
    client: httpx.AsyncClient, settings: Settings, raw: Redis
) -> None:
    config = create_agent_config("agent.listener", "lee", "analyst", "sales")
    async with Listener(config, settings=settings):
        for n in range(2):  # no handler for the intent: dead-lettered at once
            sent = await client.post(
                "/api/send", json={"recipient_id": "agent.listener", "intent": "review_budget", "data": {"n": n}}
            )
            assert sent.status_code == 200
        await wait_for_dead_letters(raw, "agent.listener", 2)
    # the agent is stopped: what is redriven waits in its inbox

    assert (await client.get("/api/deadletters")).json() == [{"agent_id": "agent.listener", "count": 2}]
    listed = (await client.get("/api/deadletters/agent.listener")).json()
    assert [letter["message"]["payload"]["data"]["n"] for letter in listed] == [0, 1]
    first = listed[0]
    assert "unsupported_intent" in first["reason"] and first["message"]["intent"] == "review_budget"
    assert first["payload"] is None and first["deliveries"] >= 1
    page = (await client.get("/api/deadletters/agent.listener", params={"after": first["entry_id"], "count": 5})).json()
    assert [letter["entry_id"] for letter in page] == [listed[1]["entry_id"]]
    shown = await client.get(f"/api/deadletters/agent.listener/{first['entry_id']}")
    assert shown.json() == first

    redriven = await client.post(f"/api/deadletters/agent.listener/{first['entry_id']}/redrive")
    assert redriven.status_code == 200, redriven.text
    assert redriven.json()["message_id"] == first["message"]["message_id"] and redriven.json()["entry_id"]
    assert await raw.xlen(keys.inbox("agent.listener")) == 1
    gone = await client.get(f"/api/deadletters/agent.listener/{first['entry_id']}")
    problem(gone, 404, "dead_letter_not_found")
    problem(
        await client.post(f"/api/deadletters/agent.listener/{first['entry_id']}/redrive"), 404, "dead_letter_not_found"
    )
    problem(await client.get("/api/deadletters/agent.listener/not-an-id"), 422, "invalid_request")
    problem(await client.get("/api/deadletters/agent.nobody"), 404, "agent_not_found")

    unconfirmed = problem(await client.delete("/api/deadletters/agent.listener"), 400, "confirmation_required")
    assert "confirm=true" in unconfirmed["detail"]
    assert (await client.get("/api/deadletters")).json() == [{"agent_id": "agent.listener", "count": 1}]
    purged = await client.delete("/api/deadletters/agent.listener", params={"confirm": "true"})
    assert purged.json() == {"agent_id": "agent.listener", "purged": 1}
    assert (await client.get("/api/deadletters")).json() == []
    assert (await client.get("/api/deadletters/agent.listener")).json() == []  # registered: an empty list


# -- stats -------------------------------------------------------------------------------------------


async def test_stats_count_agents_and_the_brokers_work(
    client: httpx.AsyncClient, sarah: TwinAgent, broker: MessageBroker
) -> None:
    await register_offline(broker, "agent.cfo")
    await client.post("/api/ask", json={"recipient_id": "agent.sarah"})
    response = await client.get("/api/stats")
    assert response.status_code == 200
    stats = response.json()
    assert stats["registry"] == {
        "total_agents": 2, "online_agents": 1, "offline_agents": 1, "malformed_records": 0,
        "by_role": {"content_agent": {"total": 1, "online": 1}, "cfo": {"total": 1, "online": 0}},
        "by_department": {"marketing": {"total": 1, "online": 1}, "finance": {"total": 1, "online": 0}},
    }  # fmt: skip
    assert stats["broker"]["requests"] == 1 and stats["broker"]["replies_received"] == 1
    problem(await client.put("/api/stats"), 405, "method_not_allowed")


# -- knowledge ---------------------------------------------------------------------------------------


async def test_knowledge_search_without_a_service_is_503(client: httpx.AsyncClient) -> None:
    body = problem(
        await client.post("/api/knowledge/search", json={"role": "cmo", "query": "Q4 pipeline?"}),
        503,
        "knowledge_unavailable",
    )
    assert "knowledge serve" in body["detail"]
    unknown_filter = await client.post(
        "/api/knowledge/search", json={"role": "cmo", "query": "q", "filters": {"nope": "x"}}
    )
    problem(unknown_filter, 422, "invalid_query")
    problem(await client.post("/api/knowledge/search", json={"role": "cmo", "query": "   "}), 422, "invalid_query")
    problem(
        await client.post("/api/knowledge/search", json={"role": "cmo", "query": "q", "limit": 0}),
        422,
        "invalid_request",
    )


async def test_knowledge_search_through_the_service_as_a_role(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    docs = tmp_path / "docs" / "marketing"
    docs.mkdir(parents=True)
    (docs / "launch.md").write_text("# Launch plan\n\nThe Osprey launch opens in Lisbon on 3 March.\n")
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "store"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        report = await memory.ingest(tmp_path / "docs")
        assert len(report.added) == 1
        async with KnowledgeService(kb, memory=memory):
            response = await client.post(
                "/api/knowledge/search", json={"role": "cmo", "query": "Where does the Osprey launch open?", "limit": 3}
            )
            assert response.status_code == 200, response.text
            results = [agentcomms.KnowledgeResult.model_validate(r) for r in response.json()]
            assert results and "Lisbon" in results[0].text and results[0].domain == "marketing"
            denied = await client.post("/api/knowledge/search", json={"role": "intern", "query": "Osprey launch"})
            assert denied.status_code == 200 and denied.json() == []  # no grant: nothing


# -- the live feed ----------------------------------------------------------------------------------------


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(kind, data) of each event of a Server-Sent Events response; comment lines (pings) are skipped."""
    kind, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data += line.removeprefix("data: ")
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


async def test_events_stream_the_live_feed_until_the_client_leaves(settings: Settings, listener: Listener) -> None:
    async with serve(settings, streaming=True) as client, asyncio.timeout(20):
        async with client.stream("GET", "/api/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
            assert await anext(events) == ("subscribed", {"event": "subscribed"})  # listening: the feed is on
            sent = await client.post(
                "/api/send", json={"recipient_id": "agent.listener", "intent": "share_insights", "data": {"x": 1}}
            )
            message_id = sent.json()["message_id"]
            seen: dict[str, dict[str, Any]] = {}
            async for kind, event in events:
                if event.get("message_id") == message_id:
                    seen[kind] = event
                if "handled" in seen:
                    break
            assert seen["sent"]["event"] == "sent" and seen["sent"]["sender_id"] == "dashboard"
            assert seen["sent"]["recipient_id"] == "agent.listener" and seen["sent"]["intent"] == "share_insights"
        # the client left: the stream ended and its Redis subscription with it
        health = (await client.get("/api/health")).json()
        assert health["status"] == "healthy"


async def test_an_idle_stream_is_kept_open_with_comment_lines(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agentcomms.web.api, "PING_SECONDS", 0.05)  # 15 s in service
    async with serve(settings, streaming=True) as client, asyncio.timeout(20):
        async with client.stream("GET", "/api/events") as response:
            lines = response.aiter_lines()
            while not (line := await anext(lines)).startswith(":"):
                pass
            assert line.startswith(": ping")


async def test_a_stream_ends_by_itself_when_the_server_shuts_down(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(settings, streaming=True) as client, asyncio.timeout(20):
        async with client.stream("GET", "/api/events") as response:
            events = sse_events(response)
            assert await anext(events) == ("subscribed", {"event": "subscribed"})
            monkeypatch.setattr(AppStatus, "should_exit", True)  # what uvicorn's exit handler does
            assert [event async for event in events] == []  # the body ended: a complete response, not a cut


async def test_a_redis_user_without_the_feed_gets_403(redis_url: str, raw: Redis) -> None:
    await raw.acl_setuser(
        "web.nofeed", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-subscribe"]
    )
    try:
        async with serve(Settings(redis_url=redis_url, redis_username="web.nofeed", redis_password="pw")) as client:
            assert (await client.get("/api/health")).json()["status"] == "healthy"
            problem(await client.get("/api/events"), 403, "forbidden")
    finally:
        await raw.acl_deluser("web.nofeed")


async def test_events_need_the_token_too(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.model_copy(update={"dashboard_token": SecretStr(TOKEN)})
    async with serve(settings, streaming=True) as client, asyncio.timeout(20):
        problem(await client.get("/api/events"), 401, "unauthorized")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with client.stream("GET", "/api/events", headers=headers) as response:
            assert response.status_code == 200
            assert await anext(sse_events(response)) == ("subscribed", {"event": "subscribed"})
