"""Configuration helpers from the seed: one agent's config, and a whole startup team's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from agentcomms.settings import AgentConfig, AgentsFile, create_agent_config

__all__ = ["create_agent_config", "create_startup_config", "save_startup_config"]


_STARTUP_TEAM = [
    ("agent.cmo.john", "john", "cmo", "marketing", ["campaign_management", "brand_strategy", "strategic_planning"]),
    ("agent.cso.jane", "jane", "cso", "sales", ["sales_forecasting", "pipeline_management", "deal_strategy"]),
    ("agent.cto.raj", "raj", "cto", "engineering", ["technical_roadmap", "architecture", "team_management"]),
    ("agent.mm.ana", "ana", "marketing_manager", "marketing", ["campaign_management", "content_planning"]),
    ("agent.sarah", "sarah", "content_agent", "marketing", ["content_creation", "copywriting"]),
    ("agent.alex", "alex", "seo_agent", "marketing", ["seo_optimization", "keyword_research"]),
]


def create_startup_config(redis_url: str | None = None) -> list[AgentConfig]:
    """The default startup team: CMO, CSO, CTO, marketing manager, content and SEO agents."""
    return [
        create_agent_config(agent_id, user, role, department, capabilities, redis_url)
        for agent_id, user, role, department, capabilities in _STARTUP_TEAM
    ]


def save_startup_config(path: str | Path = "startup_agents.json", configs: Sequence[AgentConfig] | None = None) -> Path:
    """Write ``configs`` (default: the startup team) as the seed's ``{"agents": [...]}`` JSON file."""
    path = Path(path)
    document = AgentsFile(agents=list(configs or create_startup_config()))
    path.write_text(json.dumps(document.model_dump(mode="json", exclude_none=True), indent=2) + "\n", encoding="utf-8")
    return path
