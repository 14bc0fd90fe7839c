"""SIGTERM for agents in programs that do not handle it themselves (``docker stop``, ``kubectl delete``).

Without a handler, SIGTERM kills a Python process on the spot: its agents stay "online"
in the registry for three heartbeat intervals and role addressing keeps sending them
work. When an agent starts in the main thread and SIGTERM still has its default
disposition, agentcomms installs a handler on the running loop: every agent of the
process shuts down (leaves the registry at once, finishes what it holds for up to
``shutdown_timeout`` s), then the process exits with status 143, as SIGTERM would have
ended it. A second SIGTERM exits at once. A program that installs its own SIGTERM
handler (before or after) keeps full control (the handler is never removed: with no
agent left it just exits 143); ``AGENTCOMMS_HANDLE_SIGNALS=false``
turns this off.

SIGINT and a program that simply returns need no handler: ``asyncio.run`` cancels the
tasks left running, and an agent's heartbeat task leaves the registry when it is
cancelled that way (see ``registry.Presence``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentcomms.agent import BaseAgent

logger = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM

_agents: weakref.WeakSet[BaseAgent] = weakref.WeakSet()
_loop: asyncio.AbstractEventLoop | None = None
_terminating = False
_state: dict[str, object] = {}


def watch(agent: BaseAgent) -> None:
    """Shut ``agent`` down on SIGTERM, if this program leaves SIGTERM to its default."""
    global _loop
    if not agent.settings.handle_signals or threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    if _loop is not loop:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the program (or its framework) handles SIGTERM itself
        try:
            loop.add_signal_handler(signal.SIGTERM, _on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):  # not a unix loop, or not the main thread's
            return
        _loop = loop
        _state["installed"] = signal.getsignal(signal.SIGTERM)  # what the loop put in place: ours while it stays
    _agents.add(agent)


def unwatch(agent: BaseAgent) -> None:
    """``agent`` stopped.

    The handler stays on the loop: the program may have installed its own SIGTERM handler
    since, and removing "ours" would remove that one. With no agent left, ours simply
    exits 143, as the default disposition would have ended the process.
    """
    _agents.discard(agent)


def _on_sigterm() -> None:
    global _terminating
    if signal.getsignal(signal.SIGTERM) is not _state.get("installed"):
        return  # the program has put its own handler in place since (signal.signal): the signal is its own
    if _terminating or not _agents:
        raise SystemExit(EXIT_STATUS)  # a second SIGTERM, or no agent to stop: now
    _terminating = True
    agents = list(_agents)
    logger.warning("SIGTERM: %d agent(s) leave the registry, finish what they hold, then exit", len(agents))
    asyncio.get_running_loop().create_task(_terminate(agents), name="agentcomms-sigterm")


async def _terminate(agents: list[BaseAgent]) -> None:
    await asyncio.gather(*(agent.shutdown() for agent in agents), return_exceptions=True)
    # raised from a plain callback, not from this task: the loop stops with it, and no task is left
    # holding an exception nobody retrieves (asyncio would log that as an error)
    asyncio.get_running_loop().call_soon(_exit)


def _exit() -> None:
    raise SystemExit(EXIT_STATUS)
