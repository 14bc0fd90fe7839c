"""A complete agent: the marketing manager's digital twin.

Run it on its own (``python -m agentcomms.examples.marketing_agent``, with REDIS_URL or the
embedded Redis); stop it with Ctrl-C. It plans campaigns, accepts content tasks, reviews
work, asks the CSO's agent for pipeline numbers when planning, and delegates writing
to an online content agent.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from agentcomms import BaseAgent, HandlerError, MessageIntent
from agentcomms.schemas import AgentMessage

from .config import create_agent_config

__all__ = ["MarketingAgent", "main"]

logger = logging.getLogger(__name__)


class MarketingAgent(BaseAgent):
    """Plans campaigns with sales data, takes and delegates content tasks, reviews drafts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks: dict[str, dict[str, Any]] = {}
        self.campaigns = ["Q4 Holiday Campaign", "Brand Awareness Drive"]

    async def get_agent_capabilities(self) -> list[str]:
        """What this twin can do."""
        return ["campaign_management", "content_planning", "review"]

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        """Answer about campaigns; for a plan, fetch the pipeline from the CSO's agent first."""
        query = str(message.payload.data.get("query", "")).lower()
        if "plan" in query:
            sales = await self.request_role("cso", MessageIntent.REQUEST_KNOWLEDGE, {"query": "pipeline and Q4"})
            pipeline = sales.data.get("pipeline") if sales.success and isinstance(sales.data, dict) else None
            return {"campaigns": self.campaigns, "pipeline_used": pipeline, "plan": "focus on late-stage deals"}
        return {"campaigns": self.campaigns, "performance": {"leads": 1250, "conversion_rate": 0.045}}

    async def handle_assign_task(self, message: AgentMessage) -> dict[str, Any]:
        """Take a task; writing tasks go to an online content agent."""
        data = message.payload.data
        task_id = data.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise HandlerError("invalid_task", "ASSIGN_TASK needs a task_id")
        self.tasks[task_id] = {"description": data.get("description", ""), "from": message.sender_id}
        if "write" in str(data.get("description", "")).lower():
            delegated = await self.request_role("content_agent", MessageIntent.ASSIGN_TASK, dict(data))
            return {"task_id": task_id, "status": "delegated", "to": delegated.responder_id}
        return {"task_id": task_id, "status": "accepted"}

    async def handle_request_review(self, message: AgentMessage) -> dict[str, Any]:
        """Review a draft: a short verdict."""
        draft = str(message.payload.data.get("draft", ""))
        if not draft:
            raise HandlerError("nothing_to_review", "send the draft in data['draft']")
        return {"verdict": "approved" if len(draft) > 20 else "too short", "words": len(draft.split())}

    async def handle_agent_status(self, message: AgentMessage) -> dict[str, Any]:
        """Status: open tasks and campaigns."""
        return {"open_tasks": len(self.tasks), "campaigns": self.campaigns}


async def main() -> None:
    """Run the marketing manager's twin until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = create_agent_config(
        agent_id="agent.mm.ana",
        user_name="ana",
        role="marketing_manager",
        department="marketing",
        capabilities=["campaign_management", "content_planning"],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with MarketingAgent(config):
        logger.info("marketing agent running; Ctrl-C to stop")
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
