"""MessageSender: sending, asking, broadcasting and discovery for callers that are not agents.

Dashboards, orchestrators and scripts use it directly; every :class:`BaseAgent` has
one too (``agent.sender``) whose sender id is the agent's own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

from pydantic import ValidationError

from agentcomms import keys
from agentcomms.broker import MessageBroker, PublishResult
from agentcomms.exceptions import AgentCommsError, AgentNotFoundError, MessageValidationError, RequestTimeoutError
from agentcomms.registry import AgentRegistry
from agentcomms.schemas import (
    CURRENT_CONVERSATION,
    AgentInfo,
    AgentMessage,
    AgentResponse,
    MessageIntent,
    MessagePayload,
    Priority,
    describe_errors,
    new_id,
)
from agentcomms.security.identity import Identity
from agentcomms.settings import Settings

__all__ = ["MessageSender", "SenderStats"]

T = TypeVar("T")

_KNOWN_FOR = 30.0
_ROLE_ONLINE_FOR = 1.0
"""Seconds a role found online is taken as online by ``request_role`` (not asking the registry per request)."""
_STICKY_CONVERSATIONS = 10_000
"""Conversations whose answering agent ``request_role(sticky=True)`` remembers, the latest first."""
"""Seconds a recipient found in the registry is taken as known without asking again."""


@dataclass(slots=True)
class SenderStats:
    """What one sender has done since it started."""

    messages_sent: int = 0
    requests: int = 0
    replies: int = 0
    error_replies: int = 0
    timeouts: int = 0
    broadcasts: int = 0
    broadcast_recipients: int = 0
    failed_sends: int = 0
    total_reply_ms: float = 0.0

    @property
    def average_reply_ms(self) -> float:
        """Mean time from sending a request to its reply."""
        return self.total_reply_ms / self.replies if self.replies else 0.0


def _own_identity_id(settings: Settings) -> str | None:
    """With security on and an identity file set (``AGENTCOMMS_IDENTITY``): the id to send as."""
    if settings.security != "on" or settings.identity_file is None:
        return None
    return Identity.load(settings.identity_file).id


class MessageSender:
    """Send messages to agents, ask them and wait for answers, broadcast, and find agents.

    Messages go only to agent ids the registry knows (registered now, online or not): a
    request or message to an id it has never seen fails at once with
    :class:`AgentNotFoundError` instead of waiting out its timeout and leaving an inbox
    behind. ``allow_unregistered=True`` sends anyway (to an agent that will register
    later); such an inbox expires ``AGENTCOMMS_UNREGISTERED_INBOX_TTL`` after the last
    such send unless the agent starts reading it.

    Args:
        redis_url: where Redis is (default ``REDIS_URL``, else the embedded server).
        sender_id: the id replies and logs know this sender by (default: the identity of
            ``AGENTCOMMS_IDENTITY`` when security is on, else ``sender.<random>``). With
            security on it must be an identity this process holds.
        settings: timeouts and limits.
        broker: share a broker instead of making one (then the caller closes it).
        registry: share a registry (by default one on the same broker).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        sender_id: str | None = None,
        settings: Settings | None = None,
        broker: MessageBroker | None = None,
        registry: AgentRegistry | None = None,
    ) -> None:
        settings = broker.settings if broker is not None else settings or Settings()
        self.sender_id = sender_id or _own_identity_id(settings) or f"sender.{uuid.uuid4().hex[:8]}"
        self._owns_broker = broker is None
        self.broker = broker or MessageBroker(redis_url, settings=settings, client_name=self.sender_id)
        self.registry = registry or AgentRegistry(self.broker)
        self.stats = SenderStats()
        self._known: dict[str, float] = {}
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._role_online: dict[str, float] = {}
        self.own_roles: set[str] = set()
        """Addresses of roles this sender is an agent of: requests to them go to another agent, by id."""

    async def initialize(self) -> Self:
        """Connect to Redis.

        Raises:
            BrokerConnectionError: Redis is unreachable.
        """
        await self.broker.connect()
        return self

    async def close(self) -> None:
        """Disconnect (if this sender made its own broker)."""
        if self._owns_broker:
            await self.broker.close()

    shutdown = close

    async def __aenter__(self) -> Self:
        return await self.initialize()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- building and sending --------------------------------------------------------------

    def _knows(self, recipient_id: str) -> bool:
        return self._known.get(recipient_id, 0.0) > time.monotonic()

    def _remember(self, recipient_ids: Sequence[str]) -> None:
        if len(self._known) > 10_000:
            self._known.clear()
        until = time.monotonic() + _KNOWN_FOR
        for recipient_id in recipient_ids:
            self._known[recipient_id] = until

    @staticmethod
    async def _within(timeout: float, step: Awaitable[T], recipient: str, message_id: str) -> T:
        """``step``, or RequestTimeoutError if it takes longer than ``timeout`` (a request's own deadline)."""
        try:
            async with asyncio.timeout(timeout):
                return await step
        except TimeoutError:
            raise RequestTimeoutError(agent_id=recipient, message_id=message_id, timeout=timeout) from None

    async def _inbox_ttl(self, recipient_id: str, *, allow_unregistered: bool) -> float | None:
        """``None`` for a registered recipient or a role's address; else the inbox TTL if allowed, or an error."""
        if self._knows(recipient_id) or keys.is_role_address(recipient_id):
            return None
        if await self.registry.is_registered(recipient_id):
            self._remember([recipient_id])
            return None
        if allow_unregistered:
            return self.broker.settings.unregistered_inbox_ttl
        raise AgentNotFoundError(recipient_id)

    def build_message(
        self,
        recipient_id: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        priority: Priority | str = Priority.NORMAL,
        context: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
    ) -> AgentMessage:
        """A message from this sender.

        Raises:
            MessageValidationError: an id, intent or priority is not valid.
        """
        try:
            fields: dict[str, Any] = {"sender_id": self.sender_id, "recipient_id": recipient_id, "intent": intent}
            conversation_id = conversation_id or CURRENT_CONVERSATION.get()  # a handler's messages join its own
            if conversation_id:
                fields["conversation_id"] = conversation_id
            payload = MessagePayload(data=dict(data or {}), priority=priority, context=dict(context or {}))
            return AgentMessage(payload=payload, **fields)
        except ValidationError as exc:
            problems = describe_errors(exc)
            raise MessageValidationError(f"invalid message to {recipient_id!r}: {problems}") from exc

    @overload
    async def send_message(
        self,
        recipient_id: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = ...,
        *,
        wait_for_response: Literal[True],
        priority: Priority | str = ...,
        timeout: float | None = ...,
        context: Mapping[str, Any] | None = ...,
        conversation_id: str | None = ...,
        allow_unregistered: bool = ...,
        seal: bool | None = ...,
    ) -> AgentResponse: ...

    @overload
    async def send_message(
        self,
        recipient_id: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = ...,
        *,
        wait_for_response: Literal[False] = ...,
        priority: Priority | str = ...,
        timeout: float | None = ...,
        context: Mapping[str, Any] | None = ...,
        conversation_id: str | None = ...,
        allow_unregistered: bool = ...,
        seal: bool | None = ...,
    ) -> PublishResult: ...

    async def send_message(
        self,
        recipient_id: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        wait_for_response: bool = False,
        priority: Priority | str = Priority.NORMAL,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
        allow_unregistered: bool = False,
        seal: bool | None = None,
    ) -> AgentResponse | PublishResult:
        """Send a message; with ``wait_for_response=True``, wait for the reply and return it.

        With security on, ``seal=True`` encrypts the payload to the recipient (``None``: when
        its intent is one of ``AGENTCOMMS_SEALED_INTENTS``).

        Raises:
            AgentNotFoundError: the registry has never seen ``recipient_id`` (and not ``allow_unregistered``).
            RequestTimeoutError: no reply within ``timeout`` (default ``MESSAGE_TIMEOUT``).
            InboxFullError, MessageTooLargeError, MessageValidationError, BrokerConnectionError.
        """
        message = self.build_message(
            recipient_id, intent, data, priority=priority, context=context, conversation_id=conversation_id
        )
        if wait_for_response:
            return await self.request_message(message, timeout=timeout, seal=seal)
        return await self.publish_message(message, allow_unregistered=allow_unregistered, seal=seal)

    async def publish_message(
        self, message: AgentMessage, *, allow_unregistered: bool = False, seal: bool | None = None
    ) -> PublishResult:
        """Send a built message one way (see :meth:`send_message`).

        Raises:
            AgentNotFoundError: the registry has never seen the recipient (and not ``allow_unregistered``).
        """
        try:
            ttl = None
            if not self._knows(message.recipient_id):
                ttl = await self._inbox_ttl(message.recipient_id, allow_unregistered=allow_unregistered)
            result = await self.broker.publish_message(message, inbox_ttl=ttl, seal=seal)
        except AgentCommsError:
            self.stats.failed_sends += 1
            raise
        self.stats.messages_sent += 1
        return result

    async def request_message(
        self, message: AgentMessage, *, timeout: float | None = None, seal: bool | None = None
    ) -> AgentResponse:
        """Send a built message as a request and wait for its reply.

        Raises:
            AgentNotFoundError: the registry has never seen the recipient: nobody could answer.
            RequestTimeoutError: no reply in time.
        """
        started = time.perf_counter()
        self.stats.requests += 1
        timeout = timeout or message.payload.response_timeout or self.broker.settings.message_timeout
        try:
            if not self._knows(message.recipient_id):
                # the registry look-up counts against the request's timeout: it ends by it, Redis or not
                await self._within(
                    timeout, self._inbox_ttl(message.recipient_id, allow_unregistered=False), message.recipient_id,
                    message.message_id,
                )  # fmt: skip
            remaining = timeout - (time.perf_counter() - started)
            response = await self.broker.request(message, timeout=max(remaining, 0.001), seal=seal)
        except RequestTimeoutError:
            self.stats.timeouts += 1
            raise
        except AgentCommsError:
            self.stats.failed_sends += 1
            raise
        self.stats.messages_sent += 1
        self.stats.replies += 1
        self.stats.error_replies += not response.success
        self.stats.total_reply_ms += (time.perf_counter() - started) * 1000
        return response

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
        """Send a request to ``recipient_id`` and wait for its reply (``seal``: see :meth:`send_message`)."""
        message = self.build_message(
            recipient_id, intent, data, priority=priority, context=context, conversation_id=conversation_id
        )
        return await self.request_message(message, timeout=timeout, seal=seal)

    async def request_role(
        self,
        role: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        department: str | None = None,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
        seal: bool | None = None,
        sticky: bool = False,
    ) -> AgentResponse:
        """Ask an online agent with ``role`` (never this sender itself) and wait for its reply.

        The request goes to the role's address, whose inbox every agent of the role reads, so
        whichever is free takes it, and one that dies leaves nothing unread behind (role
        routing, ``AGENTCOMMS_ROLE_ROUTING``). It goes to one agent picked at random instead
        with ``department``, with security on or ``seal`` (authenticated and sealed per pair of
        identities), or when this sender is itself an agent of the role. ``sticky``: later
        requests of the same conversation go to the agent that answered the first.

        Raises:
            NoAgentAvailableError: no agent with that role is online.
            RequestTimeoutError: no reply in time.
        """
        return await self._request_any(
            keys.role_address(role), intent, data, f"role {role}",
            lambda: self.registry.pick_agent(role, department=department, exclude=[self.sender_id]),
            routable=department is None, timeout=timeout, context=context, conversation_id=conversation_id,
            seal=seal, sticky=sticky,
        )  # fmt: skip

    async def request_capability(
        self,
        capability: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
        seal: bool | None = None,
        sticky: bool = False,
    ) -> AgentResponse:
        """Ask an online agent with ``capability`` (never this sender itself) and wait for its reply.

        As :meth:`request_role` does for a role: the request goes to the capability's address
        (``keys.capability_address``), whose inbox every agent with the capability reads, so
        whichever is free takes it; with security on or ``seal``, or when this sender has the
        capability itself, it goes to one agent picked at random.

        Raises:
            NoAgentAvailableError: no agent with that capability is online.
            RequestTimeoutError: no reply in time.
        """
        return await self._request_any(
            keys.capability_address(capability), intent, data, f"capability {capability}",
            lambda: self.registry.pick_agent(capability=capability, exclude=[self.sender_id]),
            routable=True, timeout=timeout, context=context, conversation_id=conversation_id, seal=seal,
            sticky=sticky,
        )  # fmt: skip

    async def _request_any(
        self,
        address: str,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None,
        label: str,
        pick: Callable[[], Awaitable[AgentInfo]],
        *,
        routable: bool,
        timeout: float | None,
        context: Mapping[str, Any] | None,
        conversation_id: str | None,
        seal: bool | None,
        sticky: bool,
    ) -> AgentResponse:
        """A request to whichever agent reading ``address`` is free (role or capability routing), else to ``pick()``."""
        timeout = timeout or self.broker.settings.message_timeout
        started = time.perf_counter()
        conversation = conversation_id or CURRENT_CONVERSATION.get()
        followed = self._sticky.get(conversation) if sticky and conversation else None
        routed = (
            self.broker.settings.role_routing and routable and not seal
            and self.broker.security is None and address not in self.own_roles
        )  # fmt: skip
        if followed is not None and followed != self.sender_id:
            recipient = followed
        elif routed and self._role_online.get(address, 0.0) > time.monotonic():
            recipient = address  # an agent reading the address was online a moment ago: its inbox is read
        else:
            target = await self._within(timeout, pick(), label, "")  # someone who reads it is online
            self._remember([target.agent_id])
            if routed:
                self._role_online[address] = time.monotonic() + _ROLE_ONLINE_FOR
            recipient = address if routed else target.agent_id
        remaining = max(timeout - (time.perf_counter() - started), 0.001)
        reply = await self.request(
            recipient, intent, data, timeout=remaining, context=context, conversation_id=conversation_id,
            seal=seal,
        )  # fmt: skip
        if sticky and conversation and reply.responder_id:
            self._sticky[conversation] = reply.responder_id
            self._sticky.move_to_end(conversation)
            if len(self._sticky) > _STICKY_CONVERSATIONS:
                self._sticky.popitem(last=False)
        return reply

    # -- the seed's helpers ----------------------------------------------------------------

    @overload
    async def assign_task(
        self,
        agent_id: str,
        task_id: str,
        task_description: str | None = ...,
        *,
        description: str | None = ...,
        priority: Priority | str = ...,
        deadline: str | None = ...,
        wait_for_response: Literal[True],
        timeout: float | None = ...,
        context: Mapping[str, Any] | None = ...,
    ) -> AgentResponse: ...

    @overload
    async def assign_task(
        self,
        agent_id: str,
        task_id: str,
        task_description: str | None = ...,
        *,
        description: str | None = ...,
        priority: Priority | str = ...,
        deadline: str | None = ...,
        wait_for_response: Literal[False] = ...,
        timeout: float | None = ...,
        context: Mapping[str, Any] | None = ...,
    ) -> PublishResult: ...

    async def assign_task(
        self,
        agent_id: str,
        task_id: str,
        task_description: str | None = None,
        *,
        description: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        deadline: str | None = None,
        wait_for_response: bool = False,
        timeout: float | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AgentResponse | PublishResult:
        """Assign a task (ASSIGN_TASK with ``task_id``, ``description`` and optional ``deadline``)."""
        data: dict[str, Any] = {"task_id": task_id, "description": task_description or description or ""}
        if deadline:
            data["deadline"] = deadline
        if wait_for_response:
            return await self.send_message(
                agent_id, MessageIntent.ASSIGN_TASK, data, wait_for_response=True, priority=priority,
                timeout=timeout, context=context,
            )  # fmt: skip
        return await self.send_message(agent_id, MessageIntent.ASSIGN_TASK, data, priority=priority, context=context)

    @overload
    async def request_knowledge(
        self,
        agent_id: str,
        query: str,
        *,
        context: Mapping[str, Any] | None = ...,
        wait_for_response: Literal[True] = ...,
        timeout: float | None = ...,
    ) -> AgentResponse: ...

    @overload
    async def request_knowledge(
        self,
        agent_id: str,
        query: str,
        *,
        context: Mapping[str, Any] | None = ...,
        wait_for_response: Literal[False],
        timeout: float | None = ...,
    ) -> PublishResult: ...

    async def request_knowledge(
        self,
        agent_id: str,
        query: str,
        *,
        context: Mapping[str, Any] | None = None,
        wait_for_response: bool = True,
        timeout: float | None = None,
    ) -> AgentResponse | PublishResult:
        """Ask an agent a question (REQUEST_KNOWLEDGE with ``query``)."""
        data = {"query": query}
        if wait_for_response:
            return await self.send_message(
                agent_id, MessageIntent.REQUEST_KNOWLEDGE, data, wait_for_response=True, timeout=timeout,
                context=context,
            )  # fmt: skip
        return await self.send_message(agent_id, MessageIntent.REQUEST_KNOWLEDGE, data, context=context)

    async def discover_agents(
        self,
        *,
        role: str | None = None,
        department: str | None = None,
        capability: str | Sequence[str] | None = None,
        intent: MessageIntent | str | None = None,
        online_only: bool = False,
    ) -> list[AgentInfo]:
        """Agents matching every given filter (see :meth:`AgentRegistry.discover_agents`)."""
        return await self.registry.discover_agents(
            role=role, department=department, capability=capability, intent=intent, online_only=online_only
        )

    async def broadcast_message(
        self,
        intent: MessageIntent | str,
        data: Mapping[str, Any] | None = None,
        *,
        department: str | None = None,
        role: str | None = None,
        capability: str | None = None,
        everyone: bool = False,
        online_only: bool = False,
        priority: Priority | str = Priority.NORMAL,
    ) -> dict[str, PublishResult | AgentCommsError]:
        """Send one message to every registered agent matching the filters, in one round trip.

        Offline members get it in their inbox too (unless ``online_only``). Returns, per
        recipient id, where the message went or why it could not be sent there. With no
        filter, ``everyone=True`` must be said explicitly.

        Raises:
            MessageValidationError: no filter and not ``everyone``.
        """
        if department is None and role is None and capability is None and not everyone:
            raise MessageValidationError("broadcast_message needs department=, role=, capability= or everyone=True")
        agents = await self.registry.discover_agents(
            department=department, role=role, capability=capability, online_only=online_only
        )
        recipients = [a.agent_id for a in agents if a.agent_id != self.sender_id]
        self._remember(recipients)
        conversation = CURRENT_CONVERSATION.get() or new_id()
        messages = [
            self.build_message(r, intent, data, priority=priority, conversation_id=conversation) for r in recipients
        ]
        results = await self.broker.publish_many(messages)
        self.stats.broadcasts += 1
        self.stats.broadcast_recipients += len(recipients)
        self.stats.messages_sent += sum(not isinstance(r, Exception) for r in results)
        self.stats.failed_sends += sum(isinstance(r, Exception) for r in results)
        return dict(zip(recipients, results, strict=True))

    async def get_agent_status(self, agent_id: str, *, ping: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        """What the registry knows of an agent, and (if ``ping`` and online) its answer to HEALTH_CHECK.

        Raises:
            AgentNotFoundError: the agent is not registered.
        """
        info = await self.registry.get_agent(agent_id)
        status: dict[str, Any] = info.model_dump(mode="json")
        status["online"] = info.status != "offline"
        if ping and status["online"]:
            started = time.perf_counter()
            try:
                response = await self.request(agent_id, MessageIntent.HEALTH_CHECK, timeout=timeout)
                status["health"] = response.data if response.success else response["error"]
                status["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            except RequestTimeoutError:
                status["health"] = {"code": "timeout", "message": f"no answer to HEALTH_CHECK within {timeout:g}s"}
        return status

    async def get_sender_stats(self) -> dict[str, Any]:
        """This sender's counters, plus the broker's."""
        return {
            "sender_id": self.sender_id,
            **asdict(self.stats),
            "average_reply_ms": round(self.stats.average_reply_ms, 3),
            "broker": asdict(self.broker.stats),
        }
