"""The REST API's request and response bodies (the library's own models where they fit: AgentInfo, AgentResponse)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from agentcomms.broker import BrokerStats, PublishResult
from agentcomms.deadletters import DeadLetter
from agentcomms.record import ConversationSummary, RecordedMessage, State
from agentcomms.schemas import AgentId, AgentMessage, AgentResponse, ErrorDetail, IntentName, MessageId, Name, Priority

__all__ = [
    "AskRequest",
    "BroadcastFailed",
    "BroadcastRequest",
    "BroadcastSent",
    "ConversationOut",
    "ConversationTimeline",
    "DeadLetterAgent",
    "DeadLetterOut",
    "Health",
    "KnowledgeSearchRequest",
    "PurgeResult",
    "ReceiptOut",
    "RecordedMessageOut",
    "RegistryStatsOut",
    "SendRequest",
    "SendResult",
    "Stats",
]

Intent = IntentName
"""An intent name (``request_knowledge``, or one of your own, lower case): the form the messages allow."""

MAX_ASK_TIMEOUT = 120.0
"""The longest a request through the API may wait for its reply, in seconds."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SendRequest(_Body):
    """A one-way message to one agent."""

    recipient_id: AgentId
    intent: Intent
    data: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    context: dict[str, Any] = Field(default_factory=dict)
    conversation_id: MessageId | None = None


class SendResult(BaseModel):
    """Where a message went: its stream entry id, or ``duplicate`` (no entry id) if it was accepted before."""

    message_id: str
    recipient_id: str
    entry_id: str
    duplicate: bool = False

    @classmethod
    def of(cls, result: PublishResult) -> SendResult:
        """The body of a broker's :class:`PublishResult`."""
        return cls(
            message_id=result.message_id, recipient_id=result.recipient_id, entry_id=result.entry_id,
            duplicate=result.duplicate,
        )  # fmt: skip


class AskRequest(_Body):
    """A request to one agent (``recipient_id``) or to an online agent of a ``role``; the reply is awaited."""

    recipient_id: AgentId | None = None
    role: Name | None = None
    department: Name | None = None
    """With ``role``: only an agent of this department."""
    intent: Intent = "request_knowledge"
    data: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(30.0, ge=0.1, le=MAX_ASK_TIMEOUT)
    """Seconds to wait for the reply (0.1 to 120; it covers finding an agent of the role too)."""
    conversation_id: MessageId | None = None
    """The conversation the request starts or joins (default: a new one); its timeline is in the record."""

    @model_validator(mode="after")
    def _one_addressee(self) -> Self:
        if (self.recipient_id is None) == (self.role is None):
            raise ValueError("give exactly one of recipient_id or role")
        if self.department is not None and self.role is None:
            raise ValueError("department narrows a role: give role too")
        return self


class BroadcastRequest(_Body):
    """One message to every registered agent matching the filters (``everyone: true`` for all agents)."""

    intent: Intent
    data: dict[str, Any] = Field(default_factory=dict)
    role: Name | None = None
    department: Name | None = None
    capability: Name | None = None
    everyone: bool = False
    online_only: bool = False
    priority: Priority = Priority.NORMAL


class BroadcastSent(BaseModel):
    """A broadcast's message to one recipient was stored in its inbox."""

    ok: Literal[True] = True
    message_id: str
    entry_id: str
    duplicate: bool = False


class BroadcastFailed(BaseModel):
    """A broadcast's message to one recipient was not stored, and why."""

    ok: Literal[False] = False
    error: ErrorDetail


class DeadLetterAgent(BaseModel):
    """An agent that has dead letters, and how many."""

    agent_id: str
    count: int


class DeadLetterOut(BaseModel):
    """A message that could not be delivered, with why and after how many deliveries.

    ``message`` is the message when it parses as one; else ``payload`` is its text, or
    ``raw`` the entry's fields when it was not a message at all.
    """

    agent_id: str
    entry_id: str
    reason: str
    deliveries: int
    source_id: str
    message: AgentMessage | None = None
    payload: str | None = None
    raw: str | None = None

    @classmethod
    def of(cls, letter: DeadLetter) -> DeadLetterOut:
        """The body of a :class:`DeadLetter`."""
        message = letter.message
        return cls(
            agent_id=letter.agent_id, entry_id=letter.entry_id, reason=letter.reason, deliveries=letter.deliveries,
            source_id=letter.source_id, message=message,
            payload=None if message else letter.payload.decode(errors="replace"), raw=letter.raw,
        )  # fmt: skip


class PurgeResult(BaseModel):
    """How many dead letters a purge deleted."""

    agent_id: str
    purged: int


class Health(BaseModel):
    """Whether Redis answers, how fast, and the dashboard's connection counters."""

    status: Literal["healthy", "unhealthy"]
    error: str | None = None
    latency_ms: float
    redis_version: str | None = None
    client_id: str
    sender_id: str
    version: str
    """agentcomms's version."""
    stats: BrokerStats


class RegistryStatsOut(BaseModel):
    """Counts of registered agents, in total and by role and department (``{"total", "online"}`` each)."""

    total_agents: int
    online_agents: int
    offline_agents: int
    malformed_records: int
    by_role: dict[str, dict[str, int]]
    by_department: dict[str, dict[str, int]]


class Stats(BaseModel):
    """The registry's counts and the dashboard broker's counters since it connected."""

    registry: RegistryStatsOut
    broker: BrokerStats


class KnowledgeSearchRequest(_Body):
    """A knowledge search as a ``role`` (security on: one of the dashboard's identity's roles; none: its only one)."""

    role: Name | None = None
    query: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    limit: int = Field(5, ge=1, le=50)
    filters: dict[str, Any] | None = None
    """Narrow by ``domains``, ``kind`` (``document`` / ``insight``), ``author``, ``source_id``."""


class ReceiptOut(BaseModel):
    """One state of a message and when it was reached (epoch seconds, the Redis server's clock)."""

    state: State
    at: float


class RecordedMessageOut(BaseModel):
    """A message from the record: what was sent, to whom, its reply, its receipts and where the time went.

    ``outcome`` ``sent`` or ``delivered``: still in its recipient's inbox (only from receipts).
    ``queued_ms``: from sent to delivered; ``handling_ms``: from delivered to handled.
    """

    agent_id: str
    """The recipient."""
    record_id: str
    entry_id: str
    conversation_id: str
    message_id: str | None
    sender_id: str | None
    intent: str | None
    responder_id: str | None = None
    """Who answered: the recipient, or for a message to a role's address (``@cso``), the agent that took it."""
    outcome: State
    reason: str | None = None
    deliveries: int | None = None
    dead_letter_id: str | None = None
    sent_at: float
    delivered_at: float | None = None
    finished_at: float | None = None
    queued_ms: float | None = None
    handling_ms: float | None = None
    receipts: list[ReceiptOut]
    message: AgentMessage | None = None
    payload: str | None = None
    """The entry's text when it was not a message."""
    reply: AgentResponse | None = None

    @classmethod
    def of(cls, recorded: RecordedMessage) -> RecordedMessageOut:
        """The body of a :class:`RecordedMessage`."""
        fields = recorded.as_dict()
        return cls(**{**fields, "message": recorded.message, "reply": recorded.reply})


class ConversationOut(BaseModel):
    """A conversation in the record: when it started and last moved, who took part, how many messages."""

    conversation_id: str
    first_at: float
    last_at: float
    agents: list[str]
    messages: int
    first_intent: str | None

    @classmethod
    def of(cls, summary: ConversationSummary) -> ConversationOut:
        """The body of a :class:`ConversationSummary`."""
        return cls(**summary.as_dict())


class ConversationTimeline(BaseModel):
    """Every recorded message of one conversation across agents, in the order they were sent."""

    conversation_id: str
    started_at: float
    """When its first message was sent."""
    duration_ms: float
    """From its first message sent to its last message finished."""
    messages: list[RecordedMessageOut]

    @classmethod
    def of(cls, conversation_id: str, timeline: list[RecordedMessage]) -> ConversationTimeline:
        """The timeline of ``timeline``'s messages (at least one)."""
        start = timeline[0].sent_at
        end = max((m.finished_at or m.sent_at) for m in timeline)
        return cls(
            conversation_id=conversation_id, started_at=start, duration_ms=round((end - start) * 1000, 3),
            messages=[RecordedMessageOut.of(m) for m in timeline],
        )  # fmt: skip
