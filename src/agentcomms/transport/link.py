"""One connection to Redis, on asyncio's Protocol API: commands packed and parsed with hiredis.

A :class:`Link` writes packed commands and hands every reply, in order, to a callback as
soon as its bytes arrive (``data_received``): no reader task, no per-reply await. Until
an owner installs its own callback, replies resolve the futures of :meth:`Link.request`
in order, which is all the handshake and the blocking readers need.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis

from agentcomms.exceptions import RedisPermissionError
from agentcomms.transport.errors import ProtocolError, ReplyError, classify, code_of, is_transient
from agentcomms.transport.spec import ConnectionSpec
from agentcomms.transport.tls import CERTFILE, KEYFILE, describe_tls_error

__all__ = ["EncodableT", "Link", "LinkLost", "NotReady", "gather_replies", "open_link", "pack"]

logger = logging.getLogger(__name__)

EncodableT = bytes | str | int | float

Command = Sequence[EncodableT]


class LinkLost(ConnectionError):
    """The connection closed or failed (internal: owners reconnect or turn it into a typed error)."""


class NotReady(Exception):
    """Redis answered, but is not ready to serve (loading, busy, a replica): try again later (internal)."""

    def __init__(self, reply: ReplyError) -> None:
        self.reply = reply
        self.code = code_of(reply)
        super().__init__(str(reply))


def pack(commands: Sequence[Command]) -> bytes:
    """RESP bytes of ``commands`` (hiredis packs in C)."""
    # hiredis's stub types the argument as a tuple of str/bytes; ints and floats are packed fine
    return b"".join(hiredis.pack_command(cast(Any, tuple(c))) for c in commands)


class Link(asyncio.Protocol):
    """A Redis connection; replies go to ``on_reply`` in order (by default: :meth:`request`'s futures)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)
        self._futures: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.on_reply: Callable[[Any], None] = self._resolve_next
        self.on_lost: Callable[[BaseException | None], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        self.paused = False
        self.closed = False
        self.client_id: int | None = None
        self.last_data = loop.time()
        self.lost_cause: BaseException | None = None
        """What ended the connection, as the transport reported it (a TLS alert, a reset ...)."""

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (asyncio calls this)."""
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply that arrived and hand each on, in order."""
        self.last_data = self._loop.time()
        parser = self._parser
        parser.feed(data)
        try:
            while (reply := parser.gets()) is not False:  # False: no complete reply left (RESP2 has no booleans)
                self.on_reply(reply)
        except ProtocolError as exc:  # the connection is out of step: drop it
            logger.warning("Redis sent bytes that are not RESP (%s); dropping the connection", exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail what waits for a reply and tell the owner."""
        self.closed = True
        self._transport = None
        self.lost_cause = exc
        error = LinkLost(f"connection to Redis lost: {exc}" if exc else "Redis closed the connection")
        futures, self._futures = self._futures, collections.deque()
        for future in futures:
            if not future.done():
                future.set_exception(error)
        if self.on_lost is not None:
            self.on_lost(error)

    def pause_writing(self) -> None:
        """The socket's buffer is full: the owner holds further writes."""
        self.paused = True

    def resume_writing(self) -> None:
        """The buffer drained: the owner may write again."""
        self.paused = False
        if self.on_writable is not None:
            self.on_writable()

    # -- use -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write bytes (the caller keeps replies and commands in step)."""
        if self._transport is None:
            raise LinkLost("connection to Redis is closed")
        self._transport.write(data)

    def request(self, *commands: Command) -> list[asyncio.Future[Any]]:
        """Write ``commands``; per command a future of its raw reply (a :class:`ReplyError` is a result, not raised)."""
        futures = [self._loop.create_future() for _ in commands]
        self._futures.extend(futures)
        self.write(pack(commands))
        return futures

    def _resolve_next(self, reply: Any) -> None:
        future = self._futures.popleft()
        if not future.done():
            future.set_result(reply)

    def abort(self) -> None:
        """Drop the connection now (``connection_lost`` follows)."""
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close after writing what is buffered."""
        if self._transport is not None:
            self._transport.close()


async def gather_replies(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The raw replies of ``futures`` in order (a :class:`ReplyError` is a reply), or the link's failure.

    Every future's outcome is read first, so none is left with an error nobody retrieved.
    """
    if futures:
        await asyncio.wait(futures)
    failures = [error for future in futures if (error := future.exception()) is not None]
    if failures:
        raise failures[0]
    return [future.result() for future in futures]


def _why(spec: ConnectionSpec, link: Link, exc: BaseException, *, connected: bool, timeout: float) -> str:
    """Why a connection attempt failed, in words; a TLS failure says it was TLS.

    Args:
        spec: the server.
        link: the attempt's link (``lost_cause``: what the transport reported).
        exc: what the attempt raised.
        connected: whether TCP (and TLS) were established.
        timeout: the attempt's time limit.
    """
    cause = link.lost_cause if isinstance(exc, LinkLost) and link.lost_cause is not None else exc
    if isinstance(cause, ssl.SSLError):
        return describe_tls_error(cause)
    if spec.ssl_context is not None and not connected and isinstance(exc, TimeoutError):
        return f"no TLS handshake within {timeout:g}s (is this the server's TLS port?)"
    if (
        spec.ssl_context is not None
        and connected
        and isinstance(cause, ConnectionResetError | BrokenPipeError | EOFError | LinkLost)
    ):
        # Under TLS 1.3 the server judges the client's certificate after the client's side of the
        # handshake is done; its alert may be lost when our first write meets the reset that follows.
        return (
            f"the server closed the TLS connection right after the handshake ({cause}): most likely it requires "
            f"a client certificate ({CERTFILE} and {KEYFILE}) or refused this one"
        )
    return str(exc) or type(exc).__name__


async def find_primary(spec: ConnectionSpec, *, timeout: float) -> ConnectionSpec:
    """Ask ``spec``'s sentinels, in order, where the primary of its service is; ``spec`` with that address.

    Raises:
        LinkLost: no sentinel answered with an address.
    """
    problems: list[str] = []
    for host, port in spec.sentinels:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(pack([("SENTINEL", "GET-MASTER-ADDR-BY-NAME", spec.service)]))
                parser = hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)
                while (reply := parser.gets()) is False:
                    data = await reader.read(65536)
                    if not data:
                        raise EOFError("the sentinel closed the connection")
                    parser.feed(data)
        except (OSError, EOFError, TimeoutError, ProtocolError) as exc:
            problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            if writer is not None:
                writer.close()
        if isinstance(reply, ReplyError) or not reply:
            problems.append(f"{host}:{port}: {reply or 'does not know ' + repr(spec.service)}")
            continue
        address = (reply[0].decode(), int(reply[1]))
        return dataclasses.replace(spec, host=address[0], port=address[1], sentinels=())
    raise LinkLost(f"no sentinel says where the primary of {spec.service!r} is ({'; '.join(problems)})")


async def open_link(spec: ConnectionSpec, *, name: str, timeout: float | None = None) -> Link:
    """Connect, log in, select the database and name the connection; returns a link in request mode.

    With sentinels (``redis+sentinel://``) the primary is looked up first, and the link is
    refused (:class:`LinkLost`) if the server found is not a primary (a failover under way).

    With TLS (``rediss://``) the certificate is checked against the URL's host name or IP
    address; a TLS failure is described as one (:func:`describe_tls_error`), whether it
    comes in the handshake or, for a client certificate the server refuses under TLS 1.3,
    as an alert on the first read.

    Raises:
        LinkLost: cannot connect (refused, unreachable, timed out, TLS refused, closed during the handshake).
        RedisPermissionError: Redis refused the credentials.
        NotReady: Redis is loading its data (or otherwise not ready).
    """
    timeout = timeout or spec.connect_timeout
    if not spec.sentinels:
        return await _open_link(spec, name=name, timeout=timeout)
    primary = await find_primary(spec, timeout=timeout)
    link = await _open_link(primary, name=name, timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            [role] = await gather_replies(link.request(("ROLE",)))
    except BaseException:
        link.abort()
        raise
    if isinstance(role, ReplyError) or not role or role[0] != b"master":
        link.abort()
        raise LinkLost(f"Redis at {primary.address}, named primary by the sentinels, is not one (failing over?)")
    return link


async def _open_link(spec: ConnectionSpec, *, name: str, timeout: float) -> Link:
    loop = asyncio.get_running_loop()
    link = Link(loop)
    connected = False
    try:
        async with asyncio.timeout(timeout):
            if spec.path is not None:
                await loop.create_unix_connection(lambda: link, spec.path)
            else:
                host = spec.host or "localhost"
                server_hostname = host if spec.ssl_context is not None else None
                await loop.create_connection(
                    lambda: link, host, spec.port, ssl=spec.ssl_context, server_hostname=server_hostname
                )
                sock = link._transport.get_extra_info("socket") if link._transport else None
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            connected = True
            commands: list[Command] = []
            if spec.password is not None:
                commands.append(("AUTH", spec.username, spec.password) if spec.username else ("AUTH", spec.password))
            if spec.db:
                commands.append(("SELECT", spec.db))
            commands += [("CLIENT", "SETNAME", name), ("CLIENT", "ID"), ("PING",)]
            replies = await gather_replies(link.request(*commands))
    except (OSError, TimeoutError) as exc:
        link.abort()
        raise LinkLost(
            f"cannot connect to Redis at {spec.address}: {_why(spec, link, exc, connected=connected, timeout=timeout)}"
        ) from None
    except BaseException:  # cancelled while connecting or logging in: the half-made connection goes too
        link.abort()
        raise
    for command, reply in zip(commands, replies, strict=True):
        if isinstance(reply, ReplyError):
            link.abort()
            if is_transient(reply):
                raise NotReady(reply)
            error = classify(reply, str(command[0]))
            if isinstance(error, RedisPermissionError) or command[0] == "AUTH":
                raise RedisPermissionError(
                    f"Redis at {spec.address} refused the login: {reply}", code=code_of(reply), command="AUTH"
                )
            raise error
    link.client_id = int(replies[-2])
    return link
