"""TwinAgent: a digital twin with a small role-specific knowledge base, used by the demo and run-agent.

It answers REQUEST_KNOWLEDGE from its role's knowledge, accepts tasks, gives its
roadmap and status, and remembers announcements. Asked to collaborate
(``data["collaborate_with"] = "cso"``), it asks that role's agent first and combines
the answer with its own: agent-to-agent across processes.
"""

from __future__ import annotations

from typing import Any

from agentcomms.agent import BaseAgent
from agentcomms.schemas import AgentMessage, AgentResponse

__all__ = ["TwinAgent"]

KNOWLEDGE: dict[str, dict[str, Any]] = {
    "cso": {
        "pipeline": {"total": "$2.4M", "deals": 38, "stage_late": "$1.1M"},
        "q4_forecast": "$3.1M (82% confidence)",
        "top_accounts": ["Northwind", "Contoso", "Fabrikam"],
    },
    "cmo": {
        "campaigns": ["Q4 Holiday Campaign", "Brand Awareness Drive"],
        "performance": {"leads": 1250, "conversion_rate": 0.045},
        "brand_focus": "reliability for mid-market teams",
    },
    "cto": {
        "roadmap": ["Q4: SSO and audit log", "Q1: public API v2", "Q2: EU data residency"],
        "team": {"engineers": 14, "open_roles": 3},
    },
    "marketing_manager": {"calendar": ["Nov 28 webinar", "Dec 5 newsletter"], "budget_used": 0.71},
    "content_agent": {"drafts": ["Q4 buyer guide", "Case study: Contoso"], "published_this_month": 9},
    "seo_agent": {"top_keywords": ["agent messaging", "digital twin"], "organic_growth": 0.18},
}


class TwinAgent(BaseAgent):
    """A digital twin of one executive or team member, answering from its role's knowledge."""

    announcements: list[str]

    def _knowledge(self) -> dict[str, Any]:
        return KNOWLEDGE.get(self.config.role.lower(), {"note": f"no knowledge loaded for {self.config.role}"})

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any] | AgentResponse:
        """Answer from this role's knowledge; consult another role first when asked to collaborate.

        With ``data["from_documents"]`` it searches the company's documents instead (the
        knowledge service), limited to what both its role and the asker's may read.
        """
        data = message.payload.data
        if data.get("from_documents"):
            return await self.answer_from_knowledge(message)
        answer: dict[str, Any] = {"role": self.config.role, "query": data.get("query", ""), **self._knowledge()}
        partner = data.get("collaborate_with")
        if isinstance(partner, str):
            reply = await self.request_role(
                partner, "request_knowledge", {"query": f"For {self.config.role}: {data.get('query', '')}"}
            )
            answer["from_" + partner] = reply.data if reply.success else reply["error"]
            answer["plan"] = (
                f"{self.config.role.upper()} plan built on {partner.upper()} data: "
                f"{'ok' if reply.success else 'unavailable'}"
            )
        return answer

    async def handle_assign_task(self, message: AgentMessage) -> dict[str, Any]:
        """Accept the task."""
        return {"task_id": message.payload.data.get("task_id"), "status": "accepted", "owner": self.agent_id}

    async def handle_get_roadmap(self, message: AgentMessage) -> dict[str, Any]:
        """This role's roadmap, or its campaigns."""
        knowledge = self._knowledge()
        return {"roadmap": knowledge.get("roadmap") or knowledge.get("campaigns") or []}

    async def handle_share_insights(self, message: AgentMessage) -> dict[str, Any]:
        """Take note of an insight."""
        return {"noted": True}

    async def handle_agent_status(self, message: AgentMessage) -> dict[str, Any] | None:
        """Report status when asked; remember a broadcast announcement (one-way, no reply)."""
        if not hasattr(self, "announcements"):
            self.announcements = []
        note = message.payload.data.get("message")
        if isinstance(note, str):
            self.announcements.append(note)
        if message.reply_to is None:
            return None
        return {
            "agent_id": self.agent_id,
            "role": self.config.role,
            "state": "working",
            "last_announcement": self.announcements[-1] if self.announcements else None,
        }
