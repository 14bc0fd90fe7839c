"""The dashboard's GraphQL API on a real redis-server, with real agents in this process.

Queries and mutations go over HTTP (httpx's ASGI transport); the subscription over the
app's WebSocket, speaking graphql-transport-ws, through :class:`AsgiWebSocket`: no WebSocket
library is installed (uvicorn serves none without one), so the test talks ASGI to the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.routing import Mount

from agentcomms import MessageBroker, Settings, keys
from agentcomms.examples import TwinAgent, create_agent_config
from agentcomms.web import create_app
from agentcomms.web.app import _require
from agentcomms.web.graphql import PATH, GraphQLContext, graphql_router, schema
from conftest import Listener, wait_for_dead_letters, wait_for_entries
from test_web_api import Stalling, register_offline

pytestmark = pytest.mark.record  # the record on, as a dashboard's agents would keep it

BASE = "http://dashboard"
TOKEN = "s3cret-graphql-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def graphql_app(settings: Settings) -> FastAPI:
    """The dashboard app, with the GraphQL router mounted as ``create_app`` mounts it (here, until it does)."""
    app = create_app(settings)
    if not any(getattr(route, "path", None) == PATH for route in app.routes):
        secret = settings.dashboard_token
        token = secret.get_secret_value().strip() if secret is not None else ""
        app.include_router(graphql_router([Depends(_require(token))] if token else [], secrets=[token]))
        app.router.routes.sort(key=lambda route: isinstance(route, Mount))  # before the page, mounted at /
    return app


@dataclass
class Api:
    """A GraphQL client of the app, which runs meanwhile."""

    app: FastAPI
    http: httpx.AsyncClient

    async def run(self, query: str, headers: Mapping[str, str] | None = None, **variables: Any) -> dict[str, Any]:
        response = await self.http.post(PATH, json={"query": query, "variables": variables}, headers=headers)
        assert response.headers["content-type"] == "application/json", response.text
        assert "Traceback" not in response.text and 'File "' not in response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, **variables: Any) -> dict[str, Any]:
        body = await self.run(query, **variables)
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def error(self, query: str, code: str, **variables: Any) -> str:
        """The message of the one error the query answers with, checked for its code."""
        body = await self.run(query, **variables)
        errors = body.get("errors") or []
        assert [error.get("extensions") for error in errors] == [{"code": code}], body
        message: str = errors[0]["message"]
        assert message
        return message


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Api]:
    app = graphql_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        yield Api(app, http)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serve(settings) as instance:
        yield instance


# -- a WebSocket client over ASGI ----------------------------------------------------------------


class WebSocketRefused(Exception):
    """The app refused the handshake: with an HTTP response (``status``, ``body``), or by closing (403)."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        self.status, self.body = status, body
        super().__init__(f"refused with {status}: {body!r}")


class WebSocketClosed(Exception):
    """The app closed the connection."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(f"closed with {code}: {reason}")


class AsgiWebSocket:
    """A WebSocket client of an ASGI app in this event loop: the handshake, text frames, the close."""

    def __init__(
        self,
        app: FastAPI,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        subprotocols: Sequence[str] = ("graphql-transport-ws",),
    ) -> None:
        self.app, self.path, self.subprotocols = app, path, list(subprotocols)
        given = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
        self.headers = [(b"host", b"dashboard"), *given]
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.subprotocol: str | None = None
        self.task: asyncio.Task[None] | None = None

    async def _send(self, message: Mapping[str, Any]) -> None:
        self.from_app.put_nowait(dict(message))

    async def _next(self) -> dict[str, Any]:
        """What the app sends next (its end, if it ends first, is an error)."""
        assert self.task is not None
        getter = asyncio.ensure_future(self.from_app.get())
        await asyncio.wait((getter, self.task), timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        if not self.task.done():
            raise TimeoutError("the app sent nothing for 10 s")
        self.task.result()  # what the app raised
        raise WebSocketClosed(1006, "the app ended without closing")

    async def __aenter__(self) -> AsgiWebSocket:
        scope = {
            "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
            "path": self.path, "raw_path": self.path.encode(), "query_string": b"", "root_path": "",
            "headers": self.headers, "client": ("127.0.0.1", 123), "server": ("dashboard", 80),
            "subprotocols": self.subprotocols, "extensions": {"websocket.http.response": {}},
        }  # fmt: skip
        self.to_app.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.create_task(self.app(scope, self.to_app.get, self._send))
        answer = await self._next()
        if answer["type"] == "websocket.http.response.start":  # refused with an HTTP response
            body = b""
            while (part := await self._next())["type"] == "websocket.http.response.body":
                body += part.get("body", b"")
                if not part.get("more_body", False):
                    break
            await self.task
            raise WebSocketRefused(answer["status"], body)
        if answer["type"] == "websocket.close":  # closed before accepting: a server answers 403
            await self.task
            raise WebSocketRefused(403)
        assert answer["type"] == "websocket.accept", answer
        self.subprotocol = answer.get("subprotocol")
        return self

    async def send_json(self, data: Mapping[str, Any]) -> None:
        self.to_app.put_nowait({"type": "websocket.receive", "text": json.dumps(data)})

    async def receive_json(self) -> dict[str, Any]:
        message = await self._next()
        if message["type"] == "websocket.close":
            raise WebSocketClosed(message.get("code", 1000), message.get("reason", ""))
        assert message["type"] == "websocket.send", message
        data: dict[str, Any] = json.loads(message["text"])
        return data

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        """Disconnect, and wait until the app has finished with the connection (its subscriptions too)."""
        assert self.task is not None
        self.to_app.put_nowait({"type": "websocket.disconnect", "code": 1000})
        async with asyncio.timeout(10):
            await self.task


@contextlib.asynccontextmanager
async def connected(app: FastAPI, headers: Mapping[str, str] | None = None) -> AsyncIterator[AsgiWebSocket]:
    """A graphql-transport-ws connection, acknowledged."""
    async with AsgiWebSocket(app, PATH, headers=headers) as ws:
        assert ws.subprotocol == "graphql-transport-ws"
        await ws.send_json({"type": "connection_init"})
        assert await ws.receive_json() == {"type": "connection_ack"}
        yield ws


# -- queries -------------------------------------------------------------------------------------

AGENTS = """
query Agents($role: String, $department: String, $capability: [String!], $intent: String, $onlineOnly: Boolean! = false) {
  agents(role: $role, department: $department, capability: $capability, intent: $intent, onlineOnly: $onlineOnly) {
    agentId
  }
}
"""  # noqa: E501


async def test_agents_are_listed_filtered_and_fetched(
    api: Api, sarah: TwinAgent, broker: MessageBroker, caplog: pytest.LogCaptureFixture
) -> None:
    await register_offline(broker, "agent.cfo", "cfo", "finance")

    async def ids(**variables: Any) -> list[str]:
        return sorted(agent["agentId"] for agent in (await api.data(AGENTS, **variables))["agents"])

    assert await ids() == ["agent.cfo", "agent.sarah"]
    assert await ids(onlineOnly=True) == ["agent.sarah"]
    assert await ids(role="CONTENT_AGENT") == ["agent.sarah"]
    assert await ids(department="finance") == ["agent.cfo"]
    assert await ids(capability=["content_creation"], intent="assign_task") == ["agent.sarah"]
    assert await ids(role="cto") == []

    one = "query($id: String!) { agent(agentId: $id) { agentId role status supportedIntents lastSeen metadata } }"
    agent = (await api.data(one, id="agent.sarah"))["agent"]
    assert agent["role"] == "content_agent" and agent["status"] == "ONLINE"
    assert "request_knowledge" in agent["supportedIntents"] and agent["lastSeen"] and agent["metadata"] == {}
    assert "agent.nobody" in await api.error(one, "agent_not_found", id="agent.nobody")
    assert "agentId" in await api.error(one, "invalid_request", id="{braces}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # answered errors are no server trouble


async def test_health_and_stats(api: Api, sarah: TwinAgent) -> None:
    health = await api.data("{ health { status error redisVersion senderId version stats { roundTrips } } }")
    assert health["health"]["status"] == "healthy" and health["health"]["error"] is None
    assert health["health"]["senderId"] == "dashboard" and health["health"]["stats"]["roundTrips"] >= 1
    await api.data('mutation { ask(recipientId: "agent.sarah") { success } }')
    stats = (await api.data("{ stats { registry { totalAgents onlineAgents byRole { name total online } } "
                            "broker { requests repliesReceived } } }"))["stats"]  # fmt: skip
    assert stats["registry"] == {
        "totalAgents": 1, "onlineAgents": 1, "byRole": [{"name": "content_agent", "total": 1, "online": 1}]
    }  # fmt: skip
    assert stats["broker"] == {"requests": 1, "repliesReceived": 1}
    openapi = (await api.http.get("/api/openapi.json")).json()
    assert not [path for path in openapi["paths"] if not path.startswith("/api/")]  # GraphQL has its own schema


async def test_bad_documents_and_arguments_are_invalid_request(api: Api) -> None:
    assert "Syntax Error" in await api.error("{ agents { agentId ", "invalid_request")
    assert "nothing" in await api.error("{ nothing }", "invalid_request")
    assert "$count" in await api.error("query($count: Int!) { health { status } }", "invalid_request", count="x")
    message = await api.error('{ deadLetters(agentId: "agent.a", count: 0) { entryId } }', "invalid_request")
    assert message.startswith("count:")
    body = await api.run("mutation { ask { success } }")
    assert body["data"] is None and body["errors"][0]["extensions"] == {"code": "invalid_request"}
    assert "exactly one" in body["errors"][0]["message"] and body["errors"][0]["path"] == ["ask"]
    assert "Traceback" not in json.dumps(body)


# -- mutations -----------------------------------------------------------------------------------

SEND = """
mutation Send($to: String!, $intent: String!, $data: JSON, $priority: Priority! = NORMAL, $conversation: String) {
  send(recipientId: $to, intent: $intent, data: $data, priority: $priority, context: {campaign: "q4"},
       conversationId: $conversation) {
    messageId recipientId entryId duplicate
  }
}
"""


async def test_send_delivers_a_message_and_answers_where_it_went(api: Api, listener: Listener) -> None:
    variables = {"to": "agent.listener", "intent": "share_insights", "data": {"insight": "Chicago converts"}}
    sent = (await api.data(SEND, **variables, priority="HIGH", conversation="conv-1"))["send"]
    assert sent["recipientId"] == "agent.listener" and sent["entryId"] and sent["duplicate"] is False
    async with asyncio.timeout(10):
        message = await listener.insights.get()
    assert message.message_id == sent["messageId"] and message.sender_id == "dashboard"
    assert message.payload.data == {"insight": "Chicago converts"} and message.payload.priority == "high"
    assert message.payload.context == {"campaign": "q4"} and message.conversation_id == "conv-1"

    await api.error(SEND, "agent_not_found", to="agent.nobody", intent="share_insights")
    assert "intent" in await api.error(SEND, "invalid_request", to="agent.listener", intent="Not An Intent")
    assert "data" in await api.error(SEND, "invalid_request", to="agent.listener", intent="x", data=[1, 2])


ASK = """
mutation Ask($to: String, $role: String, $department: String, $intent: String! = "request_knowledge",
             $data: JSON, $timeout: Float! = 30) {
  ask(recipientId: $to, role: $role, department: $department, intent: $intent, data: $data, timeout: $timeout) {
    success data responderId correlationId error { code message }
  }
}
"""


async def test_ask_an_agent_by_id_or_by_role(api: Api, sarah: TwinAgent) -> None:
    reply = (await api.data(ASK, to="agent.sarah", data={"query": "Drafts?"}))["ask"]
    assert reply["success"] is True and reply["responderId"] == "agent.sarah" and reply["error"] is None
    assert reply["data"]["query"] == "Drafts?" and reply["data"]["drafts"]
    by_role = await api.data(ASK, role="content_agent", department="marketing", intent="get_roadmap", timeout=5)
    assert by_role["ask"]["responderId"] == "agent.sarah"
    refused = (await api.data(ASK, to="agent.sarah", intent="review_budget"))["ask"]
    assert refused["success"] is False and refused["error"]["code"] == "unsupported_intent"

    await api.error(ASK, "no_agent_available", role="cfo")
    await api.error(ASK, "agent_not_found", to="agent.nobody")
    assert "exactly one" in await api.error(ASK, "invalid_request", to="agent.sarah", role="content_agent")
    assert "timeout" in await api.error(ASK, "invalid_request", to="agent.sarah", timeout=121)


async def test_the_record_answers_conversations_messages_and_receipts(api: Api, sarah: TwinAgent, raw: Redis) -> None:
    ask = 'mutation($q: JSON) { ask(recipientId: "agent.sarah", data: $q, conversationId: "conv-gql") { success } }'
    assert (await api.data(ask, q={"query": "Drafts?"}))["ask"]["success"] is True
    await wait_for_entries(raw, keys.record("agent.sarah"), 1)
    listed = await api.data("{ conversations { conversationId agents messages firstIntent } }")
    assert listed["conversations"] == [
        {"conversationId": "conv-gql", "agents": ["dashboard", "agent.sarah"], "messages": 1,
         "firstIntent": "request_knowledge"}
    ]  # fmt: skip
    timeline = await api.data(
        """{ conversation(conversationId: "conv-gql") { durationMs messages {
             messageId senderId agentId outcome queuedMs handlingMs receipts { state at }
             message { payload { data } } reply { success data } } } }"""
    )
    [hop] = timeline["conversation"]["messages"]
    assert (hop["senderId"], hop["agentId"], hop["outcome"]) == ("dashboard", "agent.sarah", "replied")
    assert [r["state"] for r in hop["receipts"]] == ["sent", "delivered", "replied"]
    assert hop["message"]["payload"]["data"] == {"query": "Drafts?"} and hop["reply"]["data"]["query"] == "Drafts?"
    messages = await api.data('{ messages(agent: "agent.sarah", sender: "dashboard") { messageId } }')
    assert messages["messages"] == [{"messageId": hop["messageId"]}]
    receipts = await api.data(
        'query($id: String!) { receipts(messageId: $id, agent: "agent.sarah") { outcome } }', id=hop["messageId"]
    )
    assert receipts["receipts"] == [{"outcome": "replied"}]
    await api.error('{ conversation(conversationId: "nope") { durationMs } }', "conversation_not_found")
    await api.error('{ receipts(messageId: "nope") { outcome } }', "message_not_found")
    await api.error("{ messages(since: -1) { outcome } }", "invalid_request")
    await api.error("{ conversations(limit: 0) { conversationId } }", "invalid_request")


async def test_ask_times_out_with_code_timeout(api: Api, settings: Settings) -> None:
    config = create_agent_config("agent.slow", "slow", "cto", "engineering")
    async with Stalling(config, settings=settings) as slow:
        try:
            assert "agent.slow" in await api.error(ASK, "timeout", to="agent.slow", timeout=0.2)
        finally:
            slow.release.set()


async def test_broadcast_answers_per_recipient(api: Api, broker: MessageBroker) -> None:
    await register_offline(broker, "agent.cfo.ann", "cfo", "finance")
    await register_offline(broker, "agent.controller", "controller", "finance")
    await register_offline(broker, "agent.cmo", "cmo", "marketing")
    query = """
    mutation($department: String, $everyone: Boolean! = false) {
      broadcast(intent: "agent_status", data: {message: "Close at 5"}, department: $department, everyone: $everyone) {
        agentId ok messageId error { code }
      }
    }
    """
    outcomes = (await api.data(query, department="finance"))["broadcast"]
    assert sorted(o["agentId"] for o in outcomes) == ["agent.cfo.ann", "agent.controller"]
    assert all(o["ok"] and o["messageId"] and o["error"] is None for o in outcomes)
    assert len((await api.data(query, everyone=True))["broadcast"]) == 3
    await api.error(query, "invalid_message")  # no filter and not everyone


DEAD_LETTERS = """
query($agent: String!) {
  deadLetterAgents { agentId count }
  deadLetters(agentId: $agent) { entryId reason deliveries message { messageId intent payload { data priority } } }
}
"""

REDRIVE = """
mutation($agent: String!, $entry: String!) { redriveDeadLetter(agentId: $agent, entryId: $entry) { messageId entryId } }
"""
PURGE = """
mutation($agent: String!, $confirm: Boolean!) { purgeDeadLetters(agentId: $agent, confirm: $confirm) { purged } }
"""


async def test_dead_letters_are_listed_redriven_and_purged(api: Api, settings: Settings, raw: Redis) -> None:
    config = create_agent_config("agent.listener", "lee", "analyst", "sales")
    async with Listener(config, settings=settings):
        for n in range(2):  # no handler for the intent: dead-lettered at once
            await api.data(SEND, to="agent.listener", intent="review_budget", data={"n": n})
        await wait_for_dead_letters(raw, "agent.listener", 2)
    # the agent is stopped: what is redriven waits in its inbox

    listed = await api.data(DEAD_LETTERS, agent="agent.listener")
    assert listed["deadLetterAgents"] == [{"agentId": "agent.listener", "count": 2}]
    letters = listed["deadLetters"]
    assert [letter["message"]["payload"]["data"]["n"] for letter in letters] == [0, 1]
    first = letters[0]
    assert "unsupported_intent" in first["reason"] and first["message"]["intent"] == "review_budget"
    assert first["message"]["payload"]["priority"] == "NORMAL" and first["deliveries"] >= 1

    redriven = (await api.data(REDRIVE, agent="agent.listener", entry=first["entryId"]))["redriveDeadLetter"]
    assert redriven["messageId"] == first["message"]["messageId"] and redriven["entryId"]
    assert await raw.xlen(keys.inbox("agent.listener")) == 1
    await api.error(REDRIVE, "dead_letter_not_found", agent="agent.listener", entry=first["entryId"])
    assert "entryId" in await api.error(REDRIVE, "invalid_request", agent="agent.listener", entry="not-an-id")
    nobody = await api.run(DEAD_LETTERS, agent="agent.nobody")
    assert nobody["errors"][0]["extensions"] == {"code": "agent_not_found"} and nobody["errors"][0]["path"]

    assert "confirm: true" in await api.error(PURGE, "confirmation_required", agent="agent.listener", confirm=False)
    assert (await api.data(PURGE, agent="agent.listener", confirm=True))["purgeDeadLetters"] == {"purged": 1}
    assert (await api.data(DEAD_LETTERS, agent="agent.listener")) == {"deadLetterAgents": [], "deadLetters": []}


async def test_knowledge_without_a_service_is_knowledge_unavailable(api: Api) -> None:
    query = 'query($filters: JSON) { knowledge(role: "cmo", query: "Q4 pipeline?", filters: $filters) { text } }'
    assert "knowledge serve" in await api.error(query, "knowledge_unavailable")
    await api.error(query, "invalid_query", filters={"nope": "x"})


# -- the live feed -------------------------------------------------------------------------------

EVENTS = """
subscription($kinds: [String!]) { events(kinds: $kinds) { kind messageId senderId recipientId intent ts data } }
"""


async def test_the_events_subscription_streams_the_live_feed(api: Api, listener: Listener) -> None:
    async with asyncio.timeout(20), connected(api.app) as ws:
        subscribe = {"query": EVENTS, "variables": {"kinds": ["subscribed", "sent", "handled"]}}
        await ws.send_json({"id": "feed", "type": "subscribe", "payload": subscribe})
        first = await ws.receive_json()  # asked for: the feed listens, what is sent now is seen
        assert first["id"] == "feed" and first["type"] == "next"
        assert first["payload"]["data"]["events"]["kind"] == "subscribed"

        sent = await api.data(SEND, to="agent.listener", intent="share_insights", data={"x": 1})
        message_id = sent["send"]["messageId"]
        seen: dict[str, dict[str, Any]] = {}
        while "handled" not in seen:
            message = await ws.receive_json()
            assert message["type"] == "next" and "errors" not in message["payload"], message
            event = message["payload"]["data"]["events"]
            assert event["kind"] in ("sent", "handled")
            if event["messageId"] == message_id:
                seen[event["kind"]] = event
        assert seen["sent"]["senderId"] == "dashboard" and seen["sent"]["recipientId"] == "agent.listener"
        assert seen["sent"]["intent"] == "share_insights" and seen["sent"]["ts"] > 0
        assert seen["handled"]["data"]["event"] == "handled"

        await ws.send_json({"id": "feed", "type": "complete"})  # ends the subscription; the connection stays
        await ws.send_json({"type": "ping"})
        assert await ws.receive_json() == {"type": "pong"}
        await ws.send_json({"id": "bad", "type": "subscribe", "payload": {"query": "subscription { nothing }"}})
        error = await ws.receive_json()
        assert error["type"] == "error" and error["payload"][0]["extensions"] == {"code": "invalid_request"}
    # left: the app finished the connection, its feed closed
    assert (await api.data("{ health { status } }"))["health"]["status"] == "healthy"


async def test_the_token_is_wanted_over_http_and_websocket(settings: Settings) -> None:
    settings = settings.model_copy(update={"dashboard_token": SecretStr(TOKEN)})
    async with serve(settings) as api:
        missing = await api.http.post(PATH, json={"query": "{ health { status } }"})
        assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        good = await api.run("{ health { status } }", headers=BEARER)
        assert good == {"data": {"health": {"status": "healthy"}}}
        with pytest.raises(WebSocketRefused) as refused:
            async with AsgiWebSocket(api.app, PATH):
                pass
        assert refused.value.status == 401 and TOKEN.encode() not in refused.value.body
        async with connected(api.app, headers=BEARER) as ws:
            await ws.send_json({"type": "ping"})
            assert await ws.receive_json() == {"type": "pong"}
        one = "query($id: String!) { agent(agentId: $id) { agentId } }"
        shown = await api.run(one, headers=BEARER, id=f"agent.{TOKEN}")  # an error message that would show it
        assert shown["errors"][0]["extensions"] == {"code": "agent_not_found"}
        assert "agent.***" in shown["errors"][0]["message"] and TOKEN not in json.dumps(shown)
        assert TOKEN not in missing.text


async def test_a_page_of_another_origin_cannot_open_a_websocket(api: Api) -> None:
    with pytest.raises(WebSocketRefused) as refused:
        async with AsgiWebSocket(api.app, PATH, headers={"origin": "http://evil.example"}):
            pass
    assert refused.value.status == 403
    async with connected(api.app, headers={"origin": BASE}):  # the dashboard's own page
        pass


def test_the_schema_has_the_rest_apis_operations() -> None:
    sdl = schema.as_str()
    for operation in ("agents(", "agent(", "deadLetterAgents:", "deadLetters(", "stats:", "health:", "knowledge("):
        assert operation in sdl.partition("type Query {")[2].partition("\n}")[0], operation
    for operation in ("send(", "ask(", "broadcast(", "redriveDeadLetter(", "purgeDeadLetters("):
        assert operation in sdl.partition("type Mutation {")[2].partition("\n}")[0], operation
    assert "events(" in sdl.partition("type Subscription {")[2]


async def test_outside_the_apps_lifespan_an_error_says_so(caplog: pytest.LogCaptureFixture) -> None:
    result = await schema.execute("{ stats { broker { sent } } }", context_value=GraphQLContext(None))
    assert result.data is None and result.errors is not None
    assert [error.formatted["extensions"] for error in result.errors] == [{"code": "BrokerClosedError"}]
    assert "lifespan is not running" in result.errors[0].message
    assert [record.levelname for record in caplog.records] == ["ERROR"]  # as the REST API logs its 500s
    assert caplog.records[0].exc_info is None and "BrokerClosedError" in caplog.text
