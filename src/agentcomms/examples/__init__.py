"""Ready-made pieces from the seed: a dashboard interface, a mixin for existing agents, config helpers.

``marketing_agent`` is a complete agent to copy from; ``TwinAgent`` is the digital twin
the demo and ``agentcomms run-agent`` run for each configured agent.
"""

from agentcomms.examples.config import create_agent_config, create_startup_config, save_startup_config
from agentcomms.examples.dashboard import DashboardInterface
from agentcomms.examples.marketing_agent import MarketingAgent
from agentcomms.examples.mixin import AgentCommunicationMixin
from agentcomms.examples.twins import TwinAgent

__all__ = [
    "AgentCommunicationMixin",
    "DashboardInterface",
    "MarketingAgent",
    "TwinAgent",
    "create_agent_config",
    "create_startup_config",
    "save_startup_config",
]
