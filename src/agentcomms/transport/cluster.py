"""Redis Cluster: one :class:`Pipeliner` per primary, each command sent to the primary that owns its key's slot.

Every key agentcomms uses carries a hash tag (``keys.py``): an agent's inboxes, dedup set,
dead letters and record share one slot, the registry's keys another, so every script and
multi-key command touches one slot (0 CROSSSLOT). :func:`connect_commands` asks the first
server for ``CLUSTER SLOTS``: a plain server gets a :class:`Pipeliner`, a cluster node a
:class:`ClusterPipeliner` that talks to every primary.

What happens when slots move: a ``MOVED`` or ``ASK`` refusal (the command did not run) makes
the cluster's slot map be read again and the command sent to the primary named, up to
``_MAX_REDIRECTS`` times. Only primaries are used (no reads from replicas).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import dataclasses
import functools
import logging
import weakref
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, Protocol

from agentcomms.exceptions import BrokerConnectionError, RedisCommandError
from agentcomms.transport.errors import ReplyError, classify
from agentcomms.transport.link import Command, EncodableT, LinkLost, NotReady, gather_replies, open_link
from agentcomms.transport.pipeliner import LazyCommand, Pipeliner, backoff
from agentcomms.transport.scripts import Script
from agentcomms.transport.spec import ConnectionSpec

__all__ = ["SLOTS", "ClusterPipeliner", "Commands", "command_key", "connect_commands", "key_slot"]

logger = logging.getLogger(__name__)

SLOTS = 16384
"""Hash slots of a Redis Cluster."""

_MAX_REDIRECTS = 5

_KEYLESS = frozenset(
    {
        b"PING", b"INFO", b"TIME", b"PUBLISH", b"CLIENT", b"SCRIPT", b"ROLE", b"CLUSTER", b"ACL", b"CONFIG",
        b"DBSIZE", b"FLUSHDB", b"FLUSHALL", b"WAIT", b"WAITAOF", b"PUBSUB", b"COMMAND", b"LASTSAVE",
    }
)  # fmt: skip
"""Commands that name no key: any primary may run them."""

_SUBCOMMAND_FIRST = frozenset({b"XGROUP", b"XINFO", b"OBJECT", b"MEMORY"})
"""Commands whose key follows a subcommand."""


def key_slot(key: str | bytes) -> int:
    """The hash slot of ``key``: CRC16 (XMODEM) of its hash tag (the part in the first ``{...}``) or of all of it."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def _word(arg: EncodableT) -> bytes:
    """A command's word, upper-case, as bytes (for comparing names)."""
    return (arg if isinstance(arg, bytes) else str(arg).encode()).upper()


def command_key(command: Command) -> EncodableT | None:
    """The key that decides where ``command`` runs (its first key), or ``None`` if it names none."""
    if not command:
        return None
    upper = _word(command[0])
    if upper in (b"EVALSHA", b"EVAL", b"FCALL"):
        return command[3] if len(command) > 3 and int(command[2]) > 0 else None
    if upper in (b"XREAD", b"XREADGROUP"):
        words = [_word(arg) for arg in command]
        return command[words.index(b"STREAMS") + 1] if b"STREAMS" in words else None
    if upper in _KEYLESS or len(command) < 2:
        return None
    if upper in _SUBCOMMAND_FIRST:  # XGROUP CREATE <key> ..., XINFO STREAM <key>, MEMORY USAGE <key>
        return command[2] if len(command) > 2 else None
    return command[1]


class Commands(Protocol):
    """What the broker, registry and subscriptions send commands through: a :class:`Pipeliner` or a cluster's."""

    @property
    def round_trips(self) -> int: ...  # noqa: D102 - documented on Pipeliner
    @property
    def reconnects(self) -> int: ...  # noqa: D102
    @property
    def connected(self) -> bool: ...  # noqa: D102 - documented on Pipeliner
    @property
    def cluster(self) -> bool: ...  # noqa: D102
    @property
    def write_paused(self) -> bool: ...  # noqa: D102
    async def aclose(self) -> None: ...  # noqa: D102
    def call(self, *args: EncodableT, replay: bool) -> asyncio.Future[Any]: ...  # noqa: D102
    def call_lazy(self, build: LazyCommand, *, replay: bool, key: str = "") -> asyncio.Future[Any]: ...  # noqa: D102
    def fire(self, *args: EncodableT, replay: bool) -> None: ...  # noqa: D102
    def script(  # noqa: D102
        self, script: Script, keys: Sequence[str], args: Sequence[EncodableT], *, replay: bool
    ) -> asyncio.Future[Any]: ...
    def batch(self) -> contextlib.AbstractContextManager[None]: ...  # noqa: D102
    def write_now(self) -> None: ...  # noqa: D102
    def was_replayed(self, future: asyncio.Future[Any]) -> bool: ...  # noqa: D102
    async def wait_writable(self) -> None: ...  # noqa: D102
    def node_for_key(self, key: str) -> Pipeliner: ...  # noqa: D102
    def spec_for_key(self, key: str) -> ConnectionSpec: ...  # noqa: D102


async def connect_commands(
    spec: ConnectionSpec, *, reconnect_timeout: float, name: str
) -> Pipeliner | ClusterPipeliner:
    """Connect to ``spec``: a :class:`Pipeliner`, or a :class:`ClusterPipeliner` if it is a Redis Cluster node.

    Raises:
        BrokerConnectionError: Redis cannot be reached now, or stayed not ready.
        RedisPermissionError: Redis refused the credentials.
    """
    pipeliner = Pipeliner(spec, reconnect_timeout=reconnect_timeout, name=name)
    await pipeliner.connect()
    try:
        slots = await pipeliner.call("CLUSTER", "SLOTS", replay=True)
    except RedisCommandError:  # "cluster support disabled" (or an ACL user that may not ask): one server
        return pipeliner
    except BaseException:
        await pipeliner.aclose()
        raise
    cluster = ClusterPipeliner(spec, reconnect_timeout=reconnect_timeout, name=name)
    try:
        await cluster.start(slots, seed=pipeliner)
    except BaseException:
        await cluster.aclose()
        await pipeliner.aclose()  # not taken over if the map was refused (closing twice is harmless)
        raise
    return cluster


class ClusterPipeliner:
    """Commands to a Redis Cluster: each to the pipeliner of the primary that owns its key's slot.

    Keyless commands go to the first primary. Callers use it as they use a :class:`Pipeliner`
    (:class:`Commands`); blocking readers connect to :meth:`spec_for_key`.
    """

    cluster = True

    def __init__(self, seed: ConnectionSpec, *, reconnect_timeout: float, name: str) -> None:
        self._seed = seed
        self._reconnect_timeout = reconnect_timeout
        self._name = name
        self._nodes: dict[tuple[str, int], Pipeliner] = {}
        self._slots: list[Pipeliner] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._replayed: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._applying = asyncio.Lock()
        self._watched: set[Pipeliner] = set()
        self.redirects = 0
        """MOVED / ASK refusals followed so far."""

    # -- the slot map ---------------------------------------------------------------------

    def _spec(self, host: bytes | str, port: int) -> ConnectionSpec:
        text = host.decode() if isinstance(host, bytes) else host
        if not text or text == "?":  # a node that does not know its own address: the one we reached it by
            text = self._seed.host or "localhost"
        return dataclasses.replace(self._seed, host=text, port=int(port), path=None)

    async def start(self, slots: list[Any], *, seed: Pipeliner | None = None) -> None:
        """Connect to every primary named in a ``CLUSTER SLOTS`` reply (``seed``: a pipeliner to reuse)."""
        await self._apply(slots, seed=seed)

    async def _apply(self, slots: list[Any], *, seed: Pipeliner | None = None) -> None:
        async with self._applying:
            await self._apply_now(slots, seed=seed)

    async def _apply_now(self, slots: list[Any], *, seed: Pipeliner | None = None) -> None:
        owners: list[Pipeliner | None] = [None] * SLOTS
        for entry in slots:  # [start, end, [host, port, id, ...], replicas ...]
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            spec = self._spec(primary[0], int(primary[1]))
            address = (spec.host or "", spec.port)
            node = self._nodes.get(address)
            if node is None:
                if seed is not None and (self._seed.host, self._seed.port) == address:
                    node, seed = seed, None
                else:
                    node = Pipeliner(spec, reconnect_timeout=self._reconnect_timeout, name=self._name)
                    await node.connect()
                node.on_outage = functools.partial(self._outage, node)
                self._nodes[address] = node
            owners[start : end + 1] = [node] * (end - start + 1)
        missing = sum(owner is None for owner in owners)
        if missing:
            raise BrokerConnectionError(
                f"the Redis Cluster serves {SLOTS - missing} of {SLOTS} slots; every slot needs a primary",
                url=self._seed.address,
            )
        self._slots = [owner for owner in owners if owner is not None]
        if seed is not None:  # the first server is a replica (or not in the map): not used
            await seed.aclose()
        serving = set(self._slots)
        for address, node in list(self._nodes.items()):
            if node not in serving:  # no longer a primary (failed over): its waiting commands go to the new owners
                del self._nodes[address]
                self._move(node.take_queued())
                await node.aclose()

    def _move(self, entries: list[Any]) -> None:
        """Queue commands taken from a former primary on the primaries that own their slots now, in their order."""
        by_node: dict[Pipeliner, list[Any]] = {}
        for command, future, flags, queued in entries:
            if callable(command):  # a command built at its write: build it now, to know its key
                built = command()
                if built is None:
                    if future is not None:
                        future.cancel()
                    continue
                command = built
            by_node.setdefault(self._node(command), []).append((command, future, flags, queued))
        for node, moved in by_node.items():
            node.adopt(moved)
        if entries:
            logger.warning("moved %d commands of a failed Redis Cluster primary to the new owners", len(entries))

    # -- a primary that dies ----------------------------------------------------------------

    def _outage(self, node: Pipeliner) -> None:
        """``node`` lost its connection: until it is back, watch the slot map for a replica taking its slots."""
        if self._closed or node in self._watched:
            return
        self._watched.add(node)
        self._spawn(self._watch(node))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task kept until it ends (cancelled by :meth:`aclose`)."""
        task = asyncio.get_running_loop().create_task(work, name=f"agentcomms-cluster-{self._name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, node: Pipeliner) -> None:
        attempt = 0
        try:
            while not self._closed and not node.connected and node in self._nodes.values():
                await asyncio.sleep(min(0.5, 0.1 * 2**attempt))
                attempt += 1
                await self._reread(skip=node)  # the node is dropped once the map no longer names it
        finally:
            self._watched.discard(node)

    async def _reread(self, *, skip: Pipeliner | None = None) -> BaseException | None:
        """Read the slot map from the first node that answers and apply it; ``None``, or the last failure.

        Each read is on a short-lived connection of its own: a node's pipeliner may be holding its commands
        (``CLUSTERDOWN`` while a replica takes over).
        """
        last: BaseException | None = BrokerConnectionError("no other node to ask", url=self._seed.address)
        for other in list(self._nodes.values()):
            if other is skip:
                continue
            try:
                await self._apply(await self._read_slots(other.spec))
                return None
            except (BrokerConnectionError, RedisCommandError, LinkLost, NotReady, TimeoutError) as exc:
                logger.debug("cluster slot map not read from %s: %s", other.spec.address, exc)
                last = exc
        return last

    async def refresh(self) -> None:
        """Read the slot map again (after ``MOVED``); concurrent callers share one read."""
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _refresh(self) -> None:
        for attempt in range(2):
            if (last := await self._reread()) is None:
                return
            await asyncio.sleep(backoff(attempt))
        raise BrokerConnectionError(f"cannot read the cluster's slot map: {last}", url=self._seed.address)

    async def _read_slots(self, spec: ConnectionSpec) -> list[Any]:
        """``CLUSTER SLOTS`` from the node at ``spec``, over a short-lived connection.

        Raises:
            LinkLost, NotReady, TimeoutError: the node cannot answer.
            RedisCommandError: it refused.
        """
        link = await open_link(spec, name=f"{self._name}.slots")
        try:
            async with asyncio.timeout(spec.connect_timeout):
                [reply] = await gather_replies(link.request(("CLUSTER", "SLOTS")))
        finally:
            link.close()
        if isinstance(reply, ReplyError):
            raise classify(reply, "CLUSTER SLOTS")
        return list(reply)

    def node_for_key(self, key: str) -> Pipeliner:
        """The pipeliner of the primary that owns ``key``'s slot."""
        return self._slots[key_slot(key)]

    def spec_for_key(self, key: str) -> ConnectionSpec:
        """The primary that owns ``key``'s slot (where a blocking read of ``key`` must connect)."""
        return self.node_for_key(key).spec

    @property
    def nodes(self) -> list[Pipeliner]:
        """One pipeliner per primary."""
        return list(self._nodes.values())

    def _node(self, command: Command) -> Pipeliner:
        key = command_key(command)
        if key is None:
            return self._slots[0]
        return self._slots[key_slot(key if isinstance(key, str | bytes) else str(key))]

    # -- the Pipeliner interface ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether every primary's connection is writing now."""
        return bool(self._nodes) and all(node.connected for node in self._nodes.values())

    @property
    def round_trips(self) -> int:
        """Writes so far, over every primary."""
        return sum(node.round_trips for node in self._nodes.values())

    @property
    def reconnects(self) -> int:
        """Reconnections so far, over every primary."""
        return sum(node.reconnects for node in self._nodes.values())

    @property
    def write_paused(self) -> bool:
        """Whether any primary's write buffer is full."""
        return any(node.write_paused for node in self._nodes.values())

    async def aclose(self) -> None:
        """Close every primary's pipeliner (see :meth:`Pipeliner.aclose`)."""
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(node.aclose() for node in self._nodes.values()))

    def call(self, *args: EncodableT, replay: bool) -> asyncio.Future[Any]:
        """Queue ``args`` on its key's primary (see :meth:`Pipeliner.call`); MOVED / ASK are followed."""
        node = self._node(args)
        return self._follow(node, node.call(*args, replay=replay), [args], replay)

    def call_lazy(self, build: LazyCommand, *, replay: bool, key: str = "") -> asyncio.Future[Any]:
        """Queue a command built at the write (see :meth:`Pipeliner.call_lazy`) on ``key``'s primary."""
        node = self.node_for_key(key)
        built: list[Command] = []  # the command, once it is built

        def build_and_keep() -> Command | None:
            command = build()
            if command is not None:
                built.append(command)
            return command

        return self._follow(node, node.call_lazy(build_and_keep, replay=replay), built, replay)

    def fire(self, *args: EncodableT, replay: bool) -> None:
        """Queue a command nobody waits for on its key's primary."""
        self._node(args).fire(*args, replay=replay)

    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[EncodableT], *, replay: bool
    ) -> asyncio.Future[Any]:
        """Queue an EVALSHA of ``script`` on the primary of its first key."""
        return self.call("EVALSHA", script.sha, len(keys), *keys, *args, replay=replay)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold writes to every primary while a batch is queued."""
        with contextlib.ExitStack() as stack:
            for node in list(self._nodes.values()):
                stack.enter_context(node.batch())
            yield

    def write_now(self) -> None:
        """Write what is queued for every primary now."""
        for node in self._nodes.values():
            node.write_now()

    def was_replayed(self, future: asyncio.Future[Any]) -> bool:
        """Whether ``future``'s command was written again after a lost connection."""
        return future in self._replayed

    async def wait_writable(self) -> None:
        """Wait while any primary's write buffer is full."""
        for node in list(self._nodes.values()):
            await node.wait_writable()

    # -- redirects -------------------------------------------------------------------------

    def _follow(
        self, node: Pipeliner, inner: asyncio.Future[Any], command: list[Command], replay: bool
    ) -> asyncio.Future[Any]:
        """A future of ``inner``'s outcome, except that a MOVED / ASK refusal sends the command where it belongs.

        ``command``: a list that holds the command (a lazy one's once it was built).
        """
        outer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(finished: asyncio.Future[Any], redirects: int = 0, sent_to: Pipeliner = node) -> None:
            if outer.done():
                return
            if finished.cancelled():
                outer.cancel()
                return
            error = finished.exception()
            if error is None:
                if sent_to.was_replayed(finished):
                    self._replayed.add(outer)
                outer.set_result(finished.result())
                return
            code = getattr(error, "code", "")
            if code in ("MOVED", "ASK") and command and redirects < _MAX_REDIRECTS and not self._closed:
                self.redirects += 1
                self._spawn(self._resend(command[0], replay, redirects + 1, done))
                return
            outer.set_exception(error)

        inner.add_done_callback(done)
        return outer

    async def _resend(self, command: Command, replay: bool, redirects: int, done: Any) -> None:
        try:
            await self.refresh()
        except BrokerConnectionError as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            done(failed, redirects)
            return
        node = self._node(command)
        node.call(*command, replay=replay).add_done_callback(lambda finished: done(finished, redirects, node))
