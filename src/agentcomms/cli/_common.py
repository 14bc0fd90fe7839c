"""What every command shares: consoles, logging, settings, the broker, and the runner that maps errors to exit codes."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import sys
import traceback
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from agentcomms.broker import MessageBroker
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerConnectionError,
    ConfigError,
    DeadLetterNotFoundError,
    MessageValidationError,
    NoAgentAvailableError,
    RegistrationError,
    RequestTimeoutError,
)
from agentcomms.schemas import AgentId
from agentcomms.settings import Settings, redact_url

logger = logging.getLogger(__name__)


# -- secrets: no Redis password in any output or log line --------------------------------------


class Secrets:
    """The Redis passwords this process was given, and how to take them out of text it prints.

    Messages name URLs redacted already (:func:`redact_url`); this is the net under them,
    for text the CLI does not write itself: library errors, log lines, the demo's report.
    """

    def __init__(self) -> None:
        self._replacements: dict[str, str] = {}

    def add_url(self, url: str | None) -> None:
        """Know the password in ``url``, if it has one (as written and percent-decoded)."""
        if not url:
            return
        redacted = redact_url(url)
        if redacted != url:
            self._replacements[url] = redacted
        try:
            parts = urlsplit(url)
        except ValueError:
            return
        userinfo, at, _ = parts.netloc.rpartition("@")
        written = userinfo.partition(":")[2] if at else ""
        for password in (written, unquote(written)):
            if password:
                self._replacements[f":{password}@"] = ":***@"
                self.add_password(password)
        for name, value in parse_qsl(parts.query):
            if name == "password" and value:
                self._replacements[f"password={value}"] = "password=***"
                self.add_password(value)

    def add_password(self, password: str | None) -> None:
        """Know ``password``; it is replaced wherever it appears (if it is long enough to mean nothing else)."""
        if password and len(password) >= 4:
            self._replacements[password] = "***"

    def add_environment(self) -> None:
        """Know the passwords of ``REDIS_URL`` and ``REDIS_PASSWORD`` (any case, as Settings reads them)."""
        for name, value in os.environ.items():
            if name.upper() == "REDIS_URL":
                self.add_url(value)
            elif name.upper() == "REDIS_PASSWORD":
                self.add_password(value)

    def scrub(self, text: str) -> str:
        """``text`` without any known password."""
        for secret in sorted(self._replacements, key=len, reverse=True):  # whole URLs before bare passwords
            if secret in text:
                text = text.replace(secret, self._replacements[secret])
        return text


secrets = Secrets()


class _ScrubbedStream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` (looked up at each write), with known passwords taken out."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def _stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self._name)
        return stream

    def write(self, text: str) -> int:
        self._stream.write(secrets.scrub(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # TextIOBase's is a plain attribute
        return self._stream.encoding


# the streams are file objects in all but typeshed's name (TextIOBase is not IO[str] there)
stdout = cast(TextIO, _ScrubbedStream("stdout"))
"""Where machine-readable output (JSON, READY lines) goes."""
# No emoji codes: ":smile:" in an agent's data or a role is text, not a picture.
console = Console(file=stdout, emoji=False)
errors = Console(file=cast(TextIO, _ScrubbedStream("stderr")), emoji=False)


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
    (ConfigError, 2),
    (MessageValidationError, 2),
    (RegistrationError, 2),
]


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


def _scrub_record(record: logging.LogRecord) -> bool:
    """Take passwords out of a log record's message and traceback before it is rendered."""
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        record.exc_info = record.exc_text = None
    record.msg, record.args = secrets.scrub(text), None
    return True


def configure_logging(level: LogLevel | None) -> None:
    """Log to stderr through rich at ``level`` (``None``: leave it as it is).

    The library adds no handlers; the CLI is the program, so it configures logging.
    """
    if level is None:
        return
    handler = RichHandler(console=errors, show_path=False)
    handler.addFilter(_scrub_record)
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
        ConfigError: the URL cannot be parsed (a bad port, an unknown scheme).
        BrokerConnectionError: Redis does not answer.
    """
    if redis_url:
        secrets.add_url(redis_url)
        where = origin or "given"
    elif settings.redis_url:
        where = "REDIS_URL"
    else:
        where = f"embedded, data in {tilde(settings.data_dir)}"
    broker = MessageBroker(redis_url, settings=settings, client_name=client_name)
    try:
        try:
            await broker.connect()
        except AgentCommsError:
            raise
        except ValueError as exc:  # redis-py's URL parser
            url = redact_url(redis_url or settings.redis_url)
            raise ConfigError(f"invalid Redis URL {url!r} ({where}): {exc}") from exc
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
        code = next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), 1)
        raise fail(exc, code) from exc
    except (typer.Exit, typer.Abort, typer.BadParameter):  # already handled: how typer ends a command
        raise
    except Exception as exc:
        logger.debug("unexpected error", exc_info=True)
        hint = "" if logger.isEnabledFor(logging.DEBUG) else " (--log-level DEBUG shows the traceback)"
        raise fail(f"unexpected {type(exc).__name__}: {exc}{hint}", 1) from exc
