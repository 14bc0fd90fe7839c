"""The Pipeliner: one connection, continuously pipelined, that survives Redis restarts and refusals.

Why it exists: most of a Redis round trip on one machine is client-side Python, so
every send, reply, acknowledgement and registry call issued during one event-loop tick
goes out in a single write, and replies are matched to waiting futures as their bytes
arrive (``Link.data_received``). Callers never cancel a command mid-flight; they only
stop awaiting its future, so a cancelled caller cannot leave the connection out of step.

What happens when things go wrong (each case has a test in tests/test_transport.py):

* **Connection lost** (Redis restarted, killed, the network dropped): written commands
  that are safe to repeat (``replay=True``) are sent again, in their order, before
  anything queued later; the others fail with :class:`CommandOutcomeUnknownError`
  (Redis may or may not have run them). Unwritten commands wait. Every reconnection logs
  in, waits until Redis answers ``PING`` (not ``LOADING``) and loads every Lua script
  before the first command goes out, so no queued call meets ``NOSCRIPT``.
* **"Not now" refusals** (``LOADING``, ``BUSY``, ``MASTERDOWN``, ``READONLY``,
  ``NOSCRIPT`` ...; see ``errors.TRANSIENT_CODES``): the command did not run. It is held,
  writing stops until the replies already on the way are in, and once a probe says Redis
  is ready the held commands go out first, in order. ``READONLY`` also replaces the
  connection (a failover may have moved the primary); ``NOSCRIPT`` reloads the scripts.
* **Any other refusal** (``OOM``, ``WRONGTYPE`` ...): that command's caller gets a typed
  error (``errors.classify``); the connection carries on.
* **Redis unreachable or not ready for longer than** ``reconnect_timeout``: each waiting
  command fails with :class:`BrokerConnectionError`; later commands try again.
* **Silence**: if Redis owes replies and sends nothing for ``READ_TIMEOUT`` seconds (a
  dead peer), the connection is dropped and replaced.
* **Flow control**: while the socket's write buffer is full (``pause_writing``), commands
  wait in the outbox instead of piling up in memory behind the socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from hiredis import pack_command

from agentcomms.exceptions import (
    AgentCommsError,
    BrokerClosedError,
    BrokerConnectionError,
    CommandOutcomeUnknownError,
    MessageValidationError,
)
from agentcomms.transport.errors import ReplyError, classify, code_of, is_transient, needs_reconnect
from agentcomms.transport.link import (
    Command,
    EncodableT,
    Link,
    LinkLost,
    NotReady,
    gather_replies,
    open_link,
    pack,
)
from agentcomms.transport.scripts import ALL_SCRIPTS, Script, script_name
from agentcomms.transport.spec import ConnectionSpec

__all__ = ["FLUSH_AT", "READ_TIMEOUT", "LazyCommand", "Pipeliner", "backoff", "command_name"]

logger = logging.getLogger(__name__)

FLUSH_AT = 64
"""Queued commands (or messages in one SEND) that are written at once instead of at the end of the tick.

Coalescing a whole tick saves writes, but while the last reply of a burst is being
processed, Redis and the far side would sit idle; a long queue goes out in parts.
"""

READ_TIMEOUT = 15.0
"""Seconds of silence while replies are owed after which a connection is taken for dead and replaced."""

LazyCommand = Callable[[], Command | None]
"""Builds a command when its write goes out (``None``: nothing to send); see :meth:`Pipeliner.call_lazy`."""

_REPLAY = 1  # safe to send again after a lost connection
_RAW = 2  # the pipeliner's own probe: the reply (even an error) is the future's result

_Entry = tuple[Command | LazyCommand, "asyncio.Future[Any] | None", int, float]
"""An outbox entry: the command (or its builder), its future (None: nobody waits), flags, when queued."""
_Sent = tuple[Command, "asyncio.Future[Any] | None", int, float]


_WAIT_FIRST = frozenset({"CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN"})
"""Refusals a PING does not see (it answers): the held commands wait a backoff before they are sent again."""


def backoff(attempt: int, *, base: float = 0.05, cap: float = 1.0) -> float:
    """Delay before retry ``attempt`` (0-based): exponential with full jitter, at most ``cap`` seconds."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 32))))  # 2**attempt as a float overflows at 1024


def command_name(command: Command) -> str:
    """A command's name for messages, e.g. ``XADD`` or ``script send`` (never its arguments)."""
    name = str(command[0]).upper() if command else "?"
    if name == "EVALSHA" and len(command) > 1:
        return f"script {script_name(str(command[1]))}"
    return name


class Pipeliner:
    """Pipelined commands over one connection to one Redis server (see the module docstring).

    Args:
        spec: the server and credentials.
        reconnect_timeout: how long a command waits while Redis is unreachable or not ready.
        name: the connection's ``CLIENT SETNAME``.
    """

    cluster = False
    """Whether commands are spread over a Redis Cluster's primaries (see ``transport.cluster``): not here."""

    def __init__(self, spec: ConnectionSpec, *, reconnect_timeout: float, name: str) -> None:
        self._spec = spec
        self._name = name
        self._reconnect_timeout = reconnect_timeout
        self._loop = asyncio.get_running_loop()
        self._link: Link | None = None
        self._ready = False  # connected, scripts loaded, not held: writes may go out
        self._outbox: list[_Entry] = []
        self._sent: collections.deque[_Sent] = collections.deque()
        self._held: list[_Sent] = []  # refused "not now", or written before a lost connection: sent again first
        self._recovering: asyncio.Task[None] | None = None
        self._reload_scripts = False
        self._need_primary = False
        self._outage_since: float | None = None
        self._busy_since = 0.0
        self._refused_in_a_row = 0  # holds for a "not now" that PING cannot see (CLUSTERDOWN ...) since a success
        self._write_scheduled = False
        self._batching = 0
        self._closing = False
        self._closed = False
        self._drained: asyncio.Event | None = None
        self._closed_future: asyncio.Future[None] | None = None
        self._replayed: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
        self._writable = asyncio.Event()
        self._writable.set()
        self._watchdog: asyncio.TimerHandle | None = None
        self.round_trips = 0
        """Writes (batches of commands) so far, for statistics and benchmarks."""
        self.reconnects = 0
        """Times the connection was re-established or recovered from a refusal."""
        self.on_outage: Callable[[], None] | None = None
        """Called when the connection is lost (a cluster then watches whether the server's slots moved)."""

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether commands are being written now (connected and not held)."""
        return self._ready

    @property
    def spec(self) -> ConnectionSpec:
        """The server."""
        return self._spec

    def node_for_key(self, key: str) -> Pipeliner:
        """The pipeliner that serves ``key``: this one (a cluster has one per primary)."""
        return self

    def spec_for_key(self, key: str) -> ConnectionSpec:
        """Where a blocking read of ``key`` connects: this server."""
        return self._spec

    async def connect(self) -> None:
        """Make the first connection.

        Redis that is still loading is waited for (up to ``reconnect_timeout``).

        Raises:
            BrokerConnectionError: Redis cannot be reached now, or stayed not ready.
            RedisPermissionError: Redis refused the credentials.
        """
        deadline = self._loop.time() + self._reconnect_timeout
        attempt = 0
        while True:
            try:
                link = await open_link(self._spec, name=self._name)
                await self._load_scripts(link)
                break
            except LinkLost as exc:
                raise BrokerConnectionError(f"cannot reach Redis: {exc}", url=self._spec.address) from None
            except NotReady as exc:
                if self._loop.time() > deadline:
                    raise BrokerConnectionError(
                        f"Redis is not ready ({exc.code}) after {self._reconnect_timeout:g}s", url=self._spec.address
                    ) from None
                logger.info("Redis at %s is not ready yet (%s); waiting", self._spec.address, exc.code)
                await asyncio.sleep(backoff(attempt))
                attempt += 1
        self._attach(link)
        self._ready = True
        self._schedule_watchdog()

    async def aclose(self) -> None:
        """Send what is queued, wait for the replies (while Redis answers), then close.

        Commands still unwritten then fail with :class:`BrokerClosedError` (not sent); commands
        written and not answered fail with :class:`CommandOutcomeUnknownError`. Safe to call
        twice, or concurrently: every caller returns once the pipeliner is closed.
        """
        if self._closed_future is not None:
            await asyncio.shield(self._closed_future)
            return
        self._closed_future = self._loop.create_future()
        try:
            self._closing = True
            self._writable.set()
            if self._ready:
                self._write()
            if self._sent and self._link is not None:
                self._drained = asyncio.Event()
                await self._drained.wait()  # replies arrive, or the watchdog or a lost connection ends the wait
            self._ready = False  # nothing more is written
            self._closed = True
            if self._recovering is not None:
                self._recovering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._recovering
            self._fail_all(BrokerClosedError("broker closed before the command was sent"))
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._link is not None:
                self._link.on_lost = None
                self._link.close()
                self._link = None
        finally:
            self._closed_future.set_result(None)

    # -- queueing --------------------------------------------------------------------------

    def call(self, *args: EncodableT, replay: bool) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply or its typed error.

        ``replay``: whether the command may be sent again after a lost connection (it is
        idempotent, or made so by a dedup marker). Otherwise such a loss fails it with
        :class:`CommandOutcomeUnknownError`.
        """
        future = self._loop.create_future()
        self._outbox.append((args, future, _REPLAY if replay else 0, self._loop.time()))
        self._after_queue()
        return future

    def call_lazy(self, build: LazyCommand, *, replay: bool, key: str = "") -> asyncio.Future[Any]:
        """Queue a command built only when it is written, so that callers can add to it until then.

        ``build()`` runs once, at the write (at once if the connection is idle). If it
        returns ``None`` nothing is sent and the future is cancelled. ``key``: the key the
        command will name (where a cluster sends it).
        """
        future = self._loop.create_future()
        self._outbox.append((build, future, _REPLAY if replay else 0, self._loop.time()))
        self._after_queue()
        return future

    def fire(self, *args: EncodableT, replay: bool) -> None:
        """Queue a command whose result nobody waits for (a failure is logged)."""
        self._outbox.append((args, None, _REPLAY if replay else 0, self._loop.time()))
        self._after_queue()

    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[EncodableT], *, replay: bool
    ) -> asyncio.Future[Any]:
        """Queue an EVALSHA of ``script`` (loaded on every connection)."""
        return self.call("EVALSHA", script.sha, len(keys), *keys, *args, replay=replay)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold writes while a batch is queued, so that it goes out as one write."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if self._outbox:
                self._schedule_write()

    def write_now(self) -> None:
        """Write what is queued now rather than at the end of the tick, even inside :meth:`batch`."""
        if self._outbox and self._ready:
            self._write()

    @property
    def write_paused(self) -> bool:
        """Whether the socket's write buffer is full (producers should :meth:`wait_writable`)."""
        return self._link is not None and self._link.paused

    def was_replayed(self, future: asyncio.Future[Any]) -> bool:
        """Whether ``future``'s command was written again after a lost connection (it may have run twice)."""
        return future in self._replayed

    async def wait_writable(self) -> None:
        """Wait while the connection's write buffer is full (flow control for producers).

        Also ends when the connection is lost or closed: what is queued then waits in the outbox.
        """
        while self._link is not None and self._link.paused and not self._closing:
            self._writable.clear()
            await self._writable.wait()

    def _after_queue(self) -> None:
        if not self._ready or self._batching:
            self._schedule_write()
        elif len(self._outbox) >= FLUSH_AT:
            self._write()  # a long queue goes out now, so that Redis and the far side start on it
        elif not self._sent and not self._write_scheduled:
            self._write()  # an idle connection: write now, for latency
        else:
            self._schedule_write()  # under load: what is queued in this tick goes out together

    def _schedule_write(self) -> None:
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        link = self._link
        if not self._ready or link is None or link.paused or not self._outbox:
            return  # the outbox goes out once the connection is ready (or writable) again
        batch: list[_Sent] = []
        packed: list[bytes] = []
        outbox, self._outbox = self._outbox, []
        for command, future, flags, queued in outbox:
            if future is not None and future.cancelled():
                continue
            if callable(command):
                built = command()
                if built is None:
                    if future is not None:
                        future.cancel()
                    continue
                command = built
            try:  # packed one by one: a command that cannot be sent must not put the others out of step
                packed.append(pack_command(cast(Any, command if type(command) is tuple else tuple(command))))
            except (TypeError, ValueError) as exc:  # an argument of the wrong type, a string that is not UTF-8
                self._refuse(command, future, exc)
                continue
            batch.append((command, future, flags, queued))
        if not batch:
            return
        if not self._sent:
            self._busy_since = self._loop.time()
        self._sent.extend(batch)
        self.round_trips += 1
        link.write(b"".join(packed))

    @staticmethod
    def _refuse(command: Command, future: asyncio.Future[Any] | None, error: Exception) -> None:
        problem = MessageValidationError(f"cannot send {command_name(command)}: an argument is not text or a number")
        problem.__cause__ = error
        if future is None:
            logger.error("%s", problem)
        elif not future.done():
            future.set_exception(problem)

    # -- replies ---------------------------------------------------------------------------

    def _attach(self, link: Link) -> None:
        self._link = link
        link.on_reply = self._on_reply
        link.on_lost = self._on_lost
        link.on_writable = self._on_writable
        self._writable.set()  # a new link starts writable: nobody waits for the old one

    def _on_reply(self, reply: Any) -> None:
        entry = self._sent.popleft()
        future = entry[1]
        if isinstance(reply, ReplyError):
            if entry[2] & _RAW:
                if future is not None and not future.done():
                    future.set_result(reply)
            elif is_transient(reply):
                self._hold(entry, reply)
            elif future is None:
                logger.warning("%s sent without waiting failed: %s", command_name(entry[0]), reply)
            elif not future.done():
                future.set_exception(classify(reply, command_name(entry[0])))
        else:
            if self._outage_since is not None and not entry[2] & _RAW:
                self._outage_since = None  # a command went through: the outage is over
                self._refused_in_a_row = 0
            if future is not None and not future.done():
                future.set_result(reply)
        if not self._sent:
            if self._drained is not None:
                self._ready = False  # closing: nothing more is written; what is queued or held fails as not sent
                self._drained.set()
            elif not self._ready and self._held and self._link is not None:
                self._start_recovery()

    def _hold(self, entry: _Sent, reply: ReplyError) -> None:
        code = code_of(reply)
        if self._ready:
            if code in _WAIT_FIRST:
                self._refused_in_a_row += 1
            if code not in _WAIT_FIRST or self._refused_in_a_row == 1:  # once per outage, not per retry
                logger.warning("Redis refused a command with %s; holding commands until it is ready", code)
        self._ready = False
        self._held.append(entry)
        if code == "NOSCRIPT":
            self._reload_scripts = True
        if needs_reconnect(reply):
            self._need_primary = True
            if self._link is not None:
                self._link.abort()  # _on_lost follows

    def _on_writable(self) -> None:
        self._writable.set()
        self._schedule_write()

    def _on_lost(self, error: BaseException | None) -> None:
        self._ready = False
        self._link = None
        self._writable.set()  # producers waiting for the lost socket go on: their commands wait in the outbox
        replay: list[_Sent] = []
        for entry in self._sent:
            command, future, flags, _ = entry
            if flags & _REPLAY and not self._closing:
                replay.append(entry)
                if future is not None:
                    self._replayed.add(future)
            elif future is not None and not future.done():
                future.set_exception(
                    CommandOutcomeUnknownError(
                        f"connection to Redis lost after {command_name(command)} was sent; it may or may not have run",
                        url=self._spec.address,
                    )
                )
            elif future is None and not flags & _RAW:
                logger.warning("connection lost after %s (sent without waiting) was sent", command_name(command))
        self._sent.clear()
        self._held.extend(replay)
        if self._drained is not None:
            self._drained.set()
        if self._closing:
            return
        logger.warning(
            "Redis connection lost (%s); %d commands will be sent again once it is back",
            error,
            len(self._held) + len(self._outbox),
        )
        self._start_recovery()
        if self.on_outage is not None:
            self.on_outage()

    def take_queued(self) -> list[_Entry]:
        """Remove and return every command waiting to be written (held, then queued), with its future.

        For a cluster whose primary died: its commands go to the primary that took over its slots.
        """
        entries: list[_Entry] = [*self._held, *self._outbox]
        self._held, self._outbox = [], []
        return entries

    def adopt(self, entries: list[_Entry]) -> None:
        """Queue commands taken from another pipeliner (:meth:`take_queued`) before anything queued here."""
        self._outbox[:0] = entries
        if entries:
            self._schedule_write()

    # -- recovery --------------------------------------------------------------------------

    def _start_recovery(self) -> None:
        if self._recovering is None and not self._closing:
            self._recovering = self._loop.create_task(self._recover(), name=f"agentcomms-recover-{self._name}")

    async def _recover(self) -> None:
        if self._outage_since is None:
            self._outage_since = self._loop.time()
        attempt = 0
        try:
            if self._refused_in_a_row:  # PING answers while the cluster refuses: wait before sending again
                self._expire(NotReady(ReplyError("CLUSTERDOWN or TRYAGAIN: the Redis Cluster is not serving")))
                await asyncio.sleep(backoff(self._refused_in_a_row))
            while True:
                try:
                    if self._link is None:
                        link = await open_link(self._spec, name=self._name)
                        await self._load_scripts(link)
                        self._attach(link)
                        self._reload_scripts = False
                    await self._probe()
                    break
                except (LinkLost, NotReady, AgentCommsError) as exc:
                    self._expire(exc)
                except Exception as exc:  # a bug must not end recovery for good: start over on a new link
                    logger.exception("unexpected error while reconnecting to Redis; trying again")
                    if self._link is not None:
                        self._link.abort()
                    self._expire(exc)
                await asyncio.sleep(backoff(attempt))
                attempt += 1
            self._ready = True
            self.reconnects += 1
            logger.info("Redis at %s is back; sending %d held commands", self._spec.address, len(self._held))
            self._outbox[:0] = self._held
            self._held = []
            self._write()
        finally:
            self._recovering = None

    async def _load_scripts(self, link: Link) -> None:
        """Load every script on a new link (request mode), before any queued command uses it.

        Raises:
            LinkLost: the link died, or Redis did not answer within the connect timeout (a silent peer).
        """
        commands = [("SCRIPT", "LOAD", script.body) for script in ALL_SCRIPTS]
        try:
            async with asyncio.timeout(self._spec.connect_timeout):
                replies = await gather_replies(link.request(*commands))
        except TimeoutError:
            link.abort()
            raise LinkLost(f"Redis at {self._spec.address} did not answer SCRIPT LOAD") from None
        for reply in replies:
            if isinstance(reply, ReplyError):
                link.abort()
                if is_transient(reply):
                    raise NotReady(reply)
                raise classify(reply, "SCRIPT LOAD")

    async def _probe(self) -> None:
        """On the attached link: is Redis ready (and a primary, after READONLY)? Reload scripts if flushed."""
        link = self._link
        assert link is not None
        commands: list[Command] = [("PING",)]
        if self._need_primary:
            commands.append(("ROLE",))
        if self._reload_scripts:
            commands += [("SCRIPT", "LOAD", script.body) for script in ALL_SCRIPTS]
        futures: list[asyncio.Future[Any]] = [self._loop.create_future() for _ in commands]
        now = self._loop.time()
        if not self._sent:
            self._busy_since = now
        self._sent.extend((command, future, _RAW, now) for command, future in zip(commands, futures, strict=True))
        link.write(pack(commands))
        try:
            async with asyncio.timeout(self._spec.connect_timeout):
                replies = await gather_replies(futures)
        except TimeoutError:
            link.abort()  # a silent peer: a new connection
            raise LinkLost(f"Redis at {self._spec.address} did not answer the readiness probe") from None
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ReplyError):
                if is_transient(reply):
                    raise NotReady(reply)
                raise classify(reply, command_name(command))
            if command[0] == "ROLE" and reply and reply[0] != b"master":
                link.abort()  # still a replica: try a new connection (the address may move to the new primary)
                raise LinkLost(f"Redis at {self._spec.address} is a replica, not the primary")
        self._reload_scripts = False
        self._need_primary = False

    def _expire(self, cause: BaseException) -> None:
        """Fail the commands that have waited longer than ``reconnect_timeout`` during this outage."""
        now = self._loop.time()
        started = self._outage_since or now
        limit = now - self._reconnect_timeout
        reason = str(cause)
        logger.debug("Redis not usable yet: %s", reason)
        kept_held = [entry for entry in self._held if not self._expired(entry, started, limit, reason)]
        kept_outbox = [entry for entry in self._outbox if not self._expired(entry, started, limit, reason)]
        self._held, self._outbox = kept_held, kept_outbox

    def _expired(self, entry: _Entry | _Sent, started: float, limit: float, reason: str) -> bool:
        command, future, _, queued = entry
        if max(queued, started) >= limit:
            return False
        if future is None:
            logger.warning("gave up on a command sent without waiting after %gs: %s", self._reconnect_timeout, reason)
        elif not future.done():
            future.set_exception(
                BrokerConnectionError(
                    f"Redis unavailable for {self._reconnect_timeout:g}s ({reason})", url=self._spec.address
                )
            )
        return True

    def _fail_all(self, error: AgentCommsError) -> None:
        """Fail everything still waiting: ``error`` for what was never written, "outcome unknown" for the rest."""
        for command, future, _, _ in self._sent:
            if future is not None and not future.done():
                future.set_exception(
                    CommandOutcomeUnknownError(
                        f"closed while {command_name(command)} was sent and not answered; it may or may not have run",
                        url=self._spec.address,
                    )
                )
        for _, future, _, _ in [*self._held, *self._outbox]:
            if future is not None and not future.done():
                future.set_exception(error)
        self._held, self._outbox = [], []
        self._sent.clear()

    # -- watchdog --------------------------------------------------------------------------

    def _schedule_watchdog(self) -> None:
        self._watchdog = self._loop.call_later(1.0, self._check_silence)

    def _check_silence(self) -> None:
        if self._closed:
            return
        link = self._link
        if link is not None and self._sent:
            silent = self._loop.time() - max(link.last_data, self._busy_since)
            if silent > READ_TIMEOUT:
                logger.warning("Redis owes replies and sent nothing for %.0fs; replacing the connection", silent)
                link.abort()
        self._schedule_watchdog()
