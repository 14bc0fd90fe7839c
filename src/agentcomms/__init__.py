"""agentcomms: reliable messaging, discovery and knowledge access for digital-twin agents over Redis."""

from agentcomms.agent import BaseAgent
from agentcomms.broker import BrokerStats, MessageBroker, PublishResult
from agentcomms.deadletters import DeadLetter
from agentcomms.embedded import EmbeddedRedis
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerClosedError,
    BrokerConnectionError,
    CommandOutcomeUnknownError,
    ConfigError,
    DeadLetterNotFoundError,
    EmbeddedRedisError,
    HandlerError,
    InboxFullError,
    KnowledgeNotConfiguredError,
    MessageTooLargeError,
    MessageValidationError,
    NoAgentAvailableError,
    RedisCommandError,
    RedisOutOfMemoryError,
    RedisPermissionError,
    RegistrationConflictError,
    RegistrationError,
    RequestTimeoutError,
)
from agentcomms.registry import AgentRegistry, Presence, RegistryStats
from agentcomms.schemas import (
    AgentInfo,
    AgentMessage,
    AgentResponse,
    AgentStatus,
    ErrorDetail,
    MessageIntent,
    MessagePayload,
    Priority,
    export_json_schemas,
)
from agentcomms.sender import MessageSender, SenderStats
from agentcomms.settings import AgentConfig, Settings, create_agent_config, load_agents_config
from agentcomms.subscription import Handler, Subscription, SubscriptionStats

__version__ = "0.1.0"

__all__ = [
    "AgentCommsError",
    "AgentConfig",
    "AgentInfo",
    "AgentMessage",
    "AgentNotFoundError",
    "AgentRegistry",
    "AgentResponse",
    "AgentStatus",
    "BaseAgent",
    "BrokerClosedError",
    "BrokerConnectionError",
    "BrokerStats",
    "CommandOutcomeUnknownError",
    "ConfigError",
    "DeadLetter",
    "DeadLetterNotFoundError",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "ErrorDetail",
    "Handler",
    "HandlerError",
    "InboxFullError",
    "KnowledgeNotConfiguredError",
    "MessageBroker",
    "MessageIntent",
    "MessagePayload",
    "MessageSender",
    "MessageTooLargeError",
    "MessageValidationError",
    "NoAgentAvailableError",
    "Presence",
    "Priority",
    "PublishResult",
    "RedisCommandError",
    "RedisOutOfMemoryError",
    "RedisPermissionError",
    "RegistrationConflictError",
    "RegistrationError",
    "RegistryStats",
    "RequestTimeoutError",
    "SenderStats",
    "Settings",
    "Subscription",
    "SubscriptionStats",
    "__version__",
    "create_agent_config",
    "export_json_schemas",
    "load_agents_config",
]
