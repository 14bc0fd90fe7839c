"""The knowledge service: an agent that owns the knowledge store and answers everyone else.

The embedded store opens from one process only, so one service holds it and the other
processes ask over the bus: REQUEST_KNOWLEDGE (search), SHARE_INSIGHTS (store an
insight), ``knowledge_ingest`` and ``knowledge_stats``. Whose role a search runs as:

- security on: the verified sender's roles from the trust store (a claimed ``role`` must
  be one of them); an ingest needs an admin identity;
- security off: the ``role`` the request names, else the sender's registered role.
  Without security anyone may claim any role: see docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentcomms.agent import BaseAgent
from agentcomms.exceptions import (
    AgentNotFoundError,
    ConfigError,
    HandlerError,
    KnowledgeError,
    KnowledgeQueryError,
    PermissionDeniedError,
)
from agentcomms.knowledge.interface import AgentMemoryInterface
from agentcomms.schemas import AgentMessage
from agentcomms.settings import Settings

__all__ = ["KnowledgeService"]

logger = logging.getLogger(__name__)


class KnowledgeService(BaseAgent):
    """The agent that owns the knowledge store (``agentcomms knowledge serve``).

    Args:
        settings: where Redis and the store are (default: the environment).
        memory: an owner-mode :class:`AgentMemoryInterface` to serve (default: one that
            opens the configured store; it raises KnowledgeStoreBusyError if another
            process holds it).
        kwargs: passed to :class:`BaseAgent` (``broker``, ``concurrency`` ...).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        memory: AgentMemoryInterface | None = None,
        ingest_roots: Sequence[Path] = (),
        **kwargs: Any,
    ) -> None:
        settings = settings or Settings()
        config = {
            "agent_id": settings.knowledge_service_id,
            "user_name": "knowledge",
            "role": "knowledge_service",
            "department": "platform",
            "capabilities": ["knowledge_search", "knowledge_ingest", "insights"],
        }
        super().__init__(config, settings=settings, **kwargs)
        self._memory = memory
        self._owns_memory = memory is None
        self.ingest_roots = [
            Path(p).expanduser().resolve() for p in [*self.settings.knowledge_ingest_roots, *ingest_roots]
        ]
        """Folders under which an ingest or a removal may be asked for over the bus (others are refused)."""

    async def initialize(self) -> KnowledgeService:
        """Open the store (owner mode), then go online.

        Raises:
            KnowledgeStoreBusyError: another process owns the embedded store.
            KnowledgeNotConfiguredError: the knowledge extra is missing or the store cannot be used.
        """
        if self._memory is None:
            self._memory = AgentMemoryInterface(self.settings, broker=self.broker, mode="owner")
        try:
            await self.broker.connect()
            await self._memory.initialize()
            await super().initialize()
        except BaseException:
            if self._owns_memory:
                await self._memory.close()
            if self._owns_broker:  # the store was busy, say: leave no connection behind
                await self.broker.close()
            raise
        return self

    def _owner(self) -> AgentMemoryInterface:
        memory = self._memory
        if memory is None or memory.mode != "owner":
            raise HandlerError("unavailable", "the knowledge store is not open")
        return memory

    async def _role_of(self, message: AgentMessage) -> str | None:
        """Whose role a request runs as (see the module's docstring)."""
        claimed = message.payload.data.get("role")
        claimed = claimed if isinstance(claimed, str) and claimed.strip() else None
        verified = message.sender_roles
        if verified is not None:
            if claimed is not None:
                if claimed.strip().casefold() not in {r.strip().casefold() for r in verified}:
                    raise HandlerError("forbidden", f"{message.sender_id} does not hold role {claimed!r}")
                return claimed
            if len(verified) == 1:
                return verified[0]
            raise HandlerError("forbidden", f"{message.sender_id} holds several roles: name one as 'role'")
        if claimed is not None:
            return claimed
        try:
            return (await self.registry.get_agent(message.sender_id)).role
        except AgentNotFoundError:
            return None

    def _is_admin(self, message: AgentMessage) -> bool:
        security = self.broker.security
        if security is None:
            return True
        known = security.known(self.agent_id, message.sender_id)
        return known is not None and known[1].admin

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        """Search as the sender's role: ``{"results": [...], "role": ...}``."""
        data = message.payload.data
        role = await self._role_of(message)
        on_behalf = data.get("on_behalf_of") or []
        if not isinstance(on_behalf, list) or not all(isinstance(r, str) for r in on_behalf):
            raise HandlerError("invalid_query", "'on_behalf_of' must be a list of roles")
        try:
            results = await self._owner().search_knowledge(
                message.sender_id,
                role,
                data.get("query", ""),
                filters=data.get("filters") or None,
                limit=data.get("limit", 5),
                on_behalf_of=on_behalf,
            )
        except KnowledgeQueryError as exc:
            raise HandlerError("invalid_query", str(exc)) from None
        return {"role": role, "results": [r.model_dump(mode="json") for r in results]}

    async def handle_share_insights(self, message: AgentMessage) -> dict[str, Any]:
        """Store the insight in ``data["insight"]`` under ``data["domains"]``: ``{"insight_id": ...}``."""
        data = message.payload.data
        role = await self._role_of(message)
        domains = data.get("domains")
        if isinstance(domains, str):
            domains = [domains]
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise HandlerError("invalid_query", "'domains' must be a list of domain names")
        try:
            insight_id = await self._owner().share_insight(
                message.sender_id, role, data.get("insight", ""), domains, title=data.get("title")
            )
        except KnowledgeQueryError as exc:
            raise HandlerError("invalid_query", str(exc)) from None
        except PermissionDeniedError as exc:
            raise HandlerError("forbidden", str(exc)) from None
        return {"insight_id": insight_id}

    def _allowed_path(self, message: AgentMessage, what: str) -> Path:
        """``data["path"]``, if the sender may have it ingested or removed.

        The sender must be an admin (security on) and the path under one of :attr:`ingest_roots`:
        anyone on the bus could otherwise make the service read any file.
        """
        if not self._is_admin(message):
            raise HandlerError("forbidden", f"only an admin identity may {what}")
        path = message.payload.data.get("path")
        if not isinstance(path, str) or not path:
            raise HandlerError("invalid_query", "'path' must name a file or folder")
        target = Path(path).expanduser().resolve()
        if not any(target == root or target.is_relative_to(root) for root in self.ingest_roots):
            roots = ", ".join(map(str, self.ingest_roots)) or "none"
            raise HandlerError(
                "forbidden",
                f"{target} is not under the folders this knowledge service ingests ({roots}): set "
                "AGENTCOMMS_KNOWLEDGE_INGEST_ROOTS for the service process, or start it with serve --ingest PATH",
            )
        return target

    async def handle_knowledge_ingest(self, message: AgentMessage) -> dict[str, Any]:
        """Ingest ``data["path"]`` (under :attr:`ingest_roots`), or this service's ``GDRIVE_CONFIG_PATH``.

        With ``data["drive"]`` the Drive folders; the reply is the report. With security on, admins only.
        """
        data = message.payload.data
        try:
            if data.get("drive"):
                if not self._is_admin(message):
                    raise HandlerError("forbidden", "only an admin identity may ingest into the knowledge store")
                report = await self._owner().ingest_drive()
            else:
                path = self._allowed_path(message, "ingest into the knowledge store")
                domain = data.get("domain")
                report = await self._owner().ingest(path, domain=domain if isinstance(domain, str) else None)
        except KnowledgeQueryError as exc:
            raise HandlerError("invalid_query", str(exc)) from None
        except (KnowledgeError, ConfigError) as exc:
            raise HandlerError("ingest_failed", str(exc)) from None
        return report.model_dump(mode="json")

    async def handle_knowledge_remove(self, message: AgentMessage) -> dict[str, Any]:
        """Remove what was ingested from ``data["path"]`` (under :attr:`ingest_roots`); admins only (security on)."""
        path = self._allowed_path(message, "remove from the knowledge store")
        return (await self._owner().remove(path)).model_dump(mode="json")

    async def handle_knowledge_stats(self, message: AgentMessage) -> dict[str, Any]:
        """What the store holds: all of it for an admin (or with security off); else only the sender's domains."""
        stats = await self._owner().stats()
        if self._is_admin(message):
            return stats
        granted = self._owner().domains_for(await self._role_of(message))
        return {
            "store": "(shown to admins)", "embedder": stats["embedder"],
            "domains": {d: counts for d, counts in stats["domains"].items() if d in granted},
            "chunks": sum(c["chunks"] for d, c in stats["domains"].items() if d in granted),
            "documents": sum(c["documents"] for d, c in stats["domains"].items() if d in granted),
            "permissions": {},
        }  # fmt: skip
