"""What every command shares: the consoles, settings, and the runner that turns errors into exit codes."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerConnectionError,
    ConfigError,
    MessageValidationError,
    NoAgentAvailableError,
    RegistrationError,
    RequestTimeoutError,
)
from agentcomms.settings import Settings

# No emoji codes: ":smile:" in an agent's data or a role is text, not a picture.
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)

T = TypeVar("T")

_EXIT_CODES: list[tuple[type[AgentCommsError], int]] = [
    (BrokerConnectionError, 5),
    (RequestTimeoutError, 4),
    (NoAgentAvailableError, 3),
    (AgentNotFoundError, 3),
    (ConfigError, 2),
    (MessageValidationError, 2),
    (RegistrationError, 2),
]


def esc(value: object) -> str:
    """``value`` as text that rich prints as it is: user input and error text never become markup."""
    return escape(str(value))


def print_error(message: object) -> None:
    """``error: message`` on stderr, one line, the message printed exactly."""
    errors.print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True, highlight=False)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; an AgentCommsError becomes a one-line message and its exit code."""
    try:
        return asyncio.run(coro)
    except AgentCommsError as exc:
        print_error(exc)
        code = next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), 1)
        raise typer.Exit(code) from exc


def load_settings() -> Settings:
    """Settings from the environment; invalid ones end the command with exit code 2."""
    try:
        return Settings()
    except ValueError as exc:
        print_error(f"invalid settings in the environment: {exc}")
        raise typer.Exit(2) from exc
