"""AgentCommunicationMixin: add communication to an agent class you already have.

Call ``await self.initialize_communication(agent_id=..., role=..., department=...)``
once; override ``_handle_knowledge_request``, ``_handle_task_assignment`` ... with your
logic; ask other agents by role with ``request_info_from_agent(role, question)``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from agentcomms.agent import BaseAgent
from agentcomms.broker import MessageBroker, PublishResult
from agentcomms.exceptions import AgentCommsError, NoAgentAvailableError, RequestTimeoutError
from agentcomms.schemas import AgentInfo, AgentMessage, AgentResponse, MessageIntent, normalize_agent_id
from agentcomms.settings import Settings

from .config import create_agent_config

__all__ = ["AgentCommunicationMixin"]

logger = logging.getLogger(__name__)

_HANDLERS: dict[str, str] = {
    MessageIntent.REQUEST_KNOWLEDGE: "_handle_knowledge_request",
    MessageIntent.ASSIGN_TASK: "_handle_task_assignment",
    MessageIntent.GET_ROADMAP: "_handle_roadmap_request",
    MessageIntent.SHARE_INSIGHTS: "_handle_insights",
    MessageIntent.REQUEST_REVIEW: "_handle_review_request",
    MessageIntent.PROVIDE_FEEDBACK: "_handle_feedback",
    MessageIntent.AGENT_STATUS: "_handle_status_request",
}
"""Which overridable method answers which intent."""


def _overridden(owner: object, name: str) -> bool:
    """Whether the owner's class defines its own ``name`` instead of the mixin's stub."""
    return getattr(type(owner), name, None) is not getattr(AgentCommunicationMixin, name)


class _MixinAgent(BaseAgent):
    """The BaseAgent behind a mixin: it routes each intent to the owner's handler for it.

    A seed intent goes to the seed's ``_handle_*`` method only if the owner's class
    overrides it; another intent goes to the owner's ``_handle_<intent>`` method if it has
    one. Nothing else is advertised, and a message for it is answered ``unsupported_intent``
    (the built-ins HEALTH_CHECK, CAPABILITY_QUERY and AGENT_STATUS are always answered).
    """

    def __init__(self, owner: AgentCommunicationMixin, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def handler_for(self, intent: str) -> Callable[[AgentMessage], Awaitable[Any]] | None:
        name = _HANDLERS.get(intent)
        if name is not None:
            return getattr(self.owner, name) if _overridden(self.owner, name) else None
        custom = "_handle_" + intent
        if custom in _HANDLERS.values() or not intent.replace("_", "").isalnum():
            return None
        found = getattr(self.owner, custom, None)
        return found if callable(found) else None

    async def get_supported_intents(self) -> list[MessageIntent | str]:
        found: list[MessageIntent | str] = [i for i in MessageIntent if self.handler_for(i.value) is not None]
        for name in dir(type(self.owner)):
            intent = name.removeprefix("_handle_")
            if name.startswith("_handle_") and intent not in found and self.handler_for(intent) is not None:
                found.append(intent)
        return found


class AgentCommunicationMixin:
    """Gives an existing agent class an agent id on the network, handlers, and ways to ask others.

    Override the seed's handlers (``_handle_knowledge_request``, ``_handle_task_assignment``
    ...) for the intents your agent answers, and add ``_handle_<intent>`` methods for your
    own intents: only those are advertised in the registry. ``self.agent_id`` is yours to
    set; if your class has none, :meth:`initialize_communication` sets it to the network id.
    """

    comms_agent: BaseAgent | None = None

    @property
    def comms_agent_id(self) -> str:
        """This agent's id on the network (after :meth:`initialize_communication`)."""
        return self._comms().agent_id

    def _comms(self) -> BaseAgent:
        if self.comms_agent is None:
            raise AgentCommsError("call initialize_communication() first")
        return self.comms_agent

    async def initialize_communication(
        self,
        agent_id: str,
        role: str,
        department: str,
        capabilities: Sequence[str] = (),
        user_name: str | None = None,
        *,
        redis_url: str | None = None,
        settings: Settings | None = None,
        broker: MessageBroker | None = None,
        heartbeat_interval: float | None = None,
        concurrency: int | None = None,
    ) -> BaseAgent:
        """Register this agent and start answering messages.

        ``agent_id`` is normalised (``"agent.cmo.John Smith"`` becomes ``"agent.cmo.john_smith"``).

        Raises:
            ConfigError: a field is invalid.
            BrokerConnectionError: Redis is unreachable.
        """
        normalized = normalize_agent_id(agent_id)
        if normalized != agent_id:
            logger.info("agent id %r normalised to %r", agent_id, normalized)
        config = create_agent_config(normalized, user_name or normalized, role, department, capabilities, redis_url)
        agent = _MixinAgent(
            self, config, settings=settings, broker=broker, heartbeat_interval=heartbeat_interval,
            concurrency=concurrency,
        )  # fmt: skip
        await agent.initialize()
        self.comms_agent = agent
        if getattr(self, "agent_id", None) is None:
            self.agent_id = agent.agent_id  # only if the class has no agent_id of its own
        return agent

    async def shutdown_communication(self) -> None:
        """Go offline and disconnect."""
        if self.comms_agent is not None:
            await self.comms_agent.shutdown()
            self.comms_agent = None

    # -- asking others ---------------------------------------------------------------------

    async def request_info_from_agent(
        self,
        role: str,
        question: str,
        *,
        context: Mapping[str, Any] | None = None,
        intent: MessageIntent | str = MessageIntent.REQUEST_KNOWLEDGE,
        timeout: float | None = None,
    ) -> AgentResponse:
        """Ask an online agent with ``role``.

        Returns a failed response (code ``no_agent_available`` or ``timeout``) rather than
        raising when nobody answers, as the seed's examples expect.
        """
        try:
            return await self._comms().request_role(role, intent, {"query": question}, context=context, timeout=timeout)
        except NoAgentAvailableError as exc:
            return AgentResponse.fail("no_agent_available", str(exc))
        except RequestTimeoutError as exc:
            return AgentResponse.fail("timeout", str(exc))

    async def ask_agent(
        self, agent_id: str, question: str, *, context: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> AgentResponse:
        """Ask one agent by id (REQUEST_KNOWLEDGE)."""
        return await self._comms().request(
            agent_id, MessageIntent.REQUEST_KNOWLEDGE, {"query": question}, context=context, timeout=timeout
        )

    async def send_to_agent(
        self, agent_id: str, intent: MessageIntent | str, data: Mapping[str, Any] | None = None
    ) -> PublishResult:
        """Send a one-way message."""
        return await self._comms().send_message(agent_id, intent, data)

    async def discover_agents(self, **filters: Any) -> list[AgentInfo]:
        """Agents matching ``filters`` (role, department, capability, intent, online_only)."""
        return await self._comms().discover_agents(**filters)

    async def broadcast_to_department(
        self, department: str, intent: MessageIntent | str, data: Mapping[str, Any] | None = None
    ) -> dict[str, PublishResult | AgentCommsError]:
        """Send one message to every agent of ``department``."""
        return await self._comms().broadcast_message(intent, data, department=department)

    # -- override these with your agent's logic: only overridden ones are advertised -------

    def _received(self, message: AgentMessage, **extra: Any) -> dict[str, Any]:
        agent_id = self.comms_agent.agent_id if self.comms_agent else None
        return {"status": "received", "agent_id": agent_id, "intent": str(message.intent), **extra}

    async def _handle_knowledge_request(self, message: AgentMessage) -> Any:
        """REQUEST_KNOWLEDGE: answer ``message.payload.data["query"]``."""
        return self._received(message, response="no knowledge handler is defined for this agent")

    async def _handle_task_assignment(self, message: AgentMessage) -> Any:
        """ASSIGN_TASK: accept or refuse ``message.payload.data["task_id"]``."""
        return self._received(message, task_id=message.payload.data.get("task_id"), accepted=True)

    async def _handle_roadmap_request(self, message: AgentMessage) -> Any:
        """GET_ROADMAP."""
        return self._received(message, roadmap=[])

    async def _handle_insights(self, message: AgentMessage) -> Any:
        """SHARE_INSIGHTS."""
        return self._received(message)

    async def _handle_review_request(self, message: AgentMessage) -> Any:
        """REQUEST_REVIEW."""
        return self._received(message)

    async def _handle_feedback(self, message: AgentMessage) -> Any:
        """PROVIDE_FEEDBACK."""
        return self._received(message)

    async def _handle_status_request(self, message: AgentMessage) -> Any:
        """AGENT_STATUS (a status request, or a broadcast announcement)."""
        return self._received(message, state="available")
