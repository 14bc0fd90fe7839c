"""agentcomms: reliable messaging, discovery and knowledge access for digital-twin agents over Redis."""

from agentcomms.agent import BaseAgent
from agentcomms.broker import BrokerStats, DeadLetter, MessageBroker, PublishResult
from agentcomms.embedded import EmbeddedRedis
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerClosedError,
    BrokerConnectionError,
    ConfigError,
    EmbeddedRedisError,
    HandlerError,
    InboxFullError,
    KnowledgeNotConfiguredError,
    MessageTooLargeError,
    MessageValidationError,
    NoAgentAvailableError,
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
from agentcomms.settings import AgentConfig, Settings, load_agents_config
from agentcomms.subscription import Handler, Subscription

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
    "ConfigError",
    "DeadLetter",
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
    "RegistrationConflictError",
    "RegistrationError",
    "RegistryStats",
    "RequestTimeoutError",
    "SenderStats",
    "Settings",
    "Subscription",
    "__version__",
    "export_json_schemas",
    "load_agents_config",
]
