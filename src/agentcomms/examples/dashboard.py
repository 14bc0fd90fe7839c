"""DashboardInterface: what a dashboard (a person's screen) uses to ask the agents.

Its helpers never raise for "nobody answered": like the seed's examples expect, they
return a failed :class:`AgentResponse` (``success`` false, an error code such as
``no_agent_available`` or ``timeout``) that the page can show.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from agentcomms.exceptions import NoAgentAvailableError, RequestTimeoutError
from agentcomms.schemas import AgentInfo, AgentResponse, AgentStatus, MessageIntent
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings

__all__ = ["DashboardInterface"]


class DashboardInterface:
    """Human-to-agent requests: sales data for the CMO, department status for an executive, and so on."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        dashboard_id: str = "dashboard",
        settings: Settings | None = None,
        timeout: float | None = None,
        status_timeout: float = 5.0,
    ) -> None:
        self.sender = MessageSender(redis_url, sender_id=dashboard_id, settings=settings)
        self.timeout = timeout
        self.status_timeout = status_timeout

    async def initialize(self) -> Self:
        """Connect to Redis."""
        await self.sender.initialize()
        return self

    async def close(self) -> None:
        """Disconnect."""
        await self.sender.close()

    async def __aenter__(self) -> Self:
        return await self.initialize()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def request_from_role(
        self,
        role: str,
        query: str,
        *,
        requester_role: str | None = None,
        intent: MessageIntent | str = MessageIntent.REQUEST_KNOWLEDGE,
        data: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> AgentResponse:
        """Ask an online agent with ``role``; a failed response (not an exception) if none answers."""
        payload = {"query": query, "requester_role": requester_role, **(data or {})}
        try:
            return await self.sender.request_role(
                role, intent, payload, context=context, timeout=timeout or self.timeout
            )
        except NoAgentAvailableError as exc:
            return AgentResponse.fail("no_agent_available", str(exc))
        except RequestTimeoutError as exc:
            return AgentResponse.fail("timeout", str(exc))

    async def request_sales_data(
        self, requester_role: str, query: str, context: Mapping[str, Any] | None = None
    ) -> AgentResponse:
        """Ask the CSO's agent (sales pipeline, forecasts)."""
        return await self.request_from_role("cso", query, requester_role=requester_role, context=context)

    async def request_marketing_data(
        self, requester_role: str, query: str, context: Mapping[str, Any] | None = None
    ) -> AgentResponse:
        """Ask the CMO's agent (campaigns, brand)."""
        return await self.request_from_role("cmo", query, requester_role=requester_role, context=context)

    async def request_roadmap(
        self, requester_role: str, query: str = "", context: Mapping[str, Any] | None = None
    ) -> AgentResponse:
        """Ask the CTO's agent for the roadmap (GET_ROADMAP)."""
        return await self.request_from_role(
            "cto", query, requester_role=requester_role, intent=MessageIntent.GET_ROADMAP, context=context
        )

    async def get_available_agents(self, department: str | None = None) -> list[AgentInfo]:
        """Agents online now (in ``department``, if given)."""
        return await self.sender.discover_agents(department=department, online_only=True)

    async def exec_request_department_status(self, department: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask every online agent of ``department`` for its status at once; list the offline ones too.

        Answers within ``timeout`` seconds (default: the interface's ``status_timeout``, 5 s), not
        ``MESSAGE_TIMEOUT``: a member that died without leaving still looks online for a while,
        and is reported ``silent`` rather than holding up the whole page. Each agent's ``state``
        is ``answered``, ``error`` (it answered with an error), ``silent`` or ``offline``.
        """
        agents = await self.sender.discover_agents(department=department)
        online = [a for a in agents if a.status is not AgentStatus.OFFLINE]
        wait = timeout or self.status_timeout

        async def ask(agent: AgentInfo) -> AgentResponse:
            try:
                return await self.sender.request(
                    agent.agent_id, MessageIntent.AGENT_STATUS, {"requested_by": self.sender.sender_id}, timeout=wait
                )
            except RequestTimeoutError as exc:
                return AgentResponse.fail("timeout", str(exc))

        replies = dict(zip((a.agent_id for a in online), await asyncio.gather(*(ask(a) for a in online)), strict=True))

        def state(agent_id: str) -> str:
            reply = replies.get(agent_id)
            if reply is None:
                return "offline"
            if reply.success:
                return "answered"
            return "silent" if reply.error is not None and reply.error.code == "timeout" else "error"

        rows = [
            {
                "agent_id": a.agent_id,
                "role": a.role,
                "status": str(a.status),
                "state": state(a.agent_id),
                "response": replies[a.agent_id].model_dump(mode="json") if a.agent_id in replies else None,
            }
            for a in agents
        ]
        return {
            "department": department,
            "total_agents": len(agents),
            "online_agents": len(online),
            "answered": sum(row["state"] == "answered" for row in rows),
            "silent": sum(row["state"] == "silent" for row in rows),
            "agents": rows,
        }
