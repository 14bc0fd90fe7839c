"""Connections that wait: a blocking reader (XREAD / XREADGROUP ... BLOCK) and the event-feed subscriber.

A blocking command holds its connection for the block time, so each reader has a link
of its own, apart from the pipeliner's. Both reconnect on demand: the loop that uses
them catches :class:`LinkLost` / :class:`NotReady`, backs off and calls again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from agentcomms.exceptions import AgentCommsError
from agentcomms.transport.cluster import Commands
from agentcomms.transport.errors import ReplyError, classify, is_transient, needs_reconnect
from agentcomms.transport.link import EncodableT, Link, LinkLost, NotReady, open_link, pack
from agentcomms.transport.pipeliner import command_name
from agentcomms.transport.spec import ConnectionSpec

__all__ = ["BlockingReader", "stop_blocked", "subscribe"]

logger = logging.getLogger(__name__)

MAX_BLOCK_MS = 5000
"""Longest XREAD / XREADGROUP BLOCK agentcomms uses."""

_REPLY_MARGIN = 10.0
"""Seconds a blocking command's reply may be late (beyond its BLOCK) before the link is taken for dead."""


class BlockingReader:
    """One connection for one command at a time, typically a blocking read; it reconnects on the next call."""

    def __init__(self, spec: ConnectionSpec | Callable[[], ConnectionSpec], *, name: str) -> None:
        self._spec = spec  # or where it is now: on a cluster, the primary that holds the streams it reads
        self._name = name
        self._link: Link | None = None
        self.client_id: int | None = None
        """Redis's id of the current connection (for ``CLIENT UNBLOCK``)."""
        self.busy = False
        """Whether a command is waiting for its reply now."""

    async def connect(self) -> Link:
        """The connection, made now if there is none (so that a caller can decide what to send with no wait after).

        Raises:
            LinkLost: cannot connect.
            NotReady: Redis is loading its data (or otherwise not ready).
        """
        link = self._link
        if link is None or link.closed:
            spec = self._spec() if callable(self._spec) else self._spec
            self._link = link = await open_link(spec, name=self._name)
            self.client_id = link.client_id
        return link

    async def call(self, *args: EncodableT, block_ms: int = 0) -> Any:
        """Send one command and return its reply; a blocking one may take ``block_ms`` plus a margin.

        Raises:
            LinkLost: not connected and cannot connect, or the connection died.
            NotReady: Redis refused with a "not now" error (LOADING, BUSY, READONLY ...).
            RedisCommandError: Redis refused the command (typed by ``errors.classify``).
        """
        link = await self.connect()
        [future] = link.request(args)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(block_ms / 1000 + _REPLY_MARGIN, link.abort)  # a dead peer: drop the link
        self.busy = True
        try:
            reply = await future
        finally:
            self.busy = False
            timer.cancel()
        if isinstance(reply, ReplyError):
            if needs_reconnect(reply):
                link.abort()
            if is_transient(reply):
                raise NotReady(reply)
            raise classify(reply, command_name(args))
        return reply

    def close(self) -> None:
        """Drop the connection (a blocked call ends with :class:`LinkLost`)."""
        if self._link is not None:
            self._link.abort()
            self._link = None


async def stop_blocked(
    task: asyncio.Task[Any], reader: BlockingReader, pipeliner: Commands, *, grace: float = 2.0
) -> None:
    """End ``task``, a loop whose stop flag is already set and which may be blocked in ``reader``.

    ``CLIENT UNBLOCK`` makes a blocked read return at once with nothing read, so the loop
    sees its flag. It is sent again every 50 ms while the loop still runs: an unblock that
    reaches Redis before the read it was meant for does nothing. After ``grace`` seconds
    the reader's connection is dropped; cancelling is the last resort.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done() and loop.time() < deadline:
        if reader.busy and reader.client_id is not None and pipeliner.connected:
            pipeliner.fire("CLIENT", "UNBLOCK", reader.client_id, replay=False)
        await asyncio.wait([task], timeout=0.05)
    if not task.done():
        logger.warning("a blocked read did not end after CLIENT UNBLOCK for %gs; dropping its connection", grace)
        reader.close()
        await asyncio.wait([task], timeout=1.0)
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, AgentCommsError, LinkLost, NotReady):
        await task
    reader.close()


async def subscribe(
    spec: ConnectionSpec, channel: str, *, name: str, also: Sequence[ConnectionSpec] = ()
) -> AsyncGenerator[bytes, None]:
    """Messages published on ``channel``, from its ``SUBSCRIBE`` on (lossy: Pub/Sub keeps nothing).

    The first item is ``b""`` once the subscription is confirmed. Ends with :class:`LinkLost`
    when the connection drops; the caller subscribes again. ``also``: more servers to subscribe
    on, whose copies are read and dropped: a Redis Cluster hands every message to each node's
    subscribers, and the scripts publish only if their own node has one (``PUBSUB NUMSUB``).
    """
    link = await open_link(spec, name=name)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    link.on_reply = queue.put_nowait
    link.on_lost = queue.put_nowait
    links = [link]

    def errors_only(item: Any) -> None:
        if isinstance(item, ReplyError):
            queue.put_nowait(item)

    try:
        for other in also:
            listener = await open_link(other, name=name)
            links.append(listener)
            listener.on_reply = errors_only
            listener.on_lost = queue.put_nowait
            listener.write(pack([("SUBSCRIBE", channel)]))
        link.write(pack([("SUBSCRIBE", channel)]))
        while True:
            item = await queue.get()
            if isinstance(item, ReplyError):  # before BaseException, which it is too: NOPERM is no lost link
                raise classify(item, "SUBSCRIBE")
            if isinstance(item, BaseException):
                raise LinkLost(str(item))
            kind = item[0]
            if kind == b"subscribe":
                yield b""
            elif kind == b"message":
                yield item[2]
    finally:
        for each in links:
            each.on_lost = None
            each.abort()
