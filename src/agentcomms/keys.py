"""Every Redis key and channel agentcomms uses, built in one place.

The part in braces is a Redis Cluster hash tag: all keys of one agent id live in one
slot, so the scripts that touch an inbox, its dedup markers and its dead letters
together stay valid on a cluster.
"""

from __future__ import annotations

from agentcomms.schemas import Priority

PREFIX = "ac"

GROUP = "agents"
"""Consumer group on every inbox stream: all instances of one agent id share it, so each message reaches one."""

EVENTS_CHANNEL = f"{PREFIX}:events"
"""Pub/Sub channel of message events (sent, handled, dead-lettered): lossy, for monitoring only."""

DEAD_LETTER_INDEX = f"{PREFIX}:dead:index"
"""Set of agent ids that have dead letters, so tools can list them without SCAN."""

PRIORITIES: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)
"""Read order of the inbox streams."""


def inbox(agent_id: str, priority: Priority | str = Priority.NORMAL) -> str:
    """Stream of messages for ``agent_id`` at one priority (one stream per priority, read high first)."""
    return f"{PREFIX}:{{{agent_id}}}:inbox:{priority}"


def inboxes(agent_id: str) -> list[str]:
    """The inbox streams of ``agent_id`` in read order."""
    return [inbox(agent_id, p) for p in PRIORITIES]


def dedup(agent_id: str, message_id: str) -> str:
    """Marker of a message id already accepted into ``agent_id``'s inbox; expires after the dedup window."""
    return f"{PREFIX}:{{{agent_id}}}:seen:{message_id}"


def dead_letters(agent_id: str) -> str:
    """Stream of ``agent_id``'s dead letters: never trimmed, so nothing disappears silently."""
    return f"{PREFIX}:{{{agent_id}}}:dead"


REPLY_PREFIX = f"{PREFIX}:{{reply."


def replies(client_id: str) -> str:
    """Reply stream of one caller (one per broker instance); it expires when the caller is gone."""
    return f"{REPLY_PREFIX}{client_id}}}:replies"


def is_reply_stream(key: str) -> bool:
    """Whether ``key`` names a reply stream; responders write nowhere else, whatever ``reply_to`` says."""
    return key.startswith(REPLY_PREFIX) and key.endswith("}:replies") and key.count("}") == 1
