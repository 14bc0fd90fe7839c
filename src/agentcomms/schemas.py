"""Message and agent schemas: the vocabulary every layer shares. No I/O here.

A message on the wire is the JSON form of :class:`AgentMessage`; a reply is the JSON
form of :class:`AgentResponse`. ``export_json_schemas()`` gives the JSON Schema of
each for other languages and for validation at the edges.
"""

from __future__ import annotations

import contextvars
import os
import re
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError, field_validator

__all__ = [
    "CURRENT_CONVERSATION",
    "AgentId",
    "AgentInfo",
    "AgentMessage",
    "AgentResponse",
    "AgentStatus",
    "ErrorDetail",
    "MessageIntent",
    "MessagePayload",
    "Priority",
    "describe_errors",
    "export_json_schemas",
    "id_time_ms",
    "new_id",
    "normalize_agent_id",
]

AgentId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$")]
"""An agent id such as ``agent.cso.jane``: letters, digits and ``_ . : @ -``; no spaces, no braces.

Braces are excluded because the id becomes a Redis Cluster hash tag.
"""

CURRENT_CONVERSATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "agentcomms_conversation", default=None
)
"""The conversation of the message being handled: messages sent from its handler join it (unless told otherwise)."""

RecipientId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^(?:[A-Za-z0-9_][A-Za-z0-9_.:@-]*|@[A-Za-z0-9_.%~-]+)$"),
]
"""An agent id, or a role's address: ``@`` and the role, case-folded and %-encoded (``@cso``): whichever agent
of the role is free takes it."""

MessageId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
ShortList = Annotated[list[Name], Field(max_length=64)]
IntentName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.:-]*$")]


def normalize_agent_id(value: str) -> str:
    """Turn a free-form id such as ``"agent.cmo.John Smith"`` into a valid one: ``"agent.cmo.john_smith"``.

    Lower-cases, joins words with ``_`` and drops characters an agent id may not hold.
    """
    collapsed = re.sub(r"\s+", "_", value.strip().lower())
    cleaned = re.sub(r"[^a-z0-9_.:@-]", "", collapsed).lstrip(".:@-")
    return cleaned[:128]


def describe_errors(exc: ValidationError, *, limit: int | None = None) -> str:
    """A validation error as one line: ``field.path: message; ...`` (the first ``limit`` errors)."""
    errors = exc.errors(include_url=False)[:limit]
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in errors)


_ID_POOL_SIZE = 10 * 256
_id_pool = b""
_id_at = 0


def _new_id() -> str:
    """A time-ordered (version 7, RFC 9562) UUID as text: the wall clock's ms, then 74 random bits.

    Random bits come from one ``os.urandom`` read per 256 ids (``uuid.uuid4()`` makes a system
    call per id and builds a UUID object). The time lets the record find a conversation or a
    message from its id (:func:`id_time_ms`).
    """
    global _id_pool, _id_at
    if _id_at >= len(_id_pool):
        _id_pool, _id_at = os.urandom(_ID_POOL_SIZE), 0
    at = _id_at
    _id_at = at + 10
    h = _id_pool[at : at + 10].hex()
    t = f"{time.time_ns() // 1_000_000:012x}"
    return f"{t[:8]}-{t[8:]}-7{h[:3]}-{_VARIANT[h[3]]}{h[4:7]}-{h[7:19]}"


_UUID7 = re.compile(r"([0-9a-f]{8})-([0-9a-f]{4})-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_id() -> str:
    """A new message or conversation id: a version 7 UUID, as the models make by default."""
    return _new_id()


def id_time_ms(value: str) -> int | None:
    """When a version 7 UUID (the default message and conversation ids) was made, in epoch ms; else ``None``."""
    match = _UUID7.fullmatch(value)
    return int(match.group(1) + match.group(2), 16) if match else None


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""The RFC 4122 variant bits over the first digit of the fourth group."""


def _forget_ids() -> None:
    global _id_pool, _id_at
    _id_pool, _id_at = b"", 0


os.register_at_fork(after_in_child=_forget_ids)  # a forked child must not hand out its parent's next ids


def _utcnow() -> datetime:
    return datetime.now(UTC)


class MessageIntent(StrEnum):
    """What a message asks for. Any lowercase name (``"review_budget"``) is accepted as a custom intent.

    ``AGENT_STATUS`` is not among the seed's eight intents, but its broadcast example uses it,
    so it is built in too.
    """

    GET_ROADMAP = "get_roadmap"
    ASSIGN_TASK = "assign_task"
    REQUEST_KNOWLEDGE = "request_knowledge"
    SHARE_INSIGHTS = "share_insights"
    REQUEST_REVIEW = "request_review"
    PROVIDE_FEEDBACK = "provide_feedback"
    HEALTH_CHECK = "health_check"
    CAPABILITY_QUERY = "capability_query"
    AGENT_STATUS = "agent_status"


class Priority(StrEnum):
    """Delivery priority: each has its own inbox stream, read high first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class AgentStatus(StrEnum):
    """Availability of an agent as the registry reports it."""

    ONLINE = "online"
    BUSY = "busy"
    OFFLINE = "offline"


class MessagePayload(BaseModel):
    """The body of a message: free-form ``data`` plus delivery options."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    requires_response: bool = False
    response_timeout: Annotated[float, Field(gt=0, le=86_400)] | None = None
    """Seconds the sender waits for a reply; a request still unhandled after this is dead-lettered as expired."""
    context: dict[str, Any] = Field(default_factory=dict)


def _wire_required(*names: str) -> Any:
    """A JSON Schema hook: fields that have a default in Python but must be present on the wire."""

    def hook(schema: dict[str, Any]) -> None:
        schema["required"] = sorted({*schema.get("required", []), *names})

    return hook


class AgentMessage(BaseModel):
    """A message from one agent (or a person's sender) to another.

    On the wire ``message_id`` is required (it is the dedup key; Python fills a random one). A
    message is a request when ``reply_to`` is set; ``requires_response`` is informational.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_wire_required("message_id"))

    message_id: MessageId = Field(default_factory=_new_id)
    conversation_id: MessageId = Field(default_factory=_new_id)
    sender_id: AgentId
    recipient_id: RecipientId
    intent: MessageIntent | IntentName = Field(union_mode="left_to_right")
    """A built-in intent becomes the enum member (tried first); any other valid name stays text."""
    payload: MessagePayload = Field(default_factory=MessagePayload)
    timestamp: datetime = Field(default_factory=_utcnow)
    reply_to: Annotated[str, StringConstraints(max_length=200)] | None = None
    """The caller's reply stream; set by the broker for requests."""
    correlation_id: MessageId | None = None
    """Set on requests: the reply carries it back so the caller can match it."""
    sealed: Annotated[str, StringConstraints(max_length=2_000_000)] | None = None
    """The payload's ``data`` and ``context`` encrypted for the recipient (both are then empty): docs/security.md."""

    @property
    def sender_roles(self) -> tuple[str, ...] | None:
        """The roles of the verified sender, from the trust store (``None`` when security is off).

        A handler gets a :class:`VerifiedMessage` when security is on; this base has none.
        """
        return None

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class VerifiedMessage(AgentMessage):
    """An :class:`AgentMessage` whose sender was authenticated (security on); ``sender_roles`` is set.

    A subclass, so that messages without security carry no private attribute (pydantic
    initialises those on every instance, about 1 µs a message).
    """

    _sender_roles: tuple[str, ...] | None = PrivateAttr(default=None)

    @property
    def sender_roles(self) -> tuple[str, ...] | None:
        """The roles of the verified sender, from the trust store."""
        return self._sender_roles


class ErrorDetail(BaseModel):
    """Why a request failed: a stable machine-readable ``code`` and a human ``message``."""

    model_config = ConfigDict(extra="forbid")

    code: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    message: Annotated[str, StringConstraints(max_length=4096)] = ""


class AgentResponse(BaseModel):
    """The reply to a request: ``{"success": ..., "data": ..., "error": {"code", "message"}}``.

    It also reads like the seed's dict: ``response.get("success")`` and ``response["data"]`` work.
    """

    model_config = ConfigDict(extra="forbid")

    success: bool
    data: Any = None
    error: ErrorDetail | None = None
    correlation_id: MessageId | None = None
    responder_id: AgentId | None = None
    sealed: Annotated[str, StringConstraints(max_length=2_000_000)] | None = None
    """``data``, encrypted for the caller (when the request was sealed)."""

    @classmethod
    def ok(cls, data: Any = None, **fields: Any) -> AgentResponse:
        """A successful reply carrying ``data``."""
        return cls(success=True, data=data, **fields)

    @classmethod
    def fail(cls, code: str, message: str = "", **fields: Any) -> AgentResponse:
        """A failed reply with an error ``code`` and ``message`` (cut to their limits: 64 and 4096 characters)."""
        code = str(code).strip()[:64] or "error"
        return cls(success=False, error=ErrorDetail(code=code, message=str(message)[:4096]), **fields)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        value = getattr(self, key)
        return value.model_dump() if isinstance(value, BaseModel) else value

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read, as the seed's examples use it."""
        try:
            return self[key]
        except KeyError:
            return default


class AgentInfo(BaseModel):
    """What the registry knows of one agent id."""

    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    user_name: Name
    role: Name
    department: Name
    capabilities: ShortList = Field(default_factory=list)
    supported_intents: Annotated[list[MessageIntent | IntentName], Field(max_length=64)] = Field(default_factory=list)
    status: AgentStatus = AgentStatus.ONLINE
    version: Annotated[str, StringConstraints(max_length=32)] = "1.0.0"
    started_at: datetime | None = None
    last_seen: datetime | None = None
    instance_count: Annotated[int, Field(ge=0)] = 0
    metadata: dict[str, str] = Field(default_factory=dict)
    signature: Annotated[str, StringConstraints(max_length=300)] | None = None
    """With security on: the record's signature by the agent's identity (or an admin's), see docs/security.md."""


def export_json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every message type, by model name."""
    models: list[type[BaseModel]] = [AgentMessage, MessagePayload, AgentResponse, AgentInfo]
    return {model.__name__: model.model_json_schema() for model in models}
