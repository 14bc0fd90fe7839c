"""Every Redis key and channel agentcomms uses, built in one place.

The part in braces is a Redis Cluster hash tag: all keys of one agent id live in one
slot, so the scripts that touch an inbox, its dedup markers and its dead letters
together stay valid on a cluster.
"""

from __future__ import annotations

import re
import urllib.parse

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


ROLE_PREFIX = "@"
"""A recipient starting with it is a role's address: never an agent id (an agent id cannot start with ``@``)."""


def _encoded(name: str) -> str:
    """``name`` case-folded and %-encoded, ``~`` too (``@~`` starts a capability's address)."""
    return urllib.parse.quote(name.strip().casefold(), safe="").replace("~", "%7E")


def role_address(role: str) -> str:
    """The recipient that is whichever online agent of ``role`` is free: ``@`` and the role, case-folded, %-encoded.

    Every agent of the role reads this address's inbox in one consumer group, so each message is
    taken once, by a free one (``AGENTCOMMS_ROLE_ROUTING``).
    """
    return ROLE_PREFIX + _encoded(role)


CAPABILITY_PREFIX = "@~"
"""A capability's address starts with it (a role's never does: its ``~`` is encoded)."""


def capability_address(capability: str) -> str:
    """The recipient that is whichever online agent with ``capability`` is free: ``@~`` and the capability.

    Every agent with the capability reads this address's inbox too, as it reads its role's.
    """
    return CAPABILITY_PREFIX + _encoded(capability)


def is_role_address(recipient: str) -> bool:
    """Whether ``recipient`` is a role's or a capability's address (see :func:`role_address`)."""
    return recipient.startswith(ROLE_PREFIX)


def inbox(agent_id: str, priority: Priority | str = Priority.NORMAL) -> str:
    """Stream of messages for ``agent_id`` at one priority (one stream per priority, read high first)."""
    return f"{PREFIX}:{{{agent_id}}}:inbox:{priority}"


def inboxes(agent_id: str) -> list[str]:
    """The inbox streams of ``agent_id`` in read order."""
    return [inbox(agent_id, p) for p in PRIORITIES]


def dedup(agent_id: str) -> str:
    """Sorted set of the message ids accepted into ``agent_id``'s inboxes within the dedup window (score: ms)."""
    return f"{PREFIX}:{{{agent_id}}}:seen"


def dead_letters(agent_id: str) -> str:
    """Stream of ``agent_id``'s dead letters: never trimmed, so nothing disappears silently."""
    return f"{PREFIX}:{{{agent_id}}}:dead"


def redrive_receipt(agent_id: str, dead_letter_id: str) -> str:
    """String key: the new entry id of a redriven dead letter, kept a while so a repeated redrive says where it went."""
    return f"{PREFIX}:{{{agent_id}}}:redriven:{dead_letter_id}"


RECORD_INDEX = f"{PREFIX}:record:index"
"""Set of agent ids that have a record (added by their subscription when it starts), so tools need no SCAN."""


def record(agent_id: str) -> str:
    """Stream of the messages ``agent_id`` handled or dead-lettered, each with its reply and times (the record)."""
    return f"{PREFIX}:{{{agent_id}}}:record"


REPLY_PREFIX = f"{PREFIX}:{{reply."


def replies(client_id: str) -> str:
    """Reply stream of one caller (one per broker instance); it expires when the caller is gone."""
    return f"{REPLY_PREFIX}{client_id}}}:replies"


_REPLY_STREAM = re.compile(r"ac:\{reply\.[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,159}\}:replies")


def is_reply_stream(key: str) -> bool:
    """Whether ``key`` names a reply stream: ``ac:{reply.<client id>}:replies``, the id made of ``A-Za-z0-9_.:@-``.

    Responders write nowhere else, whatever a message's ``reply_to`` says.
    """
    return _REPLY_STREAM.fullmatch(key) is not None


def is_reply_stream_of(key: str, sender_id: str) -> bool:
    """Whether reply stream ``key`` belongs to ``sender_id``: its client id is ``<sender id>.<suffix>``.

    With security on, a request's reply may only go to a stream of its (verified) sender.
    """
    return key.startswith(f"{REPLY_PREFIX}{sender_id}.")


# -- registry: every key shares the {registry} hash tag, so each registry script touches one slot --

REGISTRY = f"{PREFIX}:{{registry}}"
"""Prefix of the registry's keys (the Lua scripts build per-agent and index keys from it)."""

REGISTRY_AGENTS = f"{REGISTRY}:agents"
"""Hash: agent id -> AgentInfo JSON (the registered, static part)."""

REGISTRY_INDEXES = f"{REGISTRY}:indexes"
"""Hash: agent id -> JSON list of the index sets it is in, so re-registration can leave the old ones."""

REGISTRY_DEADLINES = f"{REGISTRY}:deadlines"
"""Sorted set: agent id -> online-until (Redis server ms); online means score > now."""

REGISTRY_SEEN = f"{REGISTRY}:seen"
"""Hash: agent id -> last heartbeat (Redis server ms)."""

REGISTRY_INSTANCE_COUNT = f"{REGISTRY}:instcount"
"""Hash: agent id -> live instances at its last heartbeat."""

REGISTRY_STATUS = f"{REGISTRY}:status"
"""Hash: agent id -> status set by the agent (online / busy) while it is alive."""


def registry_instances(agent_id: str) -> str:
    """Sorted set of one agent id's instances: instance id -> online-until (server ms)."""
    return f"{REGISTRY}:inst:{agent_id}"


def registry_index(kind: str, value: str) -> str:
    """Set of agent ids with ``kind`` (role, department, capability, intent) equal to ``value`` (case-folded)."""
    return f"{REGISTRY}:idx:{kind}:{value.strip().casefold()}"


# -- trust store: identities enrolled by an admin (docs/security.md) --

TRUST_IDENTITIES = f"{PREFIX}:{{trust}}:identities"
"""Hash: identity id -> its trust record (public keys, roles, admin flag), signed by an admin's Ed25519 key."""
