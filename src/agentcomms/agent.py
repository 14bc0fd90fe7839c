"""BaseAgent: the class an agent author subclasses to put a twin on the network.

Write ``async def handle_<intent>(self, message)`` methods (``handle_assign_task``,
``handle_request_knowledge`` ...). For a request, the return value becomes the reply's
``data``; raise :class:`HandlerError` for an error reply with your own code. Any other
exception becomes an error reply with code ``handler_error``; for a one-way message it
is re-raised instead, so the broker delivers it again and, in the end, dead-letters it
with the error rather than dropping it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import ValidationError

from agentcomms import _signals, keys
from agentcomms.broker import MessageBroker, PublishResult
from agentcomms.exceptions import (
    AgentCommsError,
    ConfigError,
    HandlerError,
    KnowledgeError,
    KnowledgeQueryError,
    MessageValidationError,
)
from agentcomms.knowledge.interface import AgentMemoryInterface, KnowledgeResult
from agentcomms.registry import AgentRegistry, Presence
from agentcomms.schemas import AgentInfo, AgentMessage, AgentResponse, MessageIntent, Priority, describe_errors
from agentcomms.sender import MessageSender
from agentcomms.settings import AgentConfig, Settings
from agentcomms.subscription import Subscription

__all__ = ["BaseAgent", "HandlerObserver"]

logger = logging.getLogger(__name__)

BUILT_IN_INTENTS = (MessageIntent.HEALTH_CHECK, MessageIntent.CAPABILITY_QUERY, MessageIntent.AGENT_STATUS)
"""Answered by every agent: a handler method of the same name overrides the default answer."""


HandlerObserver = Callable[[str, float, str], None]
"""Told of each message an agent handled: ``(intent, seconds, outcome)``, outcome ``ok``, ``error`` (an error
reply) or ``raised``; set as :attr:`BaseAgent.handler_observer` (``serve_agent_metrics`` does)."""


def _handler_name(intent: str) -> str:
    return "handle_" + re.sub(r"[^a-z0-9_]", "_", intent)


class BaseAgent:
    """An agent on the network: registered, heart-beating, answering the intents it has handlers for.

    Subclass it and add ``handle_<intent>`` methods; on its own it answers only the
    built-in HEALTH_CHECK, CAPABILITY_QUERY and AGENT_STATUS.

    A program that never calls :meth:`shutdown` still leaves cleanly: when ``asyncio.run``
    ends (a return, Ctrl-C) the agent leaves the registry, and on SIGTERM, unless the
    program handles that signal itself, every agent shuts down and the process exits 143.

    Args:
        config: the agent's id, user name, role, department and capabilities
            (an :class:`AgentConfig` or a dict in the seed's config format).
        broker: share a connected broker (several agents in one process); by default
            the agent makes its own from ``redis_url`` / ``config.redis_url`` / settings.
        settings: defaults for heartbeat interval, timeouts and limits.
        redis_url: where Redis is, if not in the config or the environment.
        concurrency: messages handled at once (default ``AGENTCOMMS_CONCURRENCY``).
        heartbeat_interval: seconds between heartbeats (default ``HEARTBEAT_INTERVAL``).
        version: reported in the registry.
    """

    def __init__(
        self,
        config: AgentConfig | Mapping[str, Any],
        *,
        broker: MessageBroker | None = None,
        settings: Settings | None = None,
        redis_url: str | None = None,
        concurrency: int | None = None,
        heartbeat_interval: float | None = None,
        version: str = "1.0.0",
    ) -> None:
        try:
            self.config = config if isinstance(config, AgentConfig) else AgentConfig.model_validate(config)
        except ValidationError as exc:
            problems = describe_errors(exc)
            raise ConfigError(f"invalid agent config: {problems}") from exc
        self.agent_id = self.config.agent_id
        self._owns_broker = broker is None
        self.broker = broker or MessageBroker(
            redis_url or self.config.redis_url, settings=settings, client_name=self.agent_id
        )
        self.settings = self.broker.settings
        self.registry = AgentRegistry(self.broker)
        self.sender = MessageSender(sender_id=self.agent_id, broker=self.broker, registry=self.registry)
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval or self.settings.heartbeat_interval
        self.version = version
        self._subscription: Subscription | None = None
        self._presence: Presence | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._memory: AgentMemoryInterface | None = None
        self._owns_memory = True
        self.handler_observer: HandlerObserver | None = None
        """Called after each message with its handling time (``None``, the default: nothing is timed)."""

    # -- what the agent offers: override these ---------------------------------------------

    def handler_for(self, intent: str) -> Callable[[AgentMessage], Awaitable[Any]] | None:
        """The coroutine that handles ``intent``: by default the method ``handle_<intent>``, if any."""
        handler = getattr(self, _handler_name(intent), None)
        return handler if callable(handler) else None

    async def get_supported_intents(self) -> list[MessageIntent | str]:
        """Intents this agent handles, registered for discovery: by default every intent it has a handler for.

        Handlers of custom intents count too (``handle_review_budget`` → ``review_budget``).
        """
        found: list[MessageIntent | str] = [i for i in MessageIntent if self.handler_for(i.value) is not None]
        for name in dir(type(self)):
            if name.startswith("handle_") and callable(getattr(self, name, None)):
                intent = name.removeprefix("handle_")
                if intent not in found and re.fullmatch(r"[a-z][a-z0-9_]*", intent):
                    found.append(intent)
        return found

    async def get_agent_capabilities(self) -> list[str]:
        """Capabilities to register; by default those of the config."""
        return list(self.config.capabilities)

    async def health_status(self) -> dict[str, Any]:
        """The answer to HEALTH_CHECK; extend it with your own checks."""
        stats = self._subscription.stats if self._subscription else None
        return {
            "agent_id": self.agent_id,
            "status": "healthy" if self.running else "stopped",
            "handled": stats.handled if stats else 0,
            "failed": stats.failed if stats else 0,
            "in_flight": self._subscription.in_flight if self._subscription else 0,
        }

    async def agent_status(self, message: AgentMessage) -> dict[str, Any] | None:
        """The default answer to AGENT_STATUS: the health status; a one-way status message is noted in the log.

        Define ``handle_agent_status`` to answer with your own.
        """
        if message.reply_to is None:
            logger.info("%s: status message from %s: %s", self.agent_id, message.sender_id, message.payload.data)
            return None
        return {**await self.health_status(), "role": self.config.role, "department": self.config.department}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the agent is taking messages."""
        return self._subscription is not None and self._subscription.running

    def _role_addresses(self) -> list[str]:
        """Its role's and capabilities' addresses, whose inboxes it reads too (unless security is on, or off)."""
        if not self.settings.role_routing or self.broker.security is not None:
            return []
        addresses = [keys.role_address(self.config.role)]
        addresses += [keys.capability_address(c) for c in self.config.capabilities]
        addresses = list(dict.fromkeys(addresses))
        self.sender.own_roles.update(addresses)
        return addresses

    @property
    def registered(self) -> bool:
        """Whether the agent is registered and its heartbeat goes through."""
        presence = self._presence
        return presence is not None and presence.running and presence.healthy

    @property
    def reading(self) -> bool:
        """Whether the agent's subscription runs and its last read of the inbox went through."""
        subscription = self._subscription
        return subscription is not None and subscription.running and subscription.reading

    @property
    def ready(self) -> bool:
        """Whether the agent is registered and reading its inbox (what a readiness probe asks)."""
        return self.registered and self.reading

    @property
    def subscription(self) -> Subscription | None:
        """The subscription taking this agent's messages (its ``stats``, ``in_flight``); ``None`` when stopped."""
        return self._subscription

    async def info(self) -> AgentInfo:
        """The record this agent registers.

        Raises:
            ConfigError: what :meth:`get_agent_capabilities` or :meth:`get_supported_intents` returned is not valid.
        """
        intents = list(dict.fromkeys([*map(str, await self.get_supported_intents()), *BUILT_IN_INTENTS]))
        try:
            return AgentInfo(
                agent_id=self.agent_id,
                user_name=self.config.user_name,
                role=self.config.role,
                department=self.config.department,
                capabilities=await self.get_agent_capabilities(),
                supported_intents=intents,
                version=self.version,
            )
        except ValidationError as exc:
            raise ConfigError(f"{self.agent_id}: invalid agent record: {describe_errors(exc)}") from None

    async def initialize(self) -> Self:
        """Connect, start taking messages, register and start heart-beating.

        Raises:
            BrokerConnectionError: Redis is unreachable.
            RegistrationConflictError: the id is registered with another role.
        """
        if self._subscription is not None:
            return self
        self._stopping = None
        await self.broker.connect()
        try:
            info = await self.info()
            # register first: a refused registration (another role holds the id) must not consume its messages
            self._presence = await self.registry.keep_alive(
                info, instance_id=self.broker.client_id, heartbeat_interval=self.heartbeat_interval
            )
            self._subscription = await self.broker.subscribe_to_agent(
                self.agent_id, self._receive, concurrency=self.concurrency, role=self.config.role,
                addresses=self._role_addresses(),
            )  # fmt: skip
        except BaseException:
            await self.shutdown()
            raise
        _signals.watch(self)
        logger.info("agent %s (%s, %s) is online", self.agent_id, self.config.role, self.config.department)
        return self

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop gracefully: leave, finish what is in hand, disconnect. Safe to call twice, or concurrently.

        Leaving the registry first marks the agent offline at once, so no new work is
        routed here by role; messages in hand get ``timeout`` s (default
        ``AGENTCOMMS_SHUTDOWN_TIMEOUT``) to finish; unfinished ones are handed back to
        other instances after ``claim_idle``.
        """
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            if self._presence is not None:
                await self._presence.stop()
                self._presence = None
            if self._subscription is not None:
                await self._subscription.stop(self.settings.shutdown_timeout if timeout is None else timeout)
                self._subscription = None
            if self._memory is not None and self._owns_memory:
                await self._memory.close()
            if self._owns_broker:
                await self.broker.close()
        finally:
            _signals.unwatch(self)
            self._stopping.set_result(None)
        logger.info("agent %s stopped", self.agent_id)

    async def __aenter__(self) -> Self:
        return await self.initialize()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    # -- receiving -------------------------------------------------------------------------

    def _receive(self, message: AgentMessage) -> Awaitable[Any]:
        observer = self.handler_observer
        return self._on_message(message) if observer is None else self._timed(message, observer)

    async def _timed(self, message: AgentMessage, observer: HandlerObserver) -> Any:
        started = time.perf_counter()
        outcome = "raised"
        try:
            result = await self._on_message(message)
            outcome = "error" if isinstance(result, AgentResponse) and not result.success else "ok"
            return result
        finally:
            try:
                observer(str(message.intent), time.perf_counter() - started, outcome)
            except Exception:
                logger.exception("%s: the handler observer failed", self.agent_id)

    async def _on_message(self, message: AgentMessage) -> Any:
        intent = str(message.intent)
        if intent == MessageIntent.HEALTH_CHECK:
            return await self.health_status()
        if intent == MessageIntent.CAPABILITY_QUERY:
            return (await self.info()).model_dump(mode="json", exclude={"status", "started_at", "last_seen"})
        handler = self.handler_for(intent)
        if handler is None and intent == MessageIntent.AGENT_STATUS:
            handler = self.agent_status
        if handler is None and intent == MessageIntent.REQUEST_KNOWLEDGE and message.reply_to is not None:
            handler = self.answer_from_knowledge
        if handler is None:
            logger.warning("%s has no handler for intent %r (from %s)", self.agent_id, intent, message.sender_id)
            return AgentResponse.fail("unsupported_intent", f"{self.agent_id} does not handle {intent!r}")
        try:
            return await handler(message)
        except HandlerError as exc:
            return AgentResponse.fail(exc.code, exc.message)
        except Exception as exc:
            if message.reply_to is None:
                raise  # a one-way message: delivered again, then dead-lettered with this error
            logger.exception("%s: handler for %r failed on %s", self.agent_id, intent, message.message_id)
            return AgentResponse.fail("handler_error", f"{type(exc).__name__}: {exc}")

    # -- sending: through this agent's own MessageSender ---------------------------------------

    async def send_message(
        self,
        message_or_recipient: AgentMessage | str,
        intent: MessageIntent | str | None = None,
        data: Mapping[str, Any] | None = None,
        *,
        priority: Priority | str = Priority.NORMAL,
        context: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
        seal: bool | None = None,
    ) -> PublishResult:
        """Send a one-way message: an :class:`AgentMessage`, or a recipient id with intent and data.

        With security on, ``seal=True`` encrypts the payload to the recipient (``None``: when
        its intent is one of ``AGENTCOMMS_SEALED_INTENTS``).

        Raises:
            AgentNotFoundError: the recipient was never registered (see :meth:`MessageSender.send_message`).
        """
        if isinstance(message_or_recipient, AgentMessage):
            return await self.sender.publish_message(message_or_recipient, seal=seal)
        if intent is None:
            raise MessageValidationError("send_message(recipient_id, ...) needs an intent")
        return await self.sender.send_message(
            message_or_recipient, intent, data, priority=priority, context=context, conversation_id=conversation_id,
            seal=seal,
        )  # fmt: skip

    async def request(
        self,
        recipient_id: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        context: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
        seal: bool | None = None,
    ) -> AgentResponse:
        """Send a request and wait for its reply (``seal``: see :meth:`send_message`).

        Raises:
            RequestTimeoutError: no reply within ``timeout`` (default ``MESSAGE_TIMEOUT``).
        """
        return await self.sender.request(
            recipient_id, intent, data, timeout=timeout, priority=priority, context=context,
            conversation_id=conversation_id, seal=seal,
        )  # fmt: skip

    async def request_role(
        self,
        role: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        department: str | None = None,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
        seal: bool | None = None,
    ) -> AgentResponse:
        """Ask an online agent with ``role`` (never this one) and wait for its reply.

        Raises:
            NoAgentAvailableError: no agent with that role is online.
            RequestTimeoutError: no reply in time.
        """
        return await self.sender.request_role(
            role, intent, data, department=department, timeout=timeout, context=context, seal=seal
        )

    async def request_capability(
        self,
        capability: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
        seal: bool | None = None,
    ) -> AgentResponse:
        """Ask an online agent with ``capability`` (never this one) and wait for its reply.

        Raises:
            NoAgentAvailableError: no agent with that capability is online.
            RequestTimeoutError: no reply in time.
        """
        return await self.sender.request_capability(
            capability, intent, data, timeout=timeout, context=context, seal=seal
        )

    async def discover_agents(self, **filters: Any) -> list[AgentInfo]:
        """Agents matching ``filters`` (``role``, ``department``, ``capability``, ``intent``, ``online_only``)."""
        return await self.sender.discover_agents(**filters)

    async def broadcast_message(
        self, intent: MessageIntent | str, data: Mapping[str, Any] | None = None, **filters: Any
    ) -> dict[str, PublishResult | AgentCommsError]:
        """Send one message to every agent matching ``filters`` except this one (see MessageSender)."""
        return await self.sender.broadcast_message(intent, data, **filters)

    # -- knowledge ---------------------------------------------------------------------------

    @property
    def memory(self) -> AgentMemoryInterface:
        """This agent's knowledge memory, used as this agent with this agent's role.

        By default it asks the knowledge service (or uses the Qdrant server of ``VECTOR_STORE_URL`` directly).
        """
        if self._memory is None:
            mode: Literal["owner", "client"] = "owner" if self.settings.vector_store_url else "client"
            self._memory = AgentMemoryInterface(self.settings, broker=self.broker, mode=mode, sender_id=self.agent_id)
        return self._memory

    async def search_knowledge(self, query: str, **options: Any) -> list[KnowledgeResult]:
        """Search the knowledge this agent's role may read.

        ``filters``, ``limit``, ``on_behalf_of``: see :meth:`AgentMemoryInterface.search_knowledge`.

        Raises:
            KnowledgeNotConfiguredError: no knowledge service answers (``agentcomms knowledge serve``),
                or the knowledge extra is not installed.
            KnowledgeQueryError: an empty query, an unknown filter.
        """
        memory = await self.memory.initialize()
        return await memory.search_knowledge(self.agent_id, self.config.role, query, **options)

    async def share_insight(self, insight: str, domains: list[str], *, title: str | None = None) -> str:
        """Store an insight in the knowledge memory under ``domains`` (ones this agent's role may read)."""
        memory = await self.memory.initialize()
        return await memory.share_insight(self.agent_id, self.config.role, insight, domains, title=title)

    async def _asker_roles(self, message: AgentMessage) -> list[str]:
        """The roles of whoever sent ``message``: verified (security on), else named in it, else registered."""
        if message.sender_roles is not None:
            return list(message.sender_roles)
        claimed = message.payload.data.get("role")
        if isinstance(claimed, str) and claimed.strip():
            return [claimed]
        try:
            return [(await self.registry.get_agent(message.sender_id)).role]
        except AgentCommsError:
            return []

    async def answer_from_knowledge(self, message: AgentMessage) -> dict[str, Any] | AgentResponse:
        """The default answer to REQUEST_KNOWLEDGE (when the agent has no ``handle_request_knowledge``).

        Searches ``data["query"]`` in what both this agent's role and the asker's roles may
        read, so an agent never passes on what the asker could not see itself.
        """
        data = message.payload.data
        query = data.get("query")
        if not isinstance(query, str) or not query.strip():
            return AgentResponse.fail("invalid_query", "REQUEST_KNOWLEDGE needs data['query']")
        asker = await self._asker_roles(message)
        if not asker:
            return {"query": query, "results": [], "note": "the asker's role is unknown: nothing may be shared"}
        limit = data.get("limit", 5)
        try:
            results = await self.search_knowledge(query, limit=limit, on_behalf_of=asker)
        except KnowledgeQueryError as exc:
            return AgentResponse.fail("invalid_query", str(exc))
        except KnowledgeError as exc:
            return AgentResponse.fail("knowledge_unavailable", str(exc))
        return {"query": query, "answered_by": self.agent_id, "results": [r.model_dump(mode="json") for r in results]}
