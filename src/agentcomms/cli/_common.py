"""What every command shares: consoles, logging, settings, the broker, and the runner that maps errors to exit codes."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar, cast

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from agentcomms.broker import MessageBroker
from agentcomms.cli._secrets import ScrubbedStream, scrub_record, secrets
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerConnectionError,
    ConfigError,
    DeadLetterNotFoundError,
    IdentityError,
    KnowledgeNotConfiguredError,
    KnowledgeQueryError,
    KnowledgeStoreBusyError,
    MessageValidationError,
    NoAgentAvailableError,
    PermissionDeniedError,
    RedisPermissionError,
    RegistrationError,
    RequestTimeoutError,
    SecurityError,
    TrustError,
)
from agentcomms.schemas import AgentId
from agentcomms.settings import Settings, redact_url

logger = logging.getLogger(__name__)


# the streams are file objects in all but typeshed's name (TextIOBase is not IO[str] there)
stdout = cast(TextIO, ScrubbedStream("stdout"))
"""Where machine-readable output (JSON, READY lines) goes."""
# No emoji codes: ":smile:" in an agent's data or a role is text, not a picture.
console = Console(file=stdout, emoji=False)
errors = Console(file=cast(TextIO, ScrubbedStream("stderr")), emoji=False)


def write_out(text: str) -> None:
    """``text`` to stdout as it is (no rich rendering), without passwords, flushed."""
    stdout.write(text)
    stdout.flush()


T = TypeVar("T")

_EXIT_CODES: list[tuple[type[AgentCommsError], int]] = [
    (BrokerConnectionError, 5),
    (RequestTimeoutError, 4),
    (NoAgentAvailableError, 3),
    (AgentNotFoundError, 3),
    (DeadLetterNotFoundError, 3),
    (TrustError, 3),  # not in the trust store (or its record is not signed by a trust anchor)
    (ConfigError, 2),
    (MessageValidationError, 2),
    (RegistrationError, 2),
    (IdentityError, 2),
    (PermissionDeniedError, 2),  # e.g. enrolling without an admin identity
    (RedisPermissionError, 2),  # NOPERM, WRONGPASS: the Redis user may not do this (agentcomms acl)
    (SecurityError, 2),
    (KnowledgeQueryError, 2),  # an empty query, an unknown filter
    (KnowledgeNotConfiguredError, 2),  # no knowledge service answers, the knowledge extra is missing
    (KnowledgeStoreBusyError, 2),
]


def exit_code(error: AgentCommsError) -> int:
    """The exit code of an error's kind (1 if it has none)."""
    return next((code for kind, code in _EXIT_CODES if isinstance(error, kind)), 1)


@contextmanager
def reported() -> Iterator[None]:
    """Around work that is not a coroutine: an AgentCommsError becomes a one-line message and its exit code."""
    try:
        yield
    except AgentCommsError as exc:
        raise fail(exc, exit_code(exc)) from exc


def esc(value: object) -> str:
    """``value`` as text that rich prints as it is: user input and error text never become markup."""
    return escape(secrets.scrub(str(value)))


def plural(count: int, noun: str) -> str:
    """``1 agent``, ``0 agents``, ``2 agents``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_error(message: object) -> None:
    """``error: message`` on stderr, one line, the message printed exactly."""
    errors.print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True, highlight=False)


def fail(message: object, code: int) -> typer.Exit:
    """Print ``message`` as an error; the exit to raise, with ``code``."""
    print_error(message)
    return typer.Exit(code)


# -- checks of command-line values (typer callbacks: a bad value is a usage error, exit code 2) ----

_AGENT_ID: TypeAdapter[str] = TypeAdapter(AgentId)
_ENTRY_ID = re.compile(r"[0-9]+-[0-9]+")


def check_agent_id(value: str | None) -> str | None:
    """``value`` if it is a valid agent id (or ``None``)."""
    if value is None:
        return None
    try:
        return _AGENT_ID.validate_python(value)
    except ValidationError:
        problem = f"{value!r} is not an agent id (letters, digits, _ . : @ -; like agent.cso.jane)"
        raise typer.BadParameter(problem) from None


def check_entry_id(value: str | None) -> str | None:
    """``value`` if it looks like a dead letter's entry id such as ``1700000000000-0`` (or ``None``)."""
    if value is None or _ENTRY_ID.fullmatch(value):
        return value
    raise typer.BadParameter(f"{value!r} is not a dead-letter entry id such as 1700000000000-0 (see dlq list AGENT)")


# -- logging -------------------------------------------------------------------------------


class LogLevel(StrEnum):
    """The levels ``--log-level`` accepts (the names of :mod:`logging`'s levels)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


LogLevelOption = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        case_sensitive=False,
        show_default=False,
        help="Log level for this command; also accepted before the command.",
    ),
]
"""The ``--log-level`` every command takes, so that it may follow the command name too."""


def configure_logging(level: LogLevel | None) -> None:
    """Log to stderr through rich at ``level`` (``None``: leave it as it is).

    The library adds no handlers; the CLI is the program, so it configures logging.
    """
    if level is None:
        return
    handler = RichHandler(console=errors, show_path=False)
    handler.addFilter(scrub_record)
    logging.basicConfig(level=level.value, format="%(message)s", handlers=[handler], force=True)


# -- settings and Redis --------------------------------------------------------------------


def load_settings() -> Settings:
    """Settings from the environment; invalid ones end the command with exit code 2 (the message names the variable)."""
    secrets.add_environment()
    try:
        settings = Settings()
    except ConfigError as exc:
        raise fail(exc, 2) from None
    secrets.add_url(settings.redis_url)
    secrets.add_password(settings.redis_password.get_secret_value() if settings.redis_password else None)
    return settings


def tilde(path: Path) -> str:
    """``path`` absolute, with the home folder written ``~``."""
    path = path.expanduser().absolute()
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def say_redis(url: str, origin: str) -> None:
    """The dim ``redis: URL (origin)`` line on stderr that tells which Redis a command uses (password hidden)."""
    errors.print(f"[dim]redis: {esc(redact_url(url))} ({esc(origin)})[/]", soft_wrap=True, highlight=False)


@asynccontextmanager
async def open_broker(
    settings: Settings, *, client_name: str = "cli", redis_url: str | None = None, origin: str = ""
) -> AsyncIterator[MessageBroker]:
    """A connected broker on ``redis_url`` (default: ``settings``), closed on exit; says which Redis on stderr.

    Args:
        settings: the command's settings.
        client_name: prefix of the broker's id.
        redis_url: a URL that does not come from the environment (a config file's).
        origin: where ``redis_url`` comes from, for messages.

    Raises:
        ConfigError: the URL cannot be parsed (a bad port, an unknown scheme), is refused
            (``AGENTCOMMS_REQUIRE_TLS``), or a TLS certificate or key file cannot be used.
        BrokerConnectionError: Redis does not answer, or the TLS handshake failed.
    """
    if redis_url:
        secrets.add_url(redis_url)
        where = origin or "given"
    elif settings.redis_url:
        where = "REDIS_URL"
    else:
        where = f"embedded, data in {tilde(settings.data_dir)}"
    broker = MessageBroker(redis_url or settings.redis_url, settings=settings, client_name=client_name)
    try:
        try:
            await broker.connect()
        except ConfigError as exc:  # the URL cannot be parsed, or is refused: say where it came from
            if exc.path is not None:  # a certificate or key file (REDIS_SSL_*), which the message names
                raise
            raise ConfigError(f"{exc} ({where})") from None
        say_redis(broker.url, where)
        yield broker
    finally:
        await broker.close()


# -- running a command ---------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; an error becomes a one-line message and its exit code.

    An AgentCommsError gets the exit code of its kind (1 if none); anything else is
    unexpected: exit code 1, with the traceback logged at DEBUG.
    """
    try:
        return asyncio.run(coro)
    except AgentCommsError as exc:
        raise fail(exc, exit_code(exc)) from exc
    except (typer.Exit, typer.Abort, typer.BadParameter):  # already handled: how typer ends a command
        raise
    except Exception as exc:
        logger.debug("unexpected error", exc_info=True)
        hint = "" if logger.isEnabledFor(logging.DEBUG) else " (--log-level DEBUG shows the traceback)"
        raise fail(f"unexpected {type(exc).__name__}: {exc}{hint}", 1) from exc
