"""The dashboard's GraphQL API at ``/graphql`` (Strawberry): the REST API's queries and mutations, and the live feed.

Queries and mutations are POSTed as JSON (``{"query", "variables"}``), or queries sent with
GET ``?query=``; the ``events`` subscription runs over a WebSocket that speaks
``graphql-transport-ws``. Each resolver makes the same library call as its REST route, on
the same :class:`~agentcomms.web.api.Dashboard`, and checks its input with the same models.
Every error is a GraphQL error whose ``extensions.code`` is the REST API's problem code
(``agent_not_found``, ``timeout`` ...). It never carries a traceback, a Redis password or the
dashboard's token. ``schema.as_str()`` is the schema's SDL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import strawberry
from fastapi import params
from graphql import GraphQLError
from pydantic import BaseModel, Field, StringConstraints, TypeAdapter, ValidationError
from starlette.requests import HTTPConnection
from strawberry.extensions import MaskErrors
from strawberry.fastapi import BaseContext, GraphQLRouter
from strawberry.scalars import JSON
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionContext
from strawberry.utils.str_converters import to_camel_case

import agentcomms
from agentcomms import schemas
from agentcomms.exceptions import AgentCommsError, AgentNotFoundError, BrokerClosedError, BrokerConnectionError
from agentcomms.knowledge import interface as knowledge
from agentcomms.web import models
from agentcomms.web.api import Dashboard
from agentcomms.web.problems import PROBLEM_KINDS, ApiProblem, problem_for, scrub

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["PATH", "GraphQLContext", "graphql_router", "schema"]

logger = logging.getLogger(__name__)

PATH = "/graphql"
"""Where the router serves GraphQL: queries and mutations over HTTP, subscriptions over a WebSocket."""

# the library's enums as GraphQL enums (HIGH, NORMAL, LOW; ONLINE, BUSY, OFFLINE): registered on the classes
strawberry.enum(schemas.Priority, description="Delivery priority: each has its own inbox stream, read high first.")
strawberry.enum(schemas.AgentStatus, description="Availability of an agent as the registry reports it.")


class GraphQLContext(BaseContext):
    """A request's ``info.context``: the app's :class:`Dashboard`, and the secrets no error may show."""

    def __init__(self, dashboard: Dashboard | None, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._dashboard = dashboard
        self.secrets = secrets

    @property
    def dashboard(self) -> Dashboard:
        """The connections the app's lifespan opened.

        Raises:
            BrokerClosedError: the app's lifespan is not running.
        """
        if self._dashboard is None:
            raise BrokerClosedError("the dashboard is not connected: its app's lifespan is not running")
        return self._dashboard


_Info = strawberry.Info[GraphQLContext, None]
_T = TypeVar("_T", bound="DataclassInstance")
_M = TypeVar("_M", bound=BaseModel)
_V = TypeVar("_V")


def _build(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """The GraphQL type ``cls`` (a dataclass) from the fields of ``data`` it has; the others are left out."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in data.items() if name in names})


# -- types ---------------------------------------------------------------------------------------


@strawberry.type(description="What the registry knows of one agent.")
class AgentInfo:
    agent_id: str
    user_name: str
    role: str
    department: str
    capabilities: list[str]
    supported_intents: list[str]
    status: schemas.AgentStatus
    version: str
    started_at: datetime | None
    last_seen: datetime | None
    instance_count: int
    metadata: JSON
    signature: str | None

    @classmethod
    def of(cls, info: schemas.AgentInfo) -> AgentInfo:
        """The GraphQL view of an :class:`agentcomms.AgentInfo`."""
        return _build(cls, dict(info))


@strawberry.type(description="Why something failed: a stable code and a message.")
class ErrorDetail:
    code: str
    message: str


@strawberry.type(description="An agent's reply: `success` with `data`, or `error`.")
class AgentResponse:
    success: bool
    data: JSON | None
    error: ErrorDetail | None
    correlation_id: str | None
    responder_id: str | None

    @classmethod
    def of(cls, response: schemas.AgentResponse) -> AgentResponse:
        """The GraphQL view of an :class:`agentcomms.AgentResponse`."""
        error = _build(ErrorDetail, dict(response.error)) if response.error is not None else None
        return _build(cls, {**dict(response), "error": error})


@strawberry.type(description="Where a message went: its stream entry id, or `duplicate` if it was accepted before.")
class SendResult:
    message_id: str
    recipient_id: str
    entry_id: str
    duplicate: bool

    @classmethod
    def of(cls, result: models.SendResult) -> SendResult:
        """The GraphQL view of the REST API's ``SendResult``."""
        return _build(cls, dict(result))


@strawberry.type(description="A broadcast's message to one recipient: stored (`ok`), or not and why (`error`).")
class BroadcastOutcome:
    agent_id: str
    ok: bool
    message_id: str | None = None
    entry_id: str | None = None
    duplicate: bool = False
    error: ErrorDetail | None = None


@strawberry.type(description="An agent that has dead letters, and how many.")
class DeadLetterAgent:
    agent_id: str
    count: int


@strawberry.type(description="The body of a message: free-form `data` plus delivery options.")
class MessagePayload:
    data: JSON
    priority: schemas.Priority
    requires_response: bool
    response_timeout: float | None
    context: JSON


@strawberry.type(description="A message between agents, as it was sent.")
class AgentMessage:
    message_id: str
    conversation_id: str
    sender_id: str
    recipient_id: str
    intent: str
    payload: MessagePayload
    timestamp: datetime
    reply_to: str | None
    correlation_id: str | None
    sealed: str | None

    @classmethod
    def of(cls, message: schemas.AgentMessage) -> AgentMessage:
        """The GraphQL view of an :class:`agentcomms.AgentMessage`."""
        return _build(cls, {**dict(message), "payload": _build(MessagePayload, dict(message.payload))})


@strawberry.type(
    description="A message that could not be delivered, with why and after how many deliveries. `message` is the "
    "message when it parses as one; else `payload` is its text, or `raw` the entry's fields."
)
class DeadLetter:
    agent_id: str
    entry_id: str
    reason: str
    deliveries: int
    source_id: str
    message: AgentMessage | None
    payload: str | None
    raw: str | None

    @classmethod
    def of(cls, letter: models.DeadLetterOut) -> DeadLetter:
        """The GraphQL view of the REST API's ``DeadLetterOut``."""
        message = AgentMessage.of(letter.message) if letter.message is not None else None
        return _build(cls, {**dict(letter), "message": message})


@strawberry.type(description="How many dead letters a purge deleted.")
class PurgeResult:
    agent_id: str
    purged: int


@strawberry.type(description="Counters of the dashboard's broker since it connected.")
class BrokerStats:
    sent: int
    duplicates: int
    rejected: int
    requests: int
    replies_received: int
    replies_unmatched: int
    replies_refused: int
    timeouts: int
    round_trips: int
    reconnects: int


@strawberry.type(description="Whether Redis answers (`status`: healthy or unhealthy), how fast, and who is asking.")
class Health:
    status: str
    error: str | None
    latency_ms: float
    redis_version: str | None
    client_id: str
    sender_id: str
    version: str
    stats: BrokerStats


@strawberry.type(description="Registered agents of one role or department, and how many of them are online.")
class GroupCount:
    name: str
    total: int
    online: int


@strawberry.type(description="Counts of registered agents, in total and by role and department.")
class RegistryStats:
    total_agents: int
    online_agents: int
    offline_agents: int
    malformed_records: int
    by_role: list[GroupCount]
    by_department: list[GroupCount]


@strawberry.type(description="The registry's counts and the dashboard broker's counters.")
class Stats:
    registry: RegistryStats
    broker: BrokerStats

    @classmethod
    def of(cls, stats: models.Stats) -> Stats:
        """The GraphQL view of the REST API's ``Stats``."""

        def groups(counts: dict[str, dict[str, int]]) -> list[GroupCount]:
            return [GroupCount(name=k, total=n.get("total", 0), online=n.get("online", 0)) for k, n in counts.items()]

        registry = stats.registry
        by = {"by_role": groups(registry.by_role), "by_department": groups(registry.by_department)}
        return cls(
            registry=_build(RegistryStats, {**dict(registry), **by}),
            broker=_build(BrokerStats, dataclasses.asdict(stats.broker)),
        )


@strawberry.type(description="Where a knowledge result comes from: the document, its title, heading and position.")
class KnowledgeSource:
    source_id: str
    location: str
    title: str
    heading: str
    position: int
    page: int | None


@strawberry.type(description="One knowledge search result: the chunk's text, its domain, source and score.")
class KnowledgeResult:
    text: str
    score: float
    domain: str
    kind: str
    source: KnowledgeSource
    author: str | None
    created_at: datetime | None

    @classmethod
    def of(cls, result: knowledge.KnowledgeResult) -> KnowledgeResult:
        """The GraphQL view of an :class:`agentcomms.KnowledgeResult`."""
        return _build(cls, {**dict(result), "source": _build(KnowledgeSource, dict(result.source))})


@strawberry.type(
    description="One event of the live feed: `kind` (sent, handled, dead_lettered, resubscribed ...), the "
    "message it is about, and `data`, the whole event as published (with `reason` and the like)."
)
class FeedEvent:
    kind: str
    message_id: str | None
    sender_id: str | None
    recipient_id: str | None
    intent: str | None
    ts: float | None
    data: JSON

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> FeedEvent:
        """An event of :meth:`MessageBroker.events` (what it holds is checked: the feed is other processes' JSON)."""

        def text(key: str) -> str | None:
            value = event.get(key)
            return value if isinstance(value, str) else None

        ts = event.get("ts")
        return cls(
            kind=str(event.get("event") or "message"), message_id=text("message_id"), sender_id=text("sender_id"),
            recipient_id=text("recipient_id"), intent=text("intent"),
            ts=float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None, data=JSON(dict(event)),
        )  # fmt: skip


@strawberry.type(description="One state of a message and when it was reached (epoch seconds, Redis's clock).")
class Receipt:
    state: str
    at: float


@strawberry.type(
    description="A message from the record: to whom (`agentId`), its reply, receipts and where the time went "
    "(`queuedMs` sent to delivered, `handlingMs` delivered to handled). `outcome` sent or delivered: still in the "
    "inbox."
)
class RecordedMessage:
    agent_id: str
    record_id: str
    entry_id: str
    conversation_id: str
    message_id: str | None
    sender_id: str | None
    intent: str | None
    responder_id: str | None
    outcome: str
    reason: str | None
    deliveries: int | None
    dead_letter_id: str | None
    sent_at: float
    delivered_at: float | None
    finished_at: float | None
    queued_ms: float | None
    handling_ms: float | None
    receipts: list[Receipt]
    message: AgentMessage | None
    payload: str | None
    reply: AgentResponse | None

    @classmethod
    def of(cls, recorded: models.RecordedMessageOut) -> RecordedMessage:
        """The GraphQL view of the REST API's ``RecordedMessageOut``."""
        return _build(cls, {
            **dict(recorded), "receipts": [Receipt(state=r.state, at=r.at) for r in recorded.receipts],
            "message": AgentMessage.of(recorded.message) if recorded.message else None,
            "reply": AgentResponse.of(recorded.reply) if recorded.reply else None,
        })  # fmt: skip


@strawberry.type(description="A conversation in the record: when it started and last moved, who took part.")
class Conversation:
    conversation_id: str
    first_at: float
    last_at: float
    agents: list[str]
    messages: int
    first_intent: str | None


@strawberry.type(description="Every recorded message of one conversation across agents, in the order sent.")
class ConversationTimeline:
    conversation_id: str
    started_at: float
    duration_ms: float
    messages: list[RecordedMessage]


# -- input ---------------------------------------------------------------------------------------

_AGENT_ID: TypeAdapter[str] = TypeAdapter(schemas.AgentId)
_ENTRY_ID: TypeAdapter[str] = TypeAdapter(Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")])
MAX_DEAD_LETTERS = 1000
"""The most dead letters one ``deadLetters`` query lists."""


def _invalid(exc: ValidationError, name: str = "") -> ApiProblem:
    """``invalid_request``, naming each invalid argument as GraphQL does (camelCase); the input is not echoed."""
    lines = []
    for error in exc.errors():
        where = ".".join(to_camel_case(str(part)) for part in (name, *error.get("loc", ())) if part != "")
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return ApiProblem("invalid_request", "; ".join(lines) or "invalid request")


def _checked(adapter: TypeAdapter[_V], value: _V, name: str) -> _V:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise _invalid(exc, name) from None


def _validated(model: type[_M], **arguments: Any) -> _M:
    """The REST API's request model from a resolver's arguments (``None``: not given, the model's default)."""
    try:
        return model(**{name: value for name, value in arguments.items() if value is not None})
    except ValidationError as exc:
        raise _invalid(exc) from None


def _dashboard(info: _Info) -> Dashboard:
    return info.context.dashboard


# -- queries -------------------------------------------------------------------------------------


async def _agents(
    info: _Info,
    role: str | None = None,
    department: str | None = None,
    capability: Annotated[
        list[str] | None, strawberry.argument(description="Only agents with every one of these capabilities.")
    ] = None,
    intent: str | None = None,
    online_only: bool = False,
) -> list[AgentInfo]:
    found = await _dashboard(info).registry.discover_agents(
        role=role, department=department, capability=capability, intent=intent, online_only=online_only
    )
    return [AgentInfo.of(agent) for agent in found]


async def _agent(info: _Info, agent_id: str) -> AgentInfo:
    return AgentInfo.of(await _dashboard(info).registry.get_agent(_checked(_AGENT_ID, agent_id, "agent_id")))


async def _dead_letter_agents(info: _Info) -> list[DeadLetterAgent]:
    broker = _dashboard(info).broker
    agent_ids = await broker.dead_letter_agents()
    counts = await asyncio.gather(*(broker.count_dead_letters(agent_id) for agent_id in agent_ids))
    return [DeadLetterAgent(agent_id=a, count=n) for a, n in zip(agent_ids, counts, strict=True)]


async def _dead_letters(
    info: _Info,
    agent_id: str,
    count: Annotated[int, strawberry.argument(description="How many, the oldest first (1 to 1000).")] = 100,
    after: Annotated[str | None, strawberry.argument(description="Only those after this entry id (paging).")] = None,
) -> list[DeadLetter]:
    dashboard = _dashboard(info)
    agent_id = _checked(_AGENT_ID, agent_id, "agent_id")
    if after is not None:
        after = _checked(_ENTRY_ID, after, "after")
    if not 1 <= count <= MAX_DEAD_LETTERS:
        raise ApiProblem("invalid_request", f"count: must be from 1 to {MAX_DEAD_LETTERS}")
    letters = await dashboard.broker.dead_letters(agent_id, count=count, after=after)
    if not letters and after is None and not await dashboard.registry.is_registered(agent_id):
        raise AgentNotFoundError(agent_id)
    return [DeadLetter.of(models.DeadLetterOut.of(letter)) for letter in letters]


async def _dead_letter(info: _Info, agent_id: str, entry_id: str) -> DeadLetter:
    agent_id, entry_id = _checked(_AGENT_ID, agent_id, "agent_id"), _checked(_ENTRY_ID, entry_id, "entry_id")
    return DeadLetter.of(models.DeadLetterOut.of(await _dashboard(info).broker.get_dead_letter(agent_id, entry_id)))


async def _stats(info: _Info) -> Stats:
    dashboard = _dashboard(info)
    registry = await dashboard.registry.get_registry_stats()
    return Stats.of(models.Stats(registry=models.RegistryStatsOut(**registry.as_dict()), broker=dashboard.broker.stats))


async def _health(info: _Info) -> Health:
    dashboard = _dashboard(info)
    report = await dashboard.broker.health_check()
    error = scrub(str(report["error"]), info.context.secrets) if report.get("error") else None
    stats = _build(BrokerStats, report["stats"])
    return _build(Health, {**report, "error": error, "stats": stats, "sender_id": dashboard.sender_id,
                           "version": agentcomms.__version__})  # fmt: skip


async def _knowledge(
    info: _Info,
    role: Annotated[str, strawberry.argument(description="Search as this role: only what it may read.")],
    query: str,
    limit: int = 5,
    filters: Annotated[
        JSON | None,
        strawberry.argument(description="Narrow by `domains`, `kind` (document / insight), `author`, `source_id`."),
    ] = None,
) -> list[KnowledgeResult]:
    body = _validated(models.KnowledgeSearchRequest, role=role, query=query, limit=limit, filters=filters)
    dashboard = _dashboard(info)
    memory = await dashboard.memory()
    results = await memory.search_knowledge(
        dashboard.sender_id, body.role, body.query, filters=body.filters, limit=body.limit
    )
    return [KnowledgeResult.of(result) for result in results]


_MESSAGE_ID: TypeAdapter[str] = TypeAdapter(schemas.MessageId)
_SECONDS: TypeAdapter[float] = TypeAdapter(Annotated[float, Field(ge=0, le=2**44)])


def _limit(value: int, most: int) -> int:
    if not 1 <= value <= most:
        raise ApiProblem("invalid_request", f"limit: must be from 1 to {most}")
    return value


async def _conversations(
    info: _Info,
    agent: Annotated[str | None, strawberry.argument(description="Only with a message to this agent.")] = None,
    limit: Annotated[int, strawberry.argument(description="How many, the latest first (1 to 200).")] = 20,
) -> list[Conversation]:
    agent = _checked(_AGENT_ID, agent, "agent") if agent is not None else None
    found = await _dashboard(info).broker.record.conversations(agent, limit=_limit(limit, 200))
    return [_build(Conversation, c.as_dict()) for c in found]


async def _conversation(info: _Info, conversation_id: str) -> ConversationTimeline:
    timeline = await _dashboard(info).conversation(_checked(_MESSAGE_ID, conversation_id, "conversation_id"))
    messages = [RecordedMessage.of(m) for m in timeline.messages]
    return _build(ConversationTimeline, {**dict(timeline), "messages": messages})


async def _messages(
    info: _Info,
    agent: Annotated[str | None, strawberry.argument(description="Only to this agent.")] = None,
    sender: Annotated[str | None, strawberry.argument(description="Only from this sender.")] = None,
    intent: str | None = None,
    since: Annotated[float | None, strawberry.argument(description="Finished at or after (epoch s).")] = None,
    until: Annotated[float | None, strawberry.argument(description="Finished at or before (epoch s).")] = None,
    limit: Annotated[int, strawberry.argument(description="How many, the latest first (1 to 1000).")] = 100,
) -> list[RecordedMessage]:
    agent = _checked(_AGENT_ID, agent, "agent") if agent is not None else None
    since = _checked(_SECONDS, since, "since") if since is not None else None
    until = _checked(_SECONDS, until, "until") if until is not None else None
    found = await _dashboard(info).broker.record.messages(
        agent, since=since, until=until, sender_id=sender, intent=intent, limit=_limit(limit, 1000)
    )
    return [RecordedMessage.of(models.RecordedMessageOut.of(m)) for m in found]


async def _receipts(
    info: _Info,
    message_id: str,
    agent: Annotated[str | None, strawberry.argument(description="Its recipient (searches its inbox too).")] = None,
    conversation_id: Annotated[str | None, strawberry.argument(description="Its conversation.")] = None,
) -> list[RecordedMessage]:
    message_id = _checked(_MESSAGE_ID, message_id, "message_id")
    agent = _checked(_AGENT_ID, agent, "agent") if agent is not None else None
    if conversation_id is not None:
        conversation_id = _checked(_MESSAGE_ID, conversation_id, "conversation_id")
    found = await _dashboard(info).receipts(message_id, agent, conversation_id)
    return [RecordedMessage.of(m) for m in found]


@strawberry.type(description="Agents, the record, dead letters, counters, health and knowledge.")
class Query:
    agents: list[AgentInfo] = strawberry.field(
        resolver=_agents,
        description="Registered agents matching every given filter (case-insensitive), offline ones too unless "
        "`onlineOnly`.",
    )
    agent: AgentInfo = strawberry.field(resolver=_agent, description="What the registry knows of one agent.")
    dead_letter_agents: list[DeadLetterAgent] = strawberry.field(
        resolver=_dead_letter_agents, description="Agents that have dead letters, and how many each."
    )
    dead_letters: list[DeadLetter] = strawberry.field(
        resolver=_dead_letters,
        description="An agent's dead letters, the oldest first (`agent_not_found` for an id that is neither "
        "registered nor has any).",
    )
    dead_letter: DeadLetter = strawberry.field(resolver=_dead_letter, description="One dead letter.")
    conversations: list[Conversation] = strawberry.field(
        resolver=_conversations, description="The conversations that moved last, from the record."
    )
    conversation: ConversationTimeline = strawberry.field(
        resolver=_conversation,
        description="Every recorded message of a conversation across agents, in the order sent, with replies and "
        "timings (`conversation_not_found` if none).",
    )
    messages: list[RecordedMessage] = strawberry.field(
        resolver=_messages, description="Recorded messages, the latest finished first, filtered."
    )
    receipts: list[RecordedMessage] = strawberry.field(
        resolver=_receipts,
        description="A message's records and receipts (a redriven one has several), or where it waits in the inbox "
        "(`message_not_found` if neither).",
    )
    stats: Stats = strawberry.field(
        resolver=_stats, description="Counts of registered agents (walks every record) and the broker's counters."
    )
    health: Health = strawberry.field(resolver=_health, description="Whether Redis answers, and how fast.")
    knowledge: list[KnowledgeResult] = strawberry.field(
        resolver=_knowledge,
        description="Search the company's knowledge as a role, through the knowledge service "
        "(`agentcomms knowledge serve`).",
    )


# -- mutations -----------------------------------------------------------------------------------


async def _send(
    info: _Info,
    recipient_id: str,
    intent: str,
    data: JSON | None = None,
    priority: schemas.Priority = schemas.Priority.NORMAL,
    context: JSON | None = None,
    conversation_id: str | None = None,
) -> SendResult:
    body = _validated(
        models.SendRequest, recipient_id=recipient_id, intent=intent, data=data, priority=priority, context=context,
        conversation_id=conversation_id,
    )  # fmt: skip
    result = await _dashboard(info).sender.send_message(
        body.recipient_id, body.intent, body.data, priority=body.priority, context=body.context,
        conversation_id=body.conversation_id,
    )  # fmt: skip
    return SendResult.of(models.SendResult.of(result))


async def _ask(
    info: _Info,
    recipient_id: Annotated[str | None, strawberry.argument(description="Ask this agent (or give `role`).")] = None,
    role: Annotated[str | None, strawberry.argument(description="Ask an online agent of this role.")] = None,
    department: Annotated[str | None, strawberry.argument(description="With `role`: of this department.")] = None,
    intent: str = "request_knowledge",
    data: JSON | None = None,
    timeout: Annotated[float, strawberry.argument(description="Seconds to wait for the reply (at most 120).")] = 30.0,
    conversation_id: Annotated[
        str | None, strawberry.argument(description="The conversation it starts or joins (default: a new one).")
    ] = None,
) -> AgentResponse:
    body = _validated(
        models.AskRequest, recipient_id=recipient_id, role=role, department=department, intent=intent, data=data,
        timeout=timeout, conversation_id=conversation_id,
    )  # fmt: skip
    return AgentResponse.of(await _dashboard(info).ask(body))


async def _broadcast(
    info: _Info,
    intent: str,
    data: JSON | None = None,
    role: str | None = None,
    department: str | None = None,
    capability: str | None = None,
    everyone: Annotated[bool, strawberry.argument(description="To every registered agent (no filter).")] = False,
    online_only: bool = False,
    priority: schemas.Priority = schemas.Priority.NORMAL,
) -> list[BroadcastOutcome]:
    body = _validated(
        models.BroadcastRequest, intent=intent, data=data, role=role, department=department, capability=capability,
        everyone=everyone, online_only=online_only, priority=priority,
    )  # fmt: skip
    results = await _dashboard(info).sender.broadcast_message(
        body.intent, body.data, department=body.department, role=body.role, capability=body.capability,
        everyone=body.everyone, online_only=body.online_only, priority=body.priority,
    )  # fmt: skip
    outcomes = []
    for agent_id, result in results.items():
        if isinstance(result, AgentCommsError):
            problem = problem_for(result, info.context.secrets)
            error = ErrorDetail(code=problem.code, message=problem.detail)
            outcomes.append(BroadcastOutcome(agent_id=agent_id, ok=False, error=error))
        else:
            sent = BroadcastOutcome(
                agent_id=agent_id, ok=True, message_id=result.message_id, entry_id=result.entry_id,
                duplicate=result.duplicate,
            )  # fmt: skip
            outcomes.append(sent)
    return outcomes


async def _redrive_dead_letter(info: _Info, agent_id: str, entry_id: str) -> SendResult:
    agent_id, entry_id = _checked(_AGENT_ID, agent_id, "agent_id"), _checked(_ENTRY_ID, entry_id, "entry_id")
    return SendResult.of(models.SendResult.of(await _dashboard(info).broker.redrive_dead_letter(agent_id, entry_id)))


async def _purge_dead_letters(
    info: _Info,
    agent_id: str,
    confirm: Annotated[bool, strawberry.argument(description="Must be true: the dead letters are deleted for good.")],
) -> PurgeResult:
    agent_id = _checked(_AGENT_ID, agent_id, "agent_id")
    if not confirm:
        detail = f"purging deletes every dead letter of {agent_id!r}: give confirm: true"
        raise ApiProblem("confirmation_required", detail)
    return PurgeResult(agent_id=agent_id, purged=await _dashboard(info).broker.purge_dead_letters(agent_id))


@strawberry.type(description="Sending, asking, broadcasting; redriving and purging dead letters.")
class Mutation:
    send: SendResult = strawberry.mutation(
        resolver=_send, description="Send a one-way message to a registered agent; answers where it was stored."
    )
    ask: AgentResponse = strawberry.mutation(
        resolver=_ask,
        description="Send a request to an agent (`recipientId`) or an online agent of a `role`, and answer with its "
        "reply (`timeout` if none comes in time). A reply is an answer whether the agent succeeded or not: see "
        "`success` and `error`.",
    )
    broadcast: list[BroadcastOutcome] = strawberry.mutation(
        resolver=_broadcast,
        description="Send one message to every registered agent matching the filters; answers per recipient.",
    )
    redrive_dead_letter: SendResult = strawberry.mutation(
        resolver=_redrive_dead_letter,
        description="Move a dead letter back into its agent's inbox (with security on, the dashboard must hold an "
        "admin identity).",
    )
    purge_dead_letters: PurgeResult = strawberry.mutation(
        resolver=_purge_dead_letters, description="Delete all of an agent's dead letters (`confirm: true`)."
    )


# -- subscription --------------------------------------------------------------------------------


async def _events(
    info: _Info,
    kinds: Annotated[
        list[str] | None,
        strawberry.argument(
            description="Only events of these kinds. `subscribed` (the feed is listening: what is sent from now on "
            "is seen) comes first, but only when asked for here."
        ),
    ] = None,
) -> AsyncIterator[FeedEvent]:
    broker = _dashboard(info).broker
    wanted = frozenset(kinds) if kinds is not None else None
    feed = cast(AsyncGenerator[dict[str, Any], None], broker.events())  # an async generator: closed when we stop
    async with aclosing(feed):  # the subscriber left or completed: the feed's Redis connection goes now
        try:
            async with asyncio.timeout(broker.settings.reconnect_timeout):
                first = await anext(feed)  # {"event": "subscribed"}: listening
        except TimeoutError:
            raise BrokerConnectionError(
                f"the event feed could not subscribe within {broker.settings.reconnect_timeout:g}s", url=broker.url
            ) from None
        if wanted is not None and "subscribed" in wanted:
            yield FeedEvent.of(first)
        async for event in feed:
            kind = str(event.get("event") or "message")
            if wanted is None or kind in wanted:
                yield FeedEvent.of(event)


@strawberry.type(description="The live message feed.")
class Subscription:
    events: AsyncIterator[FeedEvent] = strawberry.subscription(
        resolver=_events,
        description="The live message feed, until the client completes or leaves: lossy, for watching, not auditing.",
    )


# -- errors and the router -----------------------------------------------------------------------


def _coded(error: GraphQLError, secrets: Sequence[str]) -> tuple[str, str]:
    """The REST problem code and a message without secrets for an error (tracebacks stay in the server's log)."""
    original = error.original_error
    if isinstance(original, AgentCommsError):
        problem = problem_for(original, secrets)
        return problem.code, problem.detail
    if isinstance(original, ApiProblem):
        return original.code, scrub(original.detail, secrets)
    if original is None:
        code = (error.extensions or {}).get("code")
        if isinstance(code, str):  # coded already
            return code, error.message
        if error.path is None:  # the document or its variables
            return "invalid_request", scrub(error.message, secrets)
    return "internal_error", "an unexpected error occurred; see the server's log"


class _CodedErrors(MaskErrors):
    """Replaces each error by one with ``extensions: {code}`` (MaskErrors' hooks see every result, streamed too)."""

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        context = self.execution_context.context
        code, message = _coded(error, context.secrets if isinstance(context, GraphQLContext) else ())
        return GraphQLError(
            message, nodes=error.nodes, source=error.source, positions=error.positions, path=error.path,
            extensions={"code": code},
        )  # fmt: skip


class _Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """Log as the REST API does (Strawberry's default logs every error with its traceback).

        Errors answered with a code at DEBUG, agentcomms errors without one as ERROR, any
        other exception as ERROR with its traceback.
        """
        for error in errors:
            original = error.original_error
            if original is None or isinstance(original, ApiProblem):
                logger.debug("graphql: %s", scrub(error.message))
            elif isinstance(original, AgentCommsError):
                problem = problem_for(original)
                level = logging.DEBUG if problem.code in PROBLEM_KINDS else logging.ERROR
                logger.log(level, "graphql %s failed: %s: %s", error.path, problem.code, problem.detail)
            else:
                logger.error("graphql %s failed", error.path, exc_info=original)


schema = _Schema(query=Query, mutation=Mutation, subscription=Subscription, extensions=[_CodedErrors])
"""The dashboard's GraphQL schema."""


def graphql_router(
    dependencies: Sequence[params.Depends] = (), *, secrets: Iterable[str] = ()
) -> GraphQLRouter[GraphQLContext, None]:
    """The GraphQL API at :data:`PATH`, for ``app.include_router``; its app's lifespan puts a Dashboard on its state.

    Subscriptions speak ``graphql-transport-ws``, from this origin or a client that is not a
    browser. It is not in the OpenAPI document, and serves no GraphiQL page (nothing is
    loaded from elsewhere).

    Args:
        dependencies: run before each request and WebSocket handshake, e.g. the bearer token check.
        secrets: strings no error may show (the dashboard's token).
    """
    hidden = tuple(secret for secret in secrets if secret)

    async def context(connection: HTTPConnection) -> GraphQLContext:
        return GraphQLContext(getattr(connection.app.state, "dashboard", None), hidden)

    return GraphQLRouter(
        schema, path=PATH, graphql_ide=None, context_getter=context, dependencies=list(dependencies),
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,), include_in_schema=False,
    )  # fmt: skip
