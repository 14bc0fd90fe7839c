"""The dashboard's REST API under ``/api``: agents, messages, dead letters, stats, knowledge, the live feed.

Each route is a thin call into the library through the :class:`Dashboard` the app's
lifespan opened; errors are answered as problem details (see ``problems``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

import agentcomms
from agentcomms.broker import MessageBroker
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerClosedError,
    BrokerConnectionError,
)
from agentcomms.knowledge.interface import AgentMemoryInterface, KnowledgeResult
from agentcomms.registry import AgentRegistry
from agentcomms.schemas import AgentInfo, AgentResponse, ErrorDetail
from agentcomms.security import speaking_as
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings
from agentcomms.web.models import (
    AskRequest,
    BroadcastFailed,
    BroadcastRequest,
    BroadcastSent,
    ConversationOut,
    ConversationTimeline,
    DeadLetterAgent,
    DeadLetterOut,
    Health,
    KnowledgeSearchRequest,
    PurgeResult,
    RecordedMessageOut,
    RegistryStatsOut,
    SendRequest,
    SendResult,
    Stats,
)
from agentcomms.web.problems import ApiProblem, code_for, problem_responses, scrub

__all__ = ["Dashboard", "dashboard_sender_id", "router"]

logger = logging.getLogger(__name__)

PING_SECONDS = 15.0
"""Seconds between the comment lines that keep an idle event stream open through proxies."""

SHUTDOWN_GRACE = 1.0
"""Seconds an event stream has to end by itself when the server shuts down, before it is cut off."""


def dashboard_sender_id(settings: Settings) -> str:
    """Who the dashboard sends as: ``dashboard``, or with security on the identity it holds.

    Raises:
        IdentityError: security is on and no single identity is configured.
    """
    return speaking_as(settings, "dashboard")


class Dashboard:
    """The connections the API uses: a broker, and a registry and a sender on it; the knowledge memory on demand.

    Made by :meth:`open` in the app's lifespan and closed at its end.
    """

    def __init__(self, broker: MessageBroker, sender_id: str) -> None:
        self.broker = broker
        self.sender_id = sender_id
        self.registry = AgentRegistry(broker)
        self.sender = MessageSender(sender_id=sender_id, broker=broker, registry=self.registry)
        self._memory: AgentMemoryInterface | None = None

    @classmethod
    async def open(cls, settings: Settings) -> Dashboard:
        """Connect to Redis as the dashboard.

        Raises:
            BrokerConnectionError: Redis is unreachable.
            IdentityError: security is on and the dashboard holds no identity.
        """
        sender_id = dashboard_sender_id(settings)
        broker = MessageBroker(settings=settings, client_name=sender_id)
        await broker.connect()
        logger.info("dashboard connected to %s as %s", broker.url, sender_id)
        return cls(broker, sender_id)

    async def ask(self, body: AskRequest) -> AgentResponse:
        """Send ``body``'s request to its agent, or to an online agent of its role, and wait for the reply."""
        if body.role is not None:
            return await self.sender.request_role(
                body.role, body.intent, body.data, department=body.department, timeout=body.timeout,
                conversation_id=body.conversation_id,
            )  # fmt: skip
        assert body.recipient_id is not None  # AskRequest checks that exactly one is given
        return await self.sender.request(
            body.recipient_id, body.intent, body.data, timeout=body.timeout, conversation_id=body.conversation_id
        )

    async def conversation(self, conversation_id: str) -> ConversationTimeline:
        """A conversation's timeline from the record (problem ``conversation_not_found`` if none of it is there)."""
        timeline = await self.broker.record.conversation(conversation_id)
        if not timeline:
            raise ApiProblem("conversation_not_found", f"no message of conversation {conversation_id!r} is recorded")
        return ConversationTimeline.of(conversation_id, timeline)

    async def receipts(
        self, message_id: str, agent_id: str | None, conversation_id: str | None
    ) -> list[RecordedMessageOut]:
        """A message's records and receipts (problem ``message_not_found`` if it is neither recorded nor waiting)."""
        found = await self.broker.record.receipts(message_id, agent_id=agent_id, conversation_id=conversation_id)
        if not found:
            raise ApiProblem("message_not_found", f"message {message_id!r} is neither in the record nor waiting")
        return [RecordedMessageOut.of(m) for m in found]

    async def memory(self) -> AgentMemoryInterface:
        """The knowledge memory, as a client of the knowledge service (made at the first search)."""
        if self._memory is None:
            self._memory = AgentMemoryInterface(
                self.broker.settings, broker=self.broker, mode="client", sender_id=self.sender_id
            )
        return await self._memory.initialize()

    async def close(self) -> None:
        """Close the knowledge memory and the broker."""
        if self._memory is not None:
            await self._memory.close()
            self._memory = None
        await self.broker.close()
        logger.info("dashboard disconnected")


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard | None = getattr(request.app.state, "dashboard", None)
    if dashboard is None:
        raise BrokerClosedError("the dashboard is not connected: its app's lifespan is not running")
    return dashboard


Connected = Annotated[Dashboard, Depends(_dashboard)]
AgentIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$", description="An agent id.")
]
EntryIdPath = Annotated[
    str, Path(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$", description="A dead letter's entry id, e.g. 1700000000000-0.")
]

router = APIRouter(prefix="/api")


@router.get("/health", responses={503: {"model": Health, "description": "Redis does not answer (`status`: unhealthy)"}})
async def health(dashboard: Connected, response: Response) -> Health:
    """Whether Redis answers (``status``; 503 when it does not), how fast, and the dashboard's counters."""
    report = await dashboard.broker.health_check()
    report.pop("subscriptions", None)
    if report.get("error"):
        report["error"] = scrub(str(report["error"]))
        response.status_code = 503
    return Health(**report, sender_id=dashboard.sender_id, version=agentcomms.__version__)


@router.get("/agents", responses=problem_responses("invalid_request"))
async def list_agents(
    dashboard: Connected,
    role: str | None = None,
    department: str | None = None,
    capability: Annotated[list[str] | None, Query(description="Repeat for agents with every capability.")] = None,
    intent: str | None = None,
    online_only: bool = False,
) -> list[AgentInfo]:
    """Registered agents matching every given filter (case-insensitive), offline ones too unless ``online_only``."""
    return await dashboard.registry.discover_agents(
        role=role, department=department, capability=capability, intent=intent, online_only=online_only
    )


@router.get("/agents/{agent_id}", responses=problem_responses("invalid_request", "agent_not_found"))
async def get_agent(dashboard: Connected, agent_id: AgentIdPath) -> AgentInfo:
    """What the registry knows of one agent."""
    return await dashboard.registry.get_agent(agent_id)


@router.post(
    "/send",
    responses=problem_responses("invalid_request", "agent_not_found", "invalid_message", "inbox_full", "forbidden"),
)
async def send(dashboard: Connected, body: SendRequest) -> SendResult:
    """Send a one-way message to a registered agent; answers where it was stored."""
    result = await dashboard.sender.send_message(
        body.recipient_id, body.intent, body.data, priority=body.priority, context=body.context,
        conversation_id=body.conversation_id,
    )  # fmt: skip
    return SendResult.of(result)


@router.post(
    "/ask",
    responses=problem_responses(
        "invalid_request",
        "agent_not_found",
        "no_agent_available",
        "invalid_message",
        "inbox_full",
        "forbidden",
        "timeout",
    ),
)
async def ask(dashboard: Connected, body: AskRequest) -> AgentResponse:
    """Send a request to an agent, or to an online agent of a role, and answer with its reply.

    A reply is answered with 200 whether the agent succeeded or not: see ``success`` and ``error``.
    """
    return await dashboard.ask(body)


@router.post("/broadcast", responses=problem_responses("invalid_request", "invalid_message", "forbidden"))
async def broadcast(dashboard: Connected, body: BroadcastRequest) -> dict[str, BroadcastSent | BroadcastFailed]:
    """Send one message to every registered agent matching the filters; answers per recipient whether it was stored."""
    results = await dashboard.sender.broadcast_message(
        body.intent, body.data, department=body.department, role=body.role, capability=body.capability,
        everyone=body.everyone, online_only=body.online_only, priority=body.priority,
    )  # fmt: skip
    outcomes: dict[str, BroadcastSent | BroadcastFailed] = {}
    for agent_id, result in results.items():
        if isinstance(result, AgentCommsError):
            outcomes[agent_id] = BroadcastFailed(error=ErrorDetail(code=code_for(result), message=scrub(str(result))))
        else:
            outcomes[agent_id] = BroadcastSent(
                message_id=result.message_id, entry_id=result.entry_id, duplicate=result.duplicate
            )
    return outcomes


AgentFilter = Annotated[
    str | None,
    Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$", description="A recipient's id."),
]
ConversationIdPath = Annotated[
    str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$", description="A conversation id.")
]
Since = Annotated[float | None, Query(ge=0, le=2**44, description="Finished at or after (epoch seconds).")]
Until = Annotated[float | None, Query(ge=0, le=2**44, description="Finished at or before (epoch seconds).")]


@router.get("/conversations", responses=problem_responses("invalid_request", "forbidden"))
async def list_conversations(
    dashboard: Connected,
    agent: AgentFilter = None,
    limit: Annotated[int, Query(ge=1, le=200, description="How many, the latest first.")] = 20,
) -> list[ConversationOut]:
    """The conversations that moved last (with a message to ``agent``, if given), from the record."""
    return [ConversationOut.of(c) for c in await dashboard.broker.record.conversations(agent, limit=limit)]


@router.get(
    "/conversations/{conversation_id}", responses=problem_responses("invalid_request", "conversation_not_found")
)
async def get_conversation(dashboard: Connected, conversation_id: ConversationIdPath) -> ConversationTimeline:
    """Every recorded message of a conversation across agents, in the order sent, with replies and timings."""
    return await dashboard.conversation(conversation_id)


@router.get("/messages", responses=problem_responses("invalid_request", "forbidden"))
async def list_messages(
    dashboard: Connected,
    agent: AgentFilter = None,
    sender: Annotated[str | None, Query(min_length=1, max_length=128, description="Only from this sender.")] = None,
    intent: Annotated[str | None, Query(min_length=1, max_length=64, description="Only with this intent.")] = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many, the latest first.")] = 100,
) -> list[RecordedMessageOut]:
    """Recorded messages, the latest finished first: to ``agent`` (else to anyone), within a time range."""
    found = await dashboard.broker.record.messages(
        agent, since=since, until=until, sender_id=sender, intent=intent, limit=limit
    )
    return [RecordedMessageOut.of(m) for m in found]


@router.get("/messages/{message_id}/receipts", responses=problem_responses("invalid_request", "message_not_found"))
async def get_receipts(
    dashboard: Connected,
    message_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")],
    agent: AgentFilter = None,
    conversation: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] = None,
) -> list[RecordedMessageOut]:
    """A message's records with their receipts (a redriven one has several), or where it waits in the inbox.

    Name its recipient (``agent``) or ``conversation`` to find it fast; only with ``agent``
    is the inbox searched for a message not finished yet.
    """
    return await dashboard.receipts(message_id, agent, conversation)


@router.get("/deadletters", responses=problem_responses("forbidden"))
async def dead_letter_agents(dashboard: Connected) -> list[DeadLetterAgent]:
    """Agents that have dead letters, and how many each."""
    broker = dashboard.broker
    agent_ids = await broker.dead_letter_agents()
    counts = await asyncio.gather(*(broker.count_dead_letters(agent_id) for agent_id in agent_ids))
    return [DeadLetterAgent(agent_id=a, count=n) for a, n in zip(agent_ids, counts, strict=True)]


@router.get("/deadletters/{agent_id}", responses=problem_responses("invalid_request", "agent_not_found", "forbidden"))
async def list_dead_letters(
    dashboard: Connected,
    agent_id: AgentIdPath,
    count: Annotated[int, Query(ge=1, le=1000, description="How many, the oldest first.")] = 100,
    after: Annotated[
        str | None, Query(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$", description="Only those after this entry id (paging).")
    ] = None,
) -> list[DeadLetterOut]:
    """An agent's dead letters, the oldest first; 404 for an id that is neither registered nor has any."""
    letters = await dashboard.broker.dead_letters(agent_id, count=count, after=after)
    if not letters and after is None and not await dashboard.registry.is_registered(agent_id):
        raise AgentNotFoundError(agent_id)
    return [DeadLetterOut.of(letter) for letter in letters]


@router.get(
    "/deadletters/{agent_id}/{entry_id}",
    responses=problem_responses("invalid_request", "dead_letter_not_found", "forbidden"),
)
async def get_dead_letter(dashboard: Connected, agent_id: AgentIdPath, entry_id: EntryIdPath) -> DeadLetterOut:
    """One dead letter."""
    return DeadLetterOut.of(await dashboard.broker.get_dead_letter(agent_id, entry_id))


@router.post(
    "/deadletters/{agent_id}/{entry_id}/redrive",
    responses=problem_responses("invalid_request", "dead_letter_not_found", "inbox_full", "forbidden"),
)
async def redrive_dead_letter(dashboard: Connected, agent_id: AgentIdPath, entry_id: EntryIdPath) -> SendResult:
    """Move a dead letter back into its agent's inbox (with security on, the dashboard must hold an admin identity).

    A dead letter that is not a valid message cannot be sent back (500 ``AgentCommsError``): purge it.
    """
    return SendResult.of(await dashboard.broker.redrive_dead_letter(agent_id, entry_id))


@router.delete(
    "/deadletters/{agent_id}", responses=problem_responses("invalid_request", "confirmation_required", "forbidden")
)
async def purge_dead_letters(
    dashboard: Connected,
    agent_id: AgentIdPath,
    confirm: Annotated[bool, Query(description="Must be true: the dead letters are deleted for good.")] = False,
) -> PurgeResult:
    """Delete all of an agent's dead letters (``?confirm=true``)."""
    if not confirm:
        raise ApiProblem(
            "confirmation_required", f"purging deletes every dead letter of {agent_id!r}: add ?confirm=true"
        )
    return PurgeResult(agent_id=agent_id, purged=await dashboard.broker.purge_dead_letters(agent_id))


@router.get("/stats")
async def stats(dashboard: Connected) -> Stats:
    """Counts of registered agents (walks every record) and the dashboard broker's counters."""
    registry = await dashboard.registry.get_registry_stats()
    return Stats(registry=RegistryStatsOut(**registry.as_dict()), broker=dashboard.broker.stats)


@router.post(
    "/knowledge/search",
    responses=problem_responses("invalid_request", "invalid_query", "knowledge_unavailable", "forbidden"),
)
async def search_knowledge(dashboard: Connected, body: KnowledgeSearchRequest) -> list[KnowledgeResult]:
    """Search the company's knowledge as a role, through the knowledge service (``agentcomms knowledge serve``)."""
    memory = await dashboard.memory()
    return await memory.search_knowledge(
        dashboard.sender_id, body.role, body.query, filters=body.filters, limit=body.limit
    )


def _event(event: dict[str, Any]) -> ServerSentEvent:
    kind = str(event.get("event") or "message")
    return ServerSentEvent(data=json.dumps(event, separators=(",", ":"), default=str), event=kind)


async def _feed(
    events: AsyncIterator[dict[str, Any]], first: dict[str, Any], stop: anyio.Event
) -> AsyncIterator[ServerSentEvent]:
    """``first``, then the feed's events, as SSE until the server shuts down (``stop``) or the client leaves.

    Ending by itself on ``stop`` lets the response finish cleanly instead of being cut off; a
    client that leaves cancels it.
    """
    yield _event(first)
    stopping = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(events))
            await asyncio.wait((following, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            yield _event(event)
    finally:
        stopping.cancel()
        if following is not None:
            following.cancel()  # ends the feed's generator, which drops its Redis connection


@router.get(
    "/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `event:` the kind (`subscribed` first, then `sent`, `handled`, "
            "`dead_lettered`), `data:` the event as JSON; a comment line every 15 s while idle.",
            "content": {"text/event-stream": {}},
        },
        **problem_responses("forbidden"),
    },
)
async def events(dashboard: Connected) -> EventSourceResponse:
    """The live message feed as Server-Sent Events, until the client disconnects. Lossy: for watching, not auditing.

    The response starts once the feed listens (its first event is ``subscribed``): a Redis user
    that may not subscribe to it gets a 403 problem, an unreachable Redis a 503.
    """
    broker = dashboard.broker
    events = broker.events()
    try:
        async with asyncio.timeout(broker.settings.reconnect_timeout):
            first = await anext(events)
    except TimeoutError:
        raise BrokerConnectionError(
            f"the event feed could not subscribe within {broker.settings.reconnect_timeout:g}s", url=broker.url
        ) from None
    stop = anyio.Event()  # set by sse-starlette when the server shuts down
    return EventSourceResponse(
        _feed(events, first, stop), ping=PING_SECONDS, shutdown_event=stop, shutdown_grace_period=SHUTDOWN_GRACE
    )
