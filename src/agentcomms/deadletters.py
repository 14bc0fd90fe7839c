"""Dead letters: moving an entry out of an inbox with why, and listing, showing, redriving, purging them.

A dead letter is an entry of ``ac:{<agent id>}:dead``: the reason, the deliveries it had,
where it came from, and the message as it was (``payload``), or the entry's raw fields
when it was not a message at all. Nothing trims that stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agentcomms import keys
from agentcomms.exceptions import AgentCommsError, DeadLetterNotFoundError, InboxFullError, MessageValidationError
from agentcomms.schemas import AgentMessage
from agentcomms.transport import Commands
from agentcomms.transport.scripts import DEAD_LETTER, PURGE, REDRIVE

__all__ = ["DeadLetter", "move_to_dead_letters"]

logger = logging.getLogger(__name__)

_RECEIPT_TTL_MS = 3_600_000
"""How long a redrive's receipt lives (a repeat after a lost connection comes within seconds)."""


def _text(value: bytes | str | None) -> str:
    """Text of a Redis value that may not be valid UTF-8 (a hostile or broken writer's): never raises."""
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be delivered, with why and after how many deliveries."""

    agent_id: str
    entry_id: str
    reason: str
    deliveries: int
    source_id: str
    payload: bytes
    """The message as it was in the inbox (empty if the entry had no ``m`` field; see ``raw``)."""
    raw: str | None = None
    """The entry's fields as JSON when it was not a message at all (bytes that are not UTF-8 shown as U+FFFD)."""

    @property
    def message(self) -> AgentMessage | None:
        """The payload parsed as a message, or ``None`` if it is not one."""
        try:
            return AgentMessage.model_validate_json(self.payload) if self.payload else None
        except ValidationError:
            return None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the message parsed, else the payload as text)."""
        message = self.message
        return {
            "agent_id": self.agent_id,
            "entry_id": self.entry_id,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "source_id": self.source_id,
            "message": message.model_dump(mode="json") if message else None,
            "payload": None if message else _text(self.payload),
            "raw": self.raw,
        }


def _parse(agent_id: str, entry: list[Any]) -> DeadLetter:
    entry_id, flat = entry[0], entry[1] or []
    items = iter(flat)
    fields: dict[bytes, bytes] = dict(zip(items, items, strict=False))
    raw = fields.get(b"raw")
    try:
        deliveries = int(fields.get(b"deliveries", b"0"))
    except ValueError:
        deliveries = 0
    return DeadLetter(
        agent_id=agent_id,
        entry_id=_text(entry_id),
        reason=_text(fields.get(b"reason")),
        deliveries=deliveries,
        source_id=_text(fields.get(b"source_id")),
        payload=fields.get(b"payload", b""),
        raw=_text(raw) if raw is not None else None,
    )


async def move_to_dead_letters(
    pipeliner: Commands,
    agent_id: str,
    stream: str,
    entry_id: str,
    reason: str,
    deliveries: int,
    *,
    consumer: str,
    claim_idle_ms: int | None,
    record: tuple[int, int, int] | None = None,
) -> tuple[bytes, bool] | None:
    """Move one inbox entry to ``agent_id``'s dead letters (one script; safe to repeat).

    With ``claim_idle_ms``, the entry is claimed first (only if idle that long), so of two
    instances only one moves an abandoned entry. Returns the entry's body and whether this
    call moved it (``False``: it was moved already, by a repeat of this call after a lost
    connection or by another instance: its dead letter was found), or ``None`` if there was
    nothing to move (another instance holds the entry). With ``record`` (the record's size, its
    TTL ms, when the entry was delivered in server ms or 0), the move is also recorded.
    """
    script_keys = [stream, keys.dead_letters(agent_id)]
    args: list[Any] = [
        keys.GROUP,
        entry_id,
        reason,
        deliveries,
        consumer,
        "" if claim_idle_ms is None else claim_idle_ms,
    ]
    if record is not None:
        script_keys.append(keys.record(agent_id))
        size, ttl_ms, delivered_ms = record
        args += [size, ttl_ms, delivered_ms or ""]
    result = await pipeliner.script(DEAD_LETTER, script_keys, args, replay=True)
    if result is None:
        return None
    pipeliner.fire("SADD", keys.DEAD_LETTER_INDEX, agent_id, replay=True)
    moved = result[2] == b"moved"
    if moved:
        logger.warning("dead-lettered %s from %s after %d deliveries: %s", entry_id, stream, deliveries, reason)
    body = result[1]
    return (body if isinstance(body, bytes) else str(body).encode()), moved


async def dead_letter_agents(pipeliner: Commands) -> list[str]:
    """Agent ids that have dead letters."""
    members = await pipeliner.call("SMEMBERS", keys.DEAD_LETTER_INDEX, replay=True)
    return sorted(_text(m) for m in members or ())


async def count_dead_letters(pipeliner: Commands, agent_id: str) -> int:
    """How many dead letters ``agent_id`` has."""
    return int(await pipeliner.call("XLEN", keys.dead_letters(agent_id), replay=True))


async def list_dead_letters(
    pipeliner: Commands, agent_id: str, *, count: int = 100, after: str | None = None
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``agent_id`` (those after entry id ``after``, if given).

    Raises:
        MessageValidationError: ``after`` is not an entry id.
    """
    if after and not _is_entry_id(after):
        raise MessageValidationError(f"'after' must be a dead letter's entry id such as 1700000000000-0, not {after!r}")
    start = f"({after}" if after else "-"
    found = await pipeliner.call("XRANGE", keys.dead_letters(agent_id), start, "+", "COUNT", count, replay=True)
    return [_parse(agent_id, entry) for entry in found or ()]


async def get_dead_letter(pipeliner: Commands, agent_id: str, entry_id: str) -> DeadLetter:
    """One dead letter.

    Raises:
        DeadLetterNotFoundError: there is no such entry (or the id is not an entry id).
    """
    if not _is_entry_id(entry_id):
        raise DeadLetterNotFoundError(agent_id=agent_id, entry_id=entry_id)
    found = await pipeliner.call("XRANGE", keys.dead_letters(agent_id), entry_id, entry_id, replay=True)
    if not found:
        raise DeadLetterNotFoundError(agent_id=agent_id, entry_id=entry_id)
    return _parse(agent_id, found[0])


def _is_entry_id(value: str) -> bool:
    """Whether ``value`` is a stream entry id Redis accepts: ``<ms>-<seq>``, both below 2**64."""
    ms, _, seq = value.partition("-")
    if not (value.isascii() and ms.isdigit() and seq.isdigit() and len(value) <= 41):
        return False
    return int(ms) < 2**64 and int(seq) < 2**64


async def redrive_dead_letter(
    pipeliner: Commands,
    agent_id: str,
    entry_id: str,
    *,
    max_inbox_length: int,
    reauthorize: Callable[[bytes], bytes | None] | None = None,
) -> tuple[AgentMessage, str]:
    """Move a dead letter back into the inbox of its priority, atomically; returns the message and its new entry id.

    The dedup window is not consulted: the message was accepted once already. With security
    on, ``reauthorize`` gives the message a fresh token (an admin's), so that it is not
    refused as a replay.

    Raises:
        DeadLetterNotFoundError: there is no such dead letter (or it was redriven or purged meanwhile).
        AgentCommsError: it is not a valid message (purge it instead).
        InboxFullError: the inbox is full.
    """
    letter = await get_dead_letter(pipeliner, agent_id, entry_id)
    message = letter.message
    if message is None:
        raise AgentCommsError(f"dead letter {entry_id} is not a valid message ({letter.reason}); purge it instead")
    result = await pipeliner.script(
        REDRIVE,
        [
            keys.dead_letters(agent_id),
            keys.inbox(agent_id, message.payload.priority),
            keys.redrive_receipt(agent_id, entry_id),
        ],
        [entry_id, max_inbox_length, _RECEIPT_TTL_MS, (reauthorize(letter.payload) if reauthorize else None) or b""],
        replay=True,  # a repeat finds the receipt and answers where the message went
    )
    if result is None:
        raise DeadLetterNotFoundError(agent_id=agent_id, entry_id=entry_id)
    status = _text(result[0])
    if status == "full":
        raise InboxFullError(agent_id=agent_id, length=int(result[1]), limit=max_inbox_length)
    if status != "ok":
        raise AgentCommsError(f"dead letter {entry_id} has no message to send back; purge it instead")
    return message, _text(result[1])


async def purge_dead_letters(pipeliner: Commands, agent_id: str) -> int:
    """Delete all of ``agent_id``'s dead letters; returns how many there were.

    Raises:
        CommandOutcomeUnknownError: the connection was lost while purging: count them again.
    """
    with pipeliner.batch():
        # not repeated after a lost connection: a repeat would report 0 purged
        count = pipeliner.script(PURGE, [keys.dead_letters(agent_id)], [], replay=False)
        removed = pipeliner.call("SREM", keys.DEAD_LETTER_INDEX, agent_id, replay=True)
    number, _ = await asyncio.gather(count, removed)
    return int(number)
