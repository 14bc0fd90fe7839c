"""The record: every message an agent handled or dead-lettered, with its reply and receipts, kept in Redis.

Each agent's subscription records what it finishes in the same script call that
acknowledges it (``ack.lua``) or dead-letters it (``dead_letter.lua``): one entry of
``ac:{<agent id>}:record`` per message, holding the message as it was stored, the reply,
when it was sent (its inbox entry id), delivered (read by the agent) and finished (the
entry's own id), the reason of a dead letter, and its conversation. There is no index
to keep up: the ids agentcomms makes (version 7 UUIDs) carry their time, so a search
for a conversation or a message reads each record from then on. A message not finished
yet is still in its recipient's inbox, and :meth:`MessageRecord.receipts` looks there too.

The record is bounded by age (``AGENTCOMMS_RECORD_MAX_AGE``) and size per agent
(``AGENTCOMMS_RECORD_MAX_ENTRIES``); ``AGENTCOMMS_RECORD=false`` turns it off.
Queries across agents read every recorded agent's keys (one pipelined command each):
meant for dashboards and tools, not for the hot path.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from agentcomms import keys
from agentcomms.exceptions import MessageValidationError, RedisCommandError, RedisPermissionError
from agentcomms.schemas import AgentMessage, AgentResponse, id_time_ms
from agentcomms.transport import Commands

__all__ = ["ConversationSummary", "MessageRecord", "Receipt", "RecordedMessage"]

State = Literal["sent", "delivered", "handled", "replied", "failed", "expired", "dead_lettered"]
"""A message's states, in order: ``sent`` (stored in the inbox), ``delivered`` (read by its agent), then one of
``handled`` (a one-way message), ``replied`` (a request answered with success), ``failed`` (answered with an error),
``expired`` (not handled within its timeout) or ``dead_lettered`` (see the reason)."""

_PAGE = 500
_SCAN_LIMIT = 20_000
"""Entries read per agent at the most when a query must filter (a message id, a sender, an intent)."""
_CLOCK_SLACK_MS = 60_000
"""How far before the time in an id a search starts: the id was made by a sender's clock, the record runs on Redis's."""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as numbers, for sorting (``"1700-10"`` comes after ``"1700-9"``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Receipt:
    """One state of a message and when it was reached (the Redis server's clock, epoch seconds)."""

    state: State
    at: float

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {"state": self.state, "at": self.at}


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """A message as its recipient finished it (or, with ``outcome`` ``sent`` / ``delivered``, still in its inbox)."""

    agent_id: str
    """The recipient: whose record (or inbox) holds it."""
    record_id: str
    """The record entry's id ('' for a message still in the inbox)."""
    entry_id: str
    """Its inbox entry id: when it was sent."""
    conversation_id: str
    outcome: State
    body: bytes
    reply_body: bytes = b""
    reason: str | None = None
    """Why it was dead-lettered."""
    deliveries: int | None = None
    dead_letter_id: str | None = None
    delivered_ms: int | None = None

    @property
    def message(self) -> AgentMessage | None:
        """The message, or ``None`` if the entry did not hold one (dead-lettered as malformed)."""
        try:
            return AgentMessage.model_validate_json(self.body) if self.body else None
        except ValidationError:
            return None

    @property
    def reply(self) -> AgentResponse | None:
        """The reply it got, if it was a request that was answered."""
        try:
            return AgentResponse.model_validate_json(self.reply_body) if self.reply_body else None
        except ValidationError:
            return None

    @property
    def sent_at(self) -> float:
        """When it was stored in the inbox (epoch seconds, server clock)."""
        return _ms(self.entry_id) / 1000

    @property
    def finished_at(self) -> float | None:
        """When it was handled, answered or dead-lettered (``None`` while in the inbox)."""
        return _ms(self.record_id) / 1000 if self.record_id else None

    @property
    def delivered_at(self) -> float | None:
        """When its agent read it (epoch seconds), if known.

        The agent estimates the server's clock (±half a round trip to Redis), so this is
        kept between the send and the end.
        """
        if not self.delivered_ms:
            return None
        delivered = max(self.delivered_ms / 1000, self.sent_at)
        finished = self.finished_at
        return delivered if finished is None else min(delivered, finished)

    @property
    def receipts(self) -> list[Receipt]:
        """Its states with their times, in order."""
        out = [Receipt("sent", self.sent_at)]
        delivered = self.delivered_at
        if delivered is not None:
            out.append(Receipt("delivered", delivered))
        if self.finished_at is not None:
            out.append(Receipt(self.outcome, self.finished_at))
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the message and reply parsed (else their text), the receipts, the timings."""
        message, reply = self.message, self.reply
        finished, delivered = self.finished_at, self.delivered_at
        return {
            "agent_id": self.agent_id,
            "record_id": self.record_id,
            "entry_id": self.entry_id,
            "conversation_id": self.conversation_id,
            "message_id": message.message_id if message else None,
            "sender_id": message.sender_id if message else None,
            "intent": str(message.intent) if message else None,
            "responder_id": reply.responder_id if reply else None,
            "outcome": self.outcome,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "dead_letter_id": self.dead_letter_id,
            "sent_at": self.sent_at,
            "delivered_at": delivered,
            "finished_at": finished,
            "queued_ms": round((delivered - self.sent_at) * 1000, 3) if delivered is not None else None,
            "handling_ms": round((finished - delivered) * 1000, 3) if finished and delivered is not None else None,
            "receipts": [r.as_dict() for r in self.receipts],
            "message": message.model_dump(mode="json") if message else None,
            "payload": None if message or not self.body else _text(self.body),
            "reply": reply.model_dump(mode="json") if reply else None,
        }


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """A conversation: its id, when it started and last moved, who took part, how many messages."""

    conversation_id: str
    first_at: float
    last_at: float
    agents: list[str]
    """Senders and recipients, in order of appearance."""
    messages: int
    first_intent: str | None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "conversation_id": self.conversation_id,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "agents": self.agents,
            "messages": self.messages,
            "first_intent": self.first_intent,
        }


def _parse(agent_id: str, entry: list[Any]) -> RecordedMessage:
    record_id, flat = _text(entry[0]), entry[1] or []
    items = iter(flat)
    fields: dict[bytes, bytes] = dict(zip(items, items, strict=False))
    body = fields.get(b"m", b"")
    reply = fields.get(b"r", b"")
    delivered = fields.get(b"d", b"")
    outcome: State
    reason = None
    if fields.get(b"k") == b"x":
        reason = _text(fields.get(b"why"))
        outcome = "expired" if reason.startswith("expired") else "dead_lettered"
    elif not reply:
        outcome = "handled"
    else:
        outcome = "failed" if reply.startswith(b'{"success":false') else "replied"  # the envelope's first field
    try:
        deliveries = int(fields[b"n"]) if b"n" in fields else None
    except ValueError:
        deliveries = None
    return RecordedMessage(
        agent_id=agent_id,
        record_id=record_id,
        entry_id=_text(fields.get(b"i")) or record_id,
        conversation_id=_text(fields.get(b"c")),
        outcome=outcome,
        body=body,
        reply_body=reply,
        reason=reason,
        deliveries=deliveries,
        dead_letter_id=_text(fields[b"dl"]) if b"dl" in fields else None,
        delivered_ms=int(delivered) if delivered.isdigit() else None,
    )


def _matches(item: RecordedMessage, sender_id: str | None, intent: str | None) -> bool:
    if sender_id is None and intent is None:
        return True
    message = item.message
    if message is None:
        return False
    return (sender_id is None or message.sender_id == sender_id) and (intent is None or str(message.intent) == intent)


def _bound(seconds: float | None, default: str, *, exclusive_end: bool = False) -> str:
    if seconds is None:
        return default
    if seconds < 0 or seconds > 2**44:
        raise MessageValidationError(f"a time must be epoch seconds, not {seconds!r}")
    return str(int(seconds * 1000) + (1 if exclusive_end else 0))


class MessageRecord:
    """Reads the record (see the module's docstring); :attr:`MessageBroker.record` gives one."""

    def __init__(self, pipeliner: Commands) -> None:
        self._pipeliner = pipeliner

    async def agents(self) -> list[str]:
        """Agent ids that have a record (their subscription started with recording on)."""
        members = await self._pipeliner.call("SMEMBERS", keys.RECORD_INDEX, replay=True)
        return sorted(_text(m) for m in members or ())

    async def messages(
        self,
        agent_id: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        sender_id: str | None = None,
        intent: str | None = None,
        limit: int = 100,
    ) -> list[RecordedMessage]:
        """Recorded messages, newest first: to ``agent_id`` (else to anyone), finished within ``since``..``until``.

        ``sender_id`` and ``intent`` filter what is read (at most 20,000 entries per agent).

        Raises:
            MessageValidationError: a time is not epoch seconds.
        """
        start, end = _bound(since, "-"), _bound(until, "+")
        agents = [agent_id] if agent_id else await self.agents()
        found = await asyncio.gather(*(self._newest(a, start, end, sender_id, intent, limit) for a in agents))
        merged = heapq.merge(*found, key=lambda m: _order(m.record_id), reverse=True)
        return [m for _, m in zip(range(limit), merged, strict=False)]

    async def _newest(
        self, agent_id: str, start: str, end: str, sender_id: str | None, intent: str | None, limit: int
    ) -> list[RecordedMessage]:
        out: list[RecordedMessage] = []
        read = 0
        filtered = sender_id is not None or intent is not None
        while len(out) < limit and read < _SCAN_LIMIT:
            count = _PAGE if filtered else limit - len(out)
            page = await self._read(("XREVRANGE", keys.record(agent_id), end, start, "COUNT", count))
            for entry in page or ():
                item = _parse(agent_id, entry)
                if _matches(item, sender_id, intent):
                    out.append(item)
            read += len(page or ())
            if not page or len(page) < count:
                break
            end = f"({_text(page[-1][0])}"
        return out[:limit]

    async def conversation(self, conversation_id: str) -> list[RecordedMessage]:
        """Every recorded message of one conversation, across agents, in the order they were sent.

        A conversation id made by agentcomms (a version 7 UUID) says when the conversation
        started: each agent's record is read from then on. Any other id is looked for in the
        newest entries of every record (20,000 per agent at the most).
        """
        started = id_time_ms(conversation_id)
        start = "-" if started is None else str(max(0, started - _CLOCK_SLACK_MS))
        wanted = conversation_id.encode()
        parts = await asyncio.gather(
            *(self._scan(agent, start, lambda fields: fields.get(b"c") == wanted) for agent in await self.agents())
        )
        return in_send_order([m for part in parts for m in part])

    async def _scan(
        self, agent_id: str, start: str, keep: Callable[[dict[bytes, bytes]], bool]
    ) -> list[RecordedMessage]:
        """The entries of ``agent_id``'s record from ``start`` on that ``keep`` accepts, oldest first.

        Read from the newest back (20,000 at the most), so a long scan loses the oldest, not the newest.
        """
        out: list[RecordedMessage] = []
        record, read, cursor = keys.record(agent_id), 0, "+"
        while read < _SCAN_LIMIT:
            page = await self._read(("XREVRANGE", record, cursor, start, "COUNT", _PAGE))
            for entry in page or ():
                items = iter(entry[1] or [])
                if keep(dict(zip(items, items, strict=False))):
                    out.append(_parse(agent_id, entry))
            read += len(page or ())
            if not page or len(page) < _PAGE:
                break
            cursor = f"({_text(page[-1][0])}"
        return out[::-1]

    async def conversations(self, agent_id: str | None = None, *, limit: int = 20) -> list[ConversationSummary]:
        """The conversations that moved last (with a message to ``agent_id``, if given), newest first.

        Found among the newest 500 entries of each record.
        """
        agents = [agent_id] if agent_id else await self.agents()
        with self._pipeliner.batch():
            reads = [self._read(("XREVRANGE", keys.record(a), "+", "-", "COUNT", _PAGE)) for a in agents]
        latest: dict[str, int] = {}
        for page in await asyncio.gather(*reads):
            for entry in page or ():
                items = iter(entry[1] or [])
                conversation = _text(dict(zip(items, items, strict=False)).get(b"c"))
                if conversation:
                    latest[conversation] = max(latest.get(conversation, 0), _ms(_text(entry[0])))
        newest = heapq.nlargest(limit, latest, key=latest.__getitem__)
        timelines = await asyncio.gather(*(self.conversation(c) for c in newest))
        return [_summary(c, t) for c, t in zip(newest, timelines, strict=True) if t]

    async def receipts(
        self, message_id: str, *, agent_id: str | None = None, conversation_id: str | None = None
    ) -> list[RecordedMessage]:
        """Every record of one message (a redriven one has several), oldest first; else where it waits in the inbox.

        A message id made by agentcomms (a version 7 UUID) says when it was sent: records are
        read from then on; else the newest 20,000 entries of each. Give its recipient
        (``agent_id``) or its conversation to read less. Only with ``agent_id`` is the inbox
        searched for a message not finished yet.
        """
        needle = f'"message_id":"{message_id}"'.encode()
        if conversation_id:
            found = [m for m in await self.conversation(conversation_id) if needle in m.body]
        else:
            sent = id_time_ms(message_id)
            start = "-" if sent is None else str(max(0, sent - _CLOCK_SLACK_MS))
            agents = [agent_id] if agent_id else await self.agents()
            parts = await asyncio.gather(
                *(self._scan(a, start, lambda fields: needle in fields.get(b"m", b"")) for a in agents)
            )
            found = sorted((m for part in parts for m in part), key=lambda m: _order(m.record_id))
        if agent_id and (not found or found[-1].outcome in ("expired", "dead_lettered")):
            waiting = await self._waiting(agent_id, needle)
            if waiting is not None:
                found.append(waiting)
        return found

    def _read(self, command: tuple[str | int, ...]) -> Awaitable[Any]:
        """A read of a record, queued now; a key of another type (someone else's) reads as nothing."""
        return _tolerant(self._pipeliner.call(*command, replay=True))

    async def _waiting(self, agent_id: str, needle: bytes) -> RecordedMessage | None:
        """The message in ``agent_id``'s inbox (sent, or delivered and not finished), if it is there.

        ``None`` also when this process's Redis user may not read inboxes (a dashboard's ACL user).
        """
        try:
            return await self._find_waiting(agent_id, needle)
        except RedisPermissionError:
            return None

    async def _find_waiting(self, agent_id: str, needle: bytes) -> RecordedMessage | None:
        for stream in keys.inboxes(agent_id):
            start = "-"
            for _ in range(_SCAN_LIMIT // _PAGE):
                page = await self._pipeliner.call("XRANGE", stream, start, "+", "COUNT", _PAGE, replay=True)
                for entry in page or ():
                    flat = entry[1] or []
                    body = flat[1] if len(flat) >= 2 and flat[0] == b"m" else b""
                    if needle in body:
                        return await self._pending(agent_id, stream, _text(entry[0]), body)
                if not page or len(page) < _PAGE:
                    break
                start = f"({_text(page[-1][0])}"
        return None

    async def _pending(self, agent_id: str, stream: str, entry_id: str, body: bytes) -> RecordedMessage:
        with self._pipeliner.batch():
            pending = self._pipeliner.call("XPENDING", stream, keys.GROUP, entry_id, entry_id, 1, replay=True)
            now = self._pipeliner.call("TIME", replay=True)
        outcomes: tuple[Any, Any] = await asyncio.gather(pending, now, return_exceptions=True)
        found, clock = outcomes
        if isinstance(clock, BaseException):
            raise clock
        if isinstance(found, RedisCommandError) and found.code == "NOGROUP":
            found = None  # nobody ever read this inbox: not delivered
        elif isinstance(found, BaseException):
            raise found
        delivered = None
        if found:
            seconds, micros = clock
            delivered = int(seconds) * 1000 + int(micros) // 1000 - int(found[0][2])
        try:
            conversation = AgentMessage.model_validate_json(body).conversation_id
        except ValidationError:
            conversation = ""
        return RecordedMessage(
            agent_id=agent_id,
            record_id="",
            entry_id=entry_id,
            conversation_id=conversation,
            outcome="delivered" if delivered else "sent",
            body=body,
            delivered_ms=delivered,
        )


async def _tolerant(read: Awaitable[Any]) -> Any:
    try:
        return await read
    except RedisCommandError as exc:
        if exc.code != "WRONGTYPE":
            raise
        return []


def in_send_order(hops: list[RecordedMessage]) -> list[RecordedMessage]:
    """Messages of a conversation in the order they were sent: by their entry ids' time, then by cause.

    Entry ids of different inboxes sent within one millisecond say nothing about their order, but
    a message sent by the agent that received another one of that millisecond came after it.
    """
    ordered = sorted(hops, key=lambda m: (_ms(m.entry_id), _order(m.record_id)))
    for _ in range(len(ordered)):  # a few passes at most: moves within one millisecond
        moved = False
        for i in range(len(ordered) - 1):
            first, then = ordered[i], ordered[i + 1]
            if _ms(first.entry_id) == _ms(then.entry_id) and _sent_by(first) in _received_by(then):
                if _sent_by(then) not in _received_by(first):
                    ordered[i], ordered[i + 1] = then, first
                    moved = True
        if not moved:
            break
    return ordered


def _sent_by(item: RecordedMessage) -> str | None:
    message = item.message
    return message.sender_id if message else None


def _received_by(item: RecordedMessage) -> set[str | None]:
    reply = item.reply
    return {item.agent_id, reply.responder_id if reply else None} - {None}


def _summary(conversation_id: str, timeline: list[RecordedMessage]) -> ConversationSummary:
    agents: list[str] = []
    for item in timeline:
        message = item.message
        for agent in (message.sender_id if message else None, item.agent_id):
            if agent and agent not in agents:
                agents.append(agent)
    first = timeline[0].message
    finished = [m.finished_at for m in timeline if m.finished_at is not None]
    return ConversationSummary(
        conversation_id=conversation_id,
        first_at=timeline[0].sent_at,
        last_at=max(finished) if finished else timeline[-1].sent_at,
        agents=agents,
        messages=len(timeline),
        first_intent=str(first.intent) if first else None,
    )
