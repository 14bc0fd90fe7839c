"""Exceptions raised by agentcomms.

Every error the library raises on purpose derives from :class:`AgentCommsError`, so a
caller can catch the whole family with one ``except``. Each subclass carries its
context as attributes and reads well as a one-line message.
"""

from __future__ import annotations


class AgentCommsError(Exception):
    """Root of every error agentcomms raises on purpose."""


class ConfigError(AgentCommsError, ValueError):
    """Raised when settings or a configuration file are missing or invalid."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class MessageValidationError(AgentCommsError, ValueError):
    """Raised when a message does not satisfy the schema or the broker's limits."""


class MessageTooLargeError(MessageValidationError):
    """Raised when a serialised message exceeds ``max_message_bytes``."""

    def __init__(self, *, size: int, limit: int, message_id: str | None = None) -> None:
        self.size = size
        self.limit = limit
        self.message_id = message_id
        super().__init__(
            f"message {message_id or ''} is {size} bytes, over the limit of {limit} bytes".replace("  ", " ")
        )


class InboxFullError(AgentCommsError):
    """Raised when a recipient's inbox holds ``max_inbox_length`` unprocessed messages.

    Nothing is trimmed to make room: the sender decides whether to retry later.
    """

    def __init__(self, *, agent_id: str, length: int, limit: int) -> None:
        self.agent_id = agent_id
        self.length = length
        self.limit = limit
        super().__init__(f"inbox of {agent_id!r} is full ({length} messages waiting, limit {limit}); retry later")


class NotDurableError(AgentCommsError):
    """Raised by a durable send (``AGENTCOMMS_DURABLE_REPLICAS``) that fewer replicas confirmed than asked.

    The message is stored on the primary and may still reach the replicas; a failover now could
    lose it. Sending it again (the same ``message_id``) is safe: a repeat is a duplicate.
    """

    def __init__(self, *, message_id: str, confirmed: int, required: int, timeout: float) -> None:
        self.message_id = message_id
        self.confirmed = confirmed
        self.required = required
        super().__init__(
            f"message {message_id} is stored on the primary but {confirmed} of {required} replicas confirmed it "
            f"within {timeout:g}s: a failover now could lose it; sending it again is safe (it is deduplicated)"
        )


class RequestTimeoutError(AgentCommsError, TimeoutError):
    """Raised when no reply to a request arrived within its timeout."""

    def __init__(self, *, agent_id: str, message_id: str, timeout: float) -> None:
        self.agent_id = agent_id
        self.message_id = message_id
        self.timeout = timeout
        super().__init__(f"no reply from {agent_id!r} to message {message_id} within {timeout:.3g}s")


class BrokerConnectionError(AgentCommsError, ConnectionError):
    """Raised when Redis stayed unreachable for longer than ``reconnect_timeout``."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        self.url = url
        super().__init__(f"{message} ({url})" if url else message)


class CommandOutcomeUnknownError(BrokerConnectionError):
    """Raised when the connection was lost after a command that is not safe to repeat was sent.

    Redis may or may not have run it; agentcomms does not send it again.
    """


class RedisCommandError(AgentCommsError):
    """Raised when Redis refuses a command with an error that retrying will not fix (``WRONGTYPE``, ``ERR`` ...).

    ``code`` is the error's first word; ``command`` the command's name (its arguments are never shown).
    """

    def __init__(self, message: str, *, code: str, command: str) -> None:
        self.code = code
        self.command = command
        super().__init__(message)


class RedisOutOfMemoryError(RedisCommandError):
    """Raised when Redis has reached ``maxmemory`` and refuses writes (``OOM``): nothing was stored."""


class RedisPermissionError(RedisCommandError, PermissionError):
    """Raised when Redis refuses a command or the credentials (``NOPERM``, ``NOAUTH``, ``WRONGPASS``)."""


class BrokerClosedError(AgentCommsError, RuntimeError):
    """Raised when a broker is used before ``connect()`` or after ``close()``."""


class EmbeddedRedisError(AgentCommsError, RuntimeError):
    """Raised when the embedded redis-server cannot be found, started or stopped."""


class RegistrationError(AgentCommsError, ValueError):
    """Raised when an agent's registration data is invalid."""

    def __init__(self, message: str, *, agent_id: str | None = None) -> None:
        self.agent_id = agent_id
        super().__init__(
            f"cannot register {agent_id!r}: {message}" if agent_id else f"cannot register agent: {message}"
        )


class RegistrationConflictError(RegistrationError):
    """Raised when an agent id is registered again with another role without ``replace=True``."""

    def __init__(self, *, agent_id: str, existing_role: str, role: str) -> None:
        self.existing_role = existing_role
        self.role = role
        super().__init__(
            f"it is registered with role {existing_role!r}, not {role!r}; pass replace=True to replace it",
            agent_id=agent_id,
        )


class AgentNotFoundError(AgentCommsError, LookupError):
    """Raised when an agent id is not registered."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"agent {agent_id!r} is not registered")


class DeadLetterNotFoundError(AgentCommsError, LookupError):
    """Raised when a dead letter asked for by entry id does not exist (any more)."""

    def __init__(self, *, agent_id: str, entry_id: str) -> None:
        self.agent_id = agent_id
        self.entry_id = entry_id
        super().__init__(f"no dead letter {entry_id} for {agent_id!r}")


class NoAgentAvailableError(AgentCommsError, LookupError):
    """Raised when a message is addressed by role (or capability) and no agent of that role is online."""

    def __init__(self, role: str, *, department: str | None = None, capability: str | None = None) -> None:
        self.role = role
        self.department = department
        self.capability = capability
        what = [f"role {role!r}"] if role else []
        what += [f"capability {capability!r}"] if capability else []
        where = f" in department {department!r}" if department else ""
        super().__init__(f"no agent with {' and '.join(what) or 'any role'}{where} is online")


class HandlerError(AgentCommsError):
    """Raise in an intent handler to answer with an error reply of your own ``code``."""

    def __init__(self, code: str, message: str = "") -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}" if message else code)


class KnowledgeError(AgentCommsError):
    """Raised when the knowledge memory cannot do what was asked (the message says why)."""


class KnowledgeNotConfiguredError(KnowledgeError, RuntimeError):
    """Raised when knowledge search cannot run here.

    The ``knowledge`` extra is missing, the model files are damaged, or no knowledge service answers.
    """


class KnowledgeStoreBusyError(KnowledgeError):
    """Raised when another process owns the embedded knowledge store (ask the knowledge service instead)."""

    def __init__(self, path: str, owner: str = "") -> None:
        self.path = path
        self.owner = owner
        who = f" (process {owner})" if owner else ""
        super().__init__(
            f"the knowledge store {path} is open in another process{who}: only one process may own it; "
            "others ask the knowledge service (agentcomms knowledge serve)"
        )


class KnowledgeQueryError(KnowledgeError, ValueError):
    """Raised for a search that cannot be run as asked: an empty query, an unknown filter, a bad limit."""


class SecurityError(AgentCommsError):
    """Raised when identities, keys, the trust store or a security policy cannot be used as asked."""


class IdentityError(SecurityError, ValueError):
    """Raised when an identity file is missing, unreadable or invalid, or no identity is held for a sender id."""


class TrustError(SecurityError):
    """Raised when an identity is not in the trust store, or its record is not signed by a trusted admin."""


class PermissionDeniedError(SecurityError, PermissionError):
    """Raised when an identity may not do what it asked (register another agent's id, change a role ...)."""
