"""MessageBroker: delivery over Redis Streams. Delivery semantics live here and in ``subscription``.

* Each agent id has an inbox stream per priority and one consumer group; instances of an
  agent id share the group, so each message reaches one of them.
* A send is one Lua call (dedup check, inbox bound, XADD), pipelined with whatever else
  is being sent at the same moment.
* Requests carry ``reply_to`` (the caller's reply stream) and a correlation id; replies are
  read by one blocking reader per broker and matched to waiting callers.

The broker is the delivery layer: it does not consult the registry. ``MessageSender`` and
``BaseAgent`` refuse recipients the registry has never seen (see ``sender``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError

from agentcomms import deadletters, keys
from agentcomms.deadletters import DeadLetter
from agentcomms.embedded import EmbeddedLease, acquire_embedded
from agentcomms.exceptions import (
    AgentCommsError,
    BrokerClosedError,
    ConfigError,
    InboxFullError,
    MessageTooLargeError,
    MessageValidationError,
    NotDurableError,
    PermissionDeniedError,
    RedisPermissionError,
    RequestTimeoutError,
    SecurityError,
)
from agentcomms.record import MessageRecord
from agentcomms.schemas import AgentMessage, AgentResponse
from agentcomms.security.guard import Security
from agentcomms.settings import Settings, redact_url
from agentcomms.subscription import Handler, Subscription
from agentcomms.transport import (
    FLUSH_AT,
    MAX_BLOCK_MS,
    BlockingReader,
    ClusterPipeliner,
    Commands,
    ConnectionSpec,
    LinkLost,
    NotReady,
    backoff,
    connect_commands,
    key_slot,
    stop_blocked,
    subscribe,
)
from agentcomms.transport.link import Command
from agentcomms.transport.scripts import SEND

__all__ = ["BrokerStats", "DeadLetter", "Handler", "MessageBroker", "PublishResult"]

logger = logging.getLogger(__name__)

_SEND_BATCH = 128
"""Messages to one inbox sent by one SEND call of ``publish_many`` at the most."""

_MAX_TIMEOUT = 86_400.0
"""The longest ``response_timeout`` a message may carry (its schema's bound)."""

_TRIM_EVERY = 256
"""Replies read before the reply stream is trimmed (it is trimmed sooner when it goes idle)."""


_dump_message = AgentMessage.__pydantic_serializer__.to_json
_validate_response = AgentResponse.__pydantic_validator__.validate_json

_Outgoing = tuple[AgentMessage, bytes, bytes]
"""A message ready to send: the message, its JSON body, its authentication token (empty: none)."""

_OpenSend = list[tuple[AgentMessage, bytes, bytes, asyncio.Future[Any]]]
"""Messages to one inbox waiting for their shared SEND call to be written."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a message went: its stream entry id, or ``duplicate=True`` (and no entry id) if it was accepted before.

    The entry id is also empty for a message stored by a send that was repeated after a
    lost connection (the first one ran; its answer was lost with the connection).
    """

    message_id: str
    recipient_id: str
    entry_id: str
    duplicate: bool = False


@dataclass(slots=True)
class BrokerStats:
    """Counters of one broker instance since it connected."""

    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    requests: int = 0
    replies_received: int = 0
    replies_unmatched: int = 0
    replies_refused: int = 0
    """Replies dropped because they were not authenticated by the request's recipient (security on)."""
    timeouts: int = 0
    round_trips: int = 0
    reconnects: int = 0


_warned_insecure = False


def _same_slot_stream(sender_id: str, slot: int) -> str:
    """A new reply stream of ``sender_id`` in hash slot ``slot`` (a cluster: one XREAD reads a broker's streams).

    Its suffix is drawn until the stream's slot is ``slot``: about 16,384 CRC16s, once per sender id.
    """
    base = uuid.uuid4().hex[:8]
    for n in range(1_000_000):
        stream = keys.replies(f"{sender_id}.{base}{n:x}")
        if key_slot(stream) == slot:
            return stream
    raise ConfigError(f"no reply stream of {sender_id!r} in slot {slot}")  # pragma: no cover - CRC16 covers every slot


def _local(spec: ConnectionSpec) -> bool:
    """Whether the server is on this machine (a unix socket or a loopback address)."""
    if spec.path is not None:
        return True
    host = (spec.host or "").strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _warn_insecure(spec: ConnectionSpec) -> None:
    global _warned_insecure
    _warned_insecure = True
    logger.warning(
        "SECURITY: connected to Redis at %s, not on this machine, without identities (AGENTCOMMS_SECURITY is "
        "off): anyone who can reach this Redis can send as any agent, read every message and answer in any "
        "agent's name. See docs/security.md.",
        spec.address,
    )


class MessageBroker:
    """Sends, receives and answers agent messages over Redis Streams.

    Args:
        redis_url: where Redis is; default ``settings.redis_url``, else the embedded
            redis-server under ``settings.data_dir`` (started if none is running there).
        settings: tuning and limits; default read from the environment.
        client_name: a readable prefix for this instance's id (shown in reply stream names).

    Use as ``async with MessageBroker() as broker:`` or call :meth:`connect` and :meth:`close`.
    """

    def __init__(
        self, redis_url: str | None = None, *, settings: Settings | None = None, client_name: str = "client"
    ) -> None:
        self.settings = settings or Settings()
        self._url = redis_url or self.settings.redis_url
        self._uses_embedded = self._url is None
        self.client_id = f"{client_name}.{uuid.uuid4().hex[:12]}"
        self.reply_stream = keys.replies(self.client_id)
        if not keys.is_reply_stream(self.reply_stream):  # agents would refuse to answer there
            raise ConfigError(
                f"client_name {client_name!r} cannot name a reply stream: use 1-140 of A-Za-z0-9_.:@- "
                "starting with a letter, digit or _"
            )
        self._spec: ConnectionSpec | None = None
        self._pipeliner: Commands | None = None
        self._embedded: EmbeddedLease | None = None
        self._reply_reader: asyncio.Task[None] | None = None
        self._replies: BlockingReader | None = None  # made at connect
        self._closing = False
        self._closed_event = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[AgentResponse]] = {}
        self._expected: dict[str, tuple[str, str]] = {}  # correlation -> (sender, recipient): whose reply to accept
        self._security: Security | None = None
        self._sender_streams: dict[str, str] = {}  # sender id -> its reply stream (security on)
        self._reply_positions: dict[str, str] = {self.reply_stream: "0-0"}
        self._open_sends: dict[str, _OpenSend] = {}
        self._subscriptions: set[Subscription] = set()
        self._stats = BrokerStats()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path | None:
        """The embedded server's folder, when this broker uses it."""
        return self.settings.data_dir if self._uses_embedded else None

    @property
    def url(self) -> str:
        """The Redis URL in use, with any password replaced by ``***``."""
        if self._url is None:
            raise BrokerClosedError("broker is not connected yet")
        return redact_url(self._url)

    @property
    def embedded(self) -> bool:
        """Whether this broker uses the embedded redis-server (no URL was given)."""
        return self._uses_embedded

    @property
    def connected(self) -> bool:
        """Whether :meth:`connect` succeeded and :meth:`close` has not been called."""
        return self._pipeliner is not None

    async def connect(self) -> Self:
        """Connect to Redis (starting the embedded server if no URL is set).

        A Redis that is still loading its data is waited for, up to ``reconnect_timeout``.

        A ``rediss://`` URL connects with TLS: the server's certificate is verified against
        ``REDIS_SSL_CA_CERTS`` (default: the system's CAs) and must name the URL's host or IP
        address; ``REDIS_SSL_CERTFILE`` / ``REDIS_SSL_KEYFILE`` are this client's certificate.
        With ``AGENTCOMMS_REQUIRE_TLS`` a ``redis://`` URL is refused.

        Raises:
            BrokerConnectionError: Redis does not answer, or the TLS handshake failed (the message says why).
            RedisPermissionError: Redis refused the credentials.
            ConfigError: the URL is not a Redis URL, is not ``rediss://`` while TLS is required,
                or a certificate or key file cannot be used.
        """
        if self._pipeliner is not None:
            return self
        if self._uses_embedded and self._embedded is None:
            # a lease on the folder's shared server: it outlives this process while others use it
            self._embedded = await asyncio.to_thread(
                acquire_embedded, self.settings.data_dir, binary=self.settings.redis_server
            )
            self._url = self._embedded.url
        password = self.settings.redis_password.get_secret_value() if self.settings.redis_password else None
        assert self._url is not None
        try:
            settings, tls = self.settings, not self._uses_embedded  # the embedded server is on this machine
            spec = ConnectionSpec.from_url(
                self._url,
                password=password,
                username=settings.redis_username if tls else None,
                db=settings.redis_db,
                ssl_ca_certs=settings.redis_ssl_ca_certs if tls else None,
                ssl_certfile=settings.redis_ssl_certfile if tls else None,
                ssl_keyfile=settings.redis_ssl_keyfile if tls else None,
                require_tls=settings.require_tls and tls,
            )
            pipeliner = await connect_commands(
                spec, reconnect_timeout=self.settings.reconnect_timeout, name=self.client_id
            )
        except BaseException:
            self._release_embedded()
            raise
        try:
            self._security = await self._secure(spec, pipeliner)
        except BaseException:
            await pipeliner.aclose()
            self._release_embedded()
            raise
        self._spec, self._pipeliner = spec, pipeliner
        where = functools.partial(pipeliner.spec_for_key, self.reply_stream)  # on a cluster, it may move
        self._replies = BlockingReader(where, name=f"{self.client_id}.replies")
        self._closing = False
        self._closed_event.clear()
        self._reply_reader = None  # a reader of an earlier connection has ended with it
        logger.info("broker %s connected to %s", self.client_id, spec.address)
        return self

    initialize = connect
    """The seed's name for :meth:`connect`."""

    async def _secure(self, spec: ConnectionSpec, pipeliner: Commands) -> Security | None:
        """With ``AGENTCOMMS_SECURITY=on``: identities, trust store, the server's clock. Else a warning off loopback."""
        if self.settings.security != "on":
            if not _local(spec) and not _warned_insecure:
                _warn_insecure(spec)
            return None
        security = Security(self.settings, pipeliner)
        await security.sync_clock()
        await security.check_enrolled()
        return security

    @property
    def security(self) -> Security | None:
        """Identities, trust store and keys in use, when ``AGENTCOMMS_SECURITY=on``."""
        return self._security

    async def close(self) -> None:
        """Stop every subscription (finishing handlers in hand), then disconnect."""
        for subscription in list(self._subscriptions):
            await subscription.stop()
        self._closing = True
        self._closed_event.set()
        if self._reply_reader is not None and self._replies is not None and self._pipeliner is not None:
            await stop_blocked(self._reply_reader, self._replies, self._pipeliner.node_for_key(self.reply_stream))
            self._reply_reader = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrokerClosedError("broker closed while waiting for a reply"))
        self._waiting.clear()
        if self._pipeliner is not None:
            await self._pipeliner.aclose()
            self._pipeliner = None
        self._release_embedded()

    def _release_embedded(self) -> None:
        if self._embedded is not None:
            self._embedded.release()  # the server stops when its last user is gone
            self._embedded = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def pipeliner(self) -> Commands:
        """The pipelined connection every ordinary command goes through (shared with subscriptions and the registry).

        On a Redis Cluster, one per primary behind one interface (``transport.ClusterPipeliner``).
        """
        if self._pipeliner is None:
            raise BrokerClosedError("broker is not connected: call connect() or use `async with`")
        return self._pipeliner

    @property
    def spec(self) -> ConnectionSpec:
        """The Redis server and credentials in use."""
        if self._spec is None:
            raise BrokerClosedError("broker is not connected: call connect() or use `async with`")
        return self._spec

    @property
    def stats(self) -> BrokerStats:
        """A snapshot of this instance's counters."""
        snapshot = BrokerStats(**asdict(self._stats))
        if self._pipeliner is not None:
            snapshot.round_trips = self._pipeliner.round_trips
            snapshot.reconnects = self._pipeliner.reconnects
        return snapshot

    # -- sending ---------------------------------------------------------------------------

    def _encode(self, message: AgentMessage) -> bytes:
        body = _dump_message(message, exclude_none=True)  # absent means None: ~60 bytes less per message
        if len(body) > self.settings.max_message_bytes:
            self._stats.rejected += 1
            raise MessageTooLargeError(
                size=len(body), limit=self.settings.max_message_bytes, message_id=message.message_id
            )
        return body

    def _outgoing(self, message: AgentMessage) -> _Outgoing:
        """The message, its body and (with security on) its token; the message was prepared (keys, seal)."""
        body = self._encode(message)
        return message, body, (self._security.token(message, body) if self._security is not None else b"")

    async def _prepare(self, message: AgentMessage, seal: bool | None) -> AgentMessage:
        """With security on: the sender's identity checked, keys agreed with the recipient, the payload sealed."""
        if self._security is None:
            if seal:
                raise SecurityError("sealing needs AGENTCOMMS_SECURITY=on (identities and a trust store)")
            return message
        return await self._security.prepare(message, seal_it=seal)

    def _ready_to_sign(self, message: AgentMessage, seal: bool | None) -> bool:
        """Whether a message needs no preparation: keys with its recipient agreed already, nothing to seal."""
        return self._security is not None and self._security.ready(message, seal)

    def _send_command(self, batch: Sequence[_Outgoing], *, inbox_ttl: float | None = None) -> Command:
        """The SEND call for messages to the same inbox (same recipient and priority).

        Tokens travel only with security on (a script argument per message costs Redis time).
        """
        settings = self.settings
        first = batch[0][0]
        recipient = first.recipient_id
        tokens = (token for _, _, token in batch) if self._security is not None else ()
        return (
            "EVALSHA",
            SEND.sha,
            3,
            keys.inbox(recipient, first.payload.priority),
            keys.dedup(recipient),
            keys.dead_letters(recipient),
            settings.max_inbox_length,
            int(settings.dedup_window * 1000),
            keys.EVENTS_CHANNEL if settings.event_feed else "",
            len(batch),
            int(inbox_ttl * 1000) if inbox_ttl else 0,
            *(m.message_id for m, _, _ in batch),
            *(body for _, body, _ in batch),
            *tokens,
        )

    def _queue_sends(self, batch: Sequence[_Outgoing], *, inbox_ttl: float | None = None) -> asyncio.Future[Any]:
        """Queue one SEND call for ``batch`` as it is (messages to one inbox)."""
        first = batch[0][0]
        # a send still open for this inbox takes no more messages: they would overtake this batch
        self._open_sends.pop(keys.inbox(first.recipient_id, first.payload.priority), None)
        # safe to repeat after a lost connection: the dedup set makes a repeated message a duplicate
        sent = self.pipeliner.call(*self._send_command(batch, inbox_ttl=inbox_ttl), replay=True)
        sent.add_done_callback(functools.partial(self._hostile_ids_cleared, first.recipient_id))
        return sent

    def _send(self, message: AgentMessage, body: bytes, token: bytes) -> asyncio.Future[Any]:
        """Queue one message; those to the same inbox in one event-loop tick share one SEND call.

        The future resolves to the message's own reply from the script: its entry id, ``dup`` or ``full <length>``.
        """
        inbox = keys.inbox(message.recipient_id, message.payload.priority)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = self._open_sends.get(inbox)
        if batch is not None:
            batch.append((message, body, token, future))
            if len(batch) >= FLUSH_AT:
                del self._open_sends[inbox]
                self.pipeliner.write_now()
            return future
        batch = [(message, body, token, future)]
        self._open_sends[inbox] = batch
        # built when written: on an idle connection at once (a batch of one), under load at the end of the tick
        sent = self.pipeliner.call_lazy(functools.partial(self._close_send, inbox, batch), replay=True, key=inbox)
        sent.add_done_callback(functools.partial(self._answer_sends, inbox, batch))
        return future

    def _close_send(self, inbox: str, batch: _OpenSend) -> Command | None:
        if self._open_sends.get(inbox) is batch:
            del self._open_sends[inbox]
        batch[:] = [item for item in batch if not item[3].cancelled()]  # callers that gave up before the write
        return self._send_command([(m, b, t) for m, b, t, _ in batch]) if batch else None

    def _answer_sends(self, inbox: str, batch: _OpenSend, done: asyncio.Future[Any]) -> None:
        """Hand each message of a shared SEND call its own reply (or the call's error).

        The call may fail before it was ever built (Redis unreachable for ``reconnect_timeout``):
        then the batch is closed here, so later sends to the inbox start a new one.
        """
        if self._open_sends.get(inbox) is batch:
            del self._open_sends[inbox]
        if done.cancelled():
            return  # nothing was sent: every caller had given up
        error = done.exception()
        if error is None:
            replies = self._send_replies(done)
            self._hostile_ids_cleared(batch[0][0].recipient_id if batch else "", done)
        else:
            replies = [error] * len(batch)
        for (_, _, _, future), reply in zip(batch, replies, strict=False):
            if future.done():
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _hostile_ids_cleared(self, recipient: str, done: asyncio.Future[Any]) -> None:
        """The SEND script's last element: entries it moved out of the way (an id that blocked every send)."""
        if done.cancelled() or done.exception() is not None:
            return
        replies = done.result()
        moved = int(replies[-1]) if replies and isinstance(replies[-1], int) else 0
        if moved:
            self.pipeliner.fire("SADD", keys.DEAD_LETTER_INDEX, recipient, replay=True)
            logger.warning(
                "inbox of %s held %d entries dated in the future; moved to its dead letters", recipient, moved
            )

    def _send_replies(self, done: asyncio.Future[Any]) -> list[Any]:
        """A SEND call's per-message replies; ``dup`` becomes ``sent`` if the call was written twice.

        After a lost connection a SEND is sent again; if the first one had run, its messages
        come back ``dup``: they were stored by this very call, not before it.
        """
        replies: list[Any] = done.result()
        if self.pipeliner.was_replayed(done):
            return [b"sent" if reply == b"dup" else reply for reply in replies]
        return replies

    def _sent(self, message: AgentMessage, reply: bytes) -> PublishResult:
        """The result of one message from its SEND call's reply: an entry id, ``dup``, ``full <length>`` or ``sent``.

        ``sent`` (see :meth:`_send_replies`): stored, its entry id unknown.
        """
        if reply == b"sent":
            self._stats.sent += 1
            return PublishResult(message.message_id, message.recipient_id, "")
        if reply == b"dup":
            self._stats.duplicates += 1
            logger.debug("message %s to %s is a duplicate; dropped", message.message_id, message.recipient_id)
            return PublishResult(message.message_id, message.recipient_id, "", duplicate=True)
        if reply.startswith(b"full"):
            self._stats.rejected += 1
            length = int(reply.split()[1])
            raise InboxFullError(agent_id=message.recipient_id, length=length, limit=self.settings.max_inbox_length)
        self._stats.sent += 1
        return PublishResult(message.message_id, message.recipient_id, reply.decode())

    async def publish_message(
        self, message: AgentMessage, *, inbox_ttl: float | None = None, seal: bool | None = None
    ) -> PublishResult:
        """Put ``message`` into its recipient's inbox (durable once this returns).

        A message whose ``message_id`` was accepted within the dedup window is not added
        again: the result says ``duplicate=True``. ``inbox_ttl`` (seconds) makes the inbox
        expire that long after this send unless a consumer starts reading it: for
        recipients the registry does not know (see ``MessageSender``). With security on the
        message is authenticated, and sealed when ``seal`` is true (``None``: when its
        intent is one of ``AGENTCOMMS_SEALED_INTENTS``).

        Raises:
            MessageTooLargeError: the message is over ``max_message_bytes``.
            InboxFullError: the recipient has ``max_inbox_length`` messages waiting.
            NotDurableError: ``durable_replicas`` is set and fewer replicas confirmed the message in time.
            RedisOutOfMemoryError: Redis is at ``maxmemory``; nothing was stored.
            BrokerConnectionError: Redis stayed unreachable for ``reconnect_timeout``.
            IdentityError, TrustError: security is on and the sender or the recipient is not a known identity.
        """
        pipeliner = self.pipeliner
        if (self._security is not None or seal) and not self._ready_to_sign(message, seal):
            message = await self._prepare(message, seal)
        message, body, token = self._outgoing(message)
        if pipeliner.write_paused:
            await pipeliner.wait_writable()
        if self.settings.durable_replicas:
            return await self._publish_durably(message, body, token, inbox_ttl=inbox_ttl)
        if inbox_ttl:
            sent = self._queue_sends([(message, body, token)], inbox_ttl=inbox_ttl)
            await asyncio.wait([sent])
            reply = self._send_replies(sent)[0]
        else:
            reply = await self._send(message, body, token)
        return self._sent(message, reply)

    async def _publish_durably(
        self, message: AgentMessage, body: bytes, token: bytes, *, inbox_ttl: float | None
    ) -> PublishResult:
        """SEND, then ``WAIT`` for the replicas on the same connection, in one write; see ``durable_replicas``."""
        required, timeout = self.settings.durable_replicas, self.settings.durable_timeout
        node = self.pipeliner.node_for_key(keys.inbox(message.recipient_id, message.payload.priority))
        with node.batch():  # WAIT counts the writes made before it on its connection: the SEND is one
            sent = self._queue_sends([(message, body, token)], inbox_ttl=inbox_ttl)
            waited = node.call("WAIT", required, int(timeout * 1000), replay=True)
        await asyncio.wait([sent])
        result = self._sent(message, self._send_replies(sent)[0])
        confirmed = int(await waited)
        if confirmed < required:
            raise NotDurableError(
                message_id=message.message_id, confirmed=confirmed, required=required, timeout=timeout
            )
        return result

    async def publish_many(self, messages: Sequence[AgentMessage]) -> list[PublishResult | AgentCommsError]:
        """Send ``messages`` together: one SEND call per recipient inbox; per message, its result or error.

        A fan-out (one message to each of many inboxes) is one write. Many messages to one
        inbox go out in calls of up to ``_SEND_BATCH``, each written as soon as it is
        encoded, so that Redis stores the first while the next are being encoded.
        """
        results: list[PublishResult | AgentCommsError | None] = [None] * len(messages)
        if self._security is not None:
            messages = await self._prepare_all(messages, results)
        groups: dict[tuple[str, str], list[tuple[int, AgentMessage]]] = {}
        for index, message in enumerate(messages):
            if results[index] is None:
                groups.setdefault((message.recipient_id, message.payload.priority), []).append((index, message))
        calls: list[tuple[list[tuple[int, _Outgoing]], asyncio.Future[Any]]] = []
        await self.pipeliner.wait_writable()
        with self.pipeliner.batch():  # one write for a fan-out
            for group in groups.values():
                for start in range(0, len(group), _SEND_BATCH):
                    chunk: list[tuple[int, _Outgoing]] = []
                    for index, message in group[start : start + _SEND_BATCH]:
                        try:
                            chunk.append((index, self._outgoing(message)))
                        except AgentCommsError as exc:
                            results[index] = exc
                    if chunk:
                        calls.append((chunk, self._queue_sends([out for _, out in chunk])))
                    if start + _SEND_BATCH < len(group):
                        self.pipeliner.write_now()  # more of this inbox follows: let Redis start on this part
        for chunk, future in calls:
            await self._collect(chunk, future, results)
        return [r for r in results if r is not None]

    async def _prepare_all(
        self, messages: Sequence[AgentMessage], results: list[PublishResult | AgentCommsError | None]
    ) -> list[AgentMessage]:
        """Keys with every recipient, agreed concurrently (one read of each new record); failures in ``results``."""
        prepared = await asyncio.gather(*(self._prepare(m, None) for m in messages), return_exceptions=True)
        out: list[AgentMessage] = []
        for index, outcome in enumerate(prepared):
            if isinstance(outcome, AgentMessage):
                out.append(outcome)
                continue
            if not isinstance(outcome, AgentCommsError):
                raise outcome
            results[index] = outcome
            out.append(messages[index])
        return out

    async def _collect(
        self,
        chunk: list[tuple[int, _Outgoing]],
        future: asyncio.Future[Any],
        results: list[PublishResult | AgentCommsError | None],
    ) -> None:
        """Each message's result of one SEND call of :meth:`publish_many`."""
        try:
            await future
            replies = self._send_replies(future)
        except AgentCommsError as exc:
            replies = [exc] * len(chunk)
        for (index, (message, _, _)), reply in zip(chunk, replies, strict=False):
            try:
                results[index] = reply if isinstance(reply, AgentCommsError) else self._sent(message, reply)
            except AgentCommsError as exc:
                results[index] = exc

    # -- request / reply -------------------------------------------------------------------

    async def request(
        self, message: AgentMessage, *, timeout: float | None = None, seal: bool | None = None
    ) -> AgentResponse:
        """Send ``message`` and wait for its reply; it always ends by ``timeout``.

        The timeout is ``timeout``, else the message's ``response_timeout``, else
        ``MESSAGE_TIMEOUT``, counted from this call. If it passes before the recipient
        handled the request, the request is dead-lettered as expired when it is read,
        and never answered late. With security on, the request is authenticated (and
        sealed, see :meth:`publish_message`), and only a reply authenticated by the
        recipient is accepted; others are dropped and counted (``replies_refused``).

        Raises:
            RequestTimeoutError: no reply in time (also when Redis was unreachable all along).
            MessageTooLargeError, InboxFullError, RedisOutOfMemoryError: the request was not stored.
            IdentityError, TrustError: security is on and the sender or the recipient is not a known identity.
        """
        self.pipeliner  # noqa: B018 - raises BrokerClosedError before anything is set up if not connected
        loop = asyncio.get_running_loop()
        payload = message.payload
        timeout = timeout or payload.response_timeout or self.settings.message_timeout
        if not 0 < timeout <= _MAX_TIMEOUT:
            raise MessageValidationError(f"a request's timeout must be above 0 and at most {_MAX_TIMEOUT:g}s")
        deadline = loop.time() + timeout
        if not payload.requires_response or payload.response_timeout != timeout:
            payload = payload.model_copy(update={"requires_response": True, "response_timeout": timeout})
        reply_to = self.reply_stream if self._security is None else self._reply_stream_for(message.sender_id)
        request = message.model_copy(
            update={"reply_to": reply_to, "correlation_id": message.message_id, "payload": payload}
        )
        correlation = request.message_id
        if correlation in self._waiting:
            raise AgentCommsError(f"a request with message_id {correlation} is already waiting for its reply")
        security = self._security
        if (security is not None or seal) and not self._ready_to_sign(request, seal):
            try:  # agreeing keys with a new recipient reads the trust store: it counts against the timeout
                async with asyncio.timeout_at(deadline):
                    request = await self._prepare(request, seal)
            except TimeoutError:
                self._stats.timeouts += 1
                raise RequestTimeoutError(
                    agent_id=request.recipient_id, message_id=request.message_id, timeout=timeout
                ) from None
        if security is not None:
            self._expected[correlation] = (request.sender_id, request.recipient_id)
        request, body, token = self._outgoing(request)
        if self._reply_reader is None:
            # the reader reads the stream from its start whenever it connects: a reply written first is not missed
            self._reply_reader = loop.create_task(self._read_replies(), name=f"replies-{self.client_id}")
        reply: asyncio.Future[AgentResponse] = loop.create_future()
        self._waiting[correlation] = reply
        self._stats.requests += 1
        # one future to await: the send's failure, the reply, or the deadline (a timer, cheaper than a timeout scope)
        sent = self._send(request, body, token)
        sent.add_done_callback(functools.partial(self._request_sent, request, reply))
        timer = loop.call_at(deadline, self._request_expired, request, timeout, reply)
        try:
            return await reply
        finally:
            timer.cancel()
            sent.cancel()  # a request not yet written when its caller gives up is not sent at all
            self._waiting.pop(correlation, None)
            self._expected.pop(correlation, None)

    def _request_sent(
        self, request: AgentMessage, reply: asyncio.Future[AgentResponse], sent: asyncio.Future[Any]
    ) -> None:
        if reply.done() or sent.cancelled():
            return
        try:
            error = sent.exception()
            if error is None:
                self._sent(request, sent.result())  # a duplicate keeps waiting: the first one's reply may come
                return
        except AgentCommsError as exc:  # InboxFullError
            error = exc
        reply.set_exception(error)  # not stored: InboxFullError, RedisOutOfMemoryError, BrokerConnectionError ...

    def _request_expired(self, request: AgentMessage, timeout: float, reply: asyncio.Future[AgentResponse]) -> None:
        if not reply.done():
            self._stats.timeouts += 1
            reply.set_exception(
                RequestTimeoutError(agent_id=request.recipient_id, message_id=request.message_id, timeout=timeout)
            )

    def _reply_stream_for(self, sender_id: str) -> str:
        """The reply stream of ``sender_id`` in this broker.

        With security on, a reply may only go to a stream named after the (verified) sender,
        so each sender id that shares this broker gets a stream of its own.
        """
        if self.client_id.startswith(sender_id + "."):
            return self.reply_stream
        stream = self._sender_streams.get(sender_id)
        if stream is None:
            stream = keys.replies(f"{sender_id}.{uuid.uuid4().hex[:12]}")
            if not keys.is_reply_stream(stream):
                raise ConfigError(f"sender id {sender_id!r} cannot name a reply stream")
            if self.pipeliner.cluster:  # one XREAD reads them all: every reply stream of a broker in one slot
                stream = _same_slot_stream(sender_id, key_slot(self.reply_stream))
            self._sender_streams[sender_id] = stream
            self._reply_positions[stream] = "0-0"  # new: read from its start
            if self._replies is not None and self._replies.busy and self._replies.client_id is not None:
                # the reader is blocked on the old list of streams: wake it to read this one too
                node = self.pipeliner.node_for_key(self.reply_stream)
                node.fire("CLIENT", "UNBLOCK", self._replies.client_id, replay=False)
        return stream

    async def _read_replies(self) -> None:
        """Read this broker's reply streams for as long as the broker is open; never ends on an error."""
        reader = self._replies
        assert reader is not None  # made by connect(), which request() requires
        positions = self._reply_positions  # stream -> last id read ("0-0": the stream is new, read it all)
        attempt = untrimmed = 0
        while not self._closing:
            try:
                block = MAX_BLOCK_MS if not untrimmed else 200  # wake soon to trim once replies stop
                streams = list(positions)
                response = await reader.call(
                    "XREAD", "COUNT", 1024, "BLOCK", block, "STREAMS", *streams, *(positions[k] for k in streams),
                    block_ms=block,
                )  # fmt: skip
                attempt = 0
            except (LinkLost, NotReady, AgentCommsError) as exc:  # lost, LOADING, WRONGTYPE if overwritten ...
                if self._closing:
                    return
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                if isinstance(exc, RedisPermissionError) and attempt % 60 == 0:  # a wrong ACL user: say it loudly
                    level = logging.ERROR
                logger.log(level, "reply reader of %s cannot read (%s); retrying", self.client_id, exc)
                await self._pause(backoff(attempt))
                attempt += 1
                continue
            except Exception:  # a bug must not leave callers waiting forever: log it and go on
                logger.exception("reply reader of %s failed; retrying", self.client_id)
                await self._pause(backoff(attempt))
                attempt += 1
                continue
            read: set[str] = set()
            for stream, batch in response or ():
                name = stream.decode()
                for entry_id, flat in batch:  # raw: [id, [b"r", reply, (b"a", token)]]
                    positions[name] = entry_id.decode()
                    self._deliver_reply(flat)
                    untrimmed += 1
                read.add(name)
            if untrimmed >= _TRIM_EVERY or (untrimmed and not response):
                # drop what was read, off the hot path: in batches, or when the streams are idle
                for name, last in positions.items():
                    if last != "0-0":
                        ms, _, seq = last.partition("-")  # MINID keeps ids >= the one given: trim through `last`
                        self.pipeliner.fire("XTRIM", name, "MINID", f"{ms}-{int(seq) + 1}", replay=True)
                untrimmed = 0
            if response:
                await asyncio.sleep(0)  # the waiting callers resume before the next read is written

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the broker closes meanwhile."""
        try:
            await asyncio.wait_for(self._closed_event.wait(), seconds)
        except TimeoutError:
            pass

    def _deliver_reply(self, flat: Any) -> None:
        body = flat[1] if flat and flat[0] == b"r" else b""
        try:
            response = _validate_response(body)
        except ValidationError:
            self._stats.replies_unmatched += 1
            logger.warning("ignoring a malformed reply on %s", self.reply_stream)
            return
        correlation = response.correlation_id or ""
        if self._security is not None:
            expected = self._expected.get(correlation)
            token = flat[3] if len(flat) >= 4 and flat[2] == b"a" else None
            opened = (
                self._security.open_reply(response, body, token, own_id=expected[0], expected=expected[1])
                if expected is not None
                else None
            )
            if opened is None:  # forged, from someone else than asked, or for no request of ours: dropped
                self._stats.replies_refused += 1
                logger.warning(
                    "dropped a reply on %s that is not authenticated by its request's recipient", correlation
                )
                return
            response = opened
        future = self._waiting.pop(correlation, None)
        if future is None or future.done():
            # a duplicate (redelivered request) or a reply to a request cancelled or timed out
            self._stats.replies_unmatched += 1
            logger.debug("reply %s matches no waiting request; dropped", response.correlation_id)
            return
        self._stats.replies_received += 1
        future.set_result(response)

    # -- receiving -------------------------------------------------------------------------

    async def subscribe_to_agent(
        self,
        agent_id: str,
        handler: Handler,
        *,
        concurrency: int | None = None,
        consumer_name: str | None = None,
        role: str = "",
        addresses: Sequence[str] = (),
    ) -> Subscription:
        """Start handling ``agent_id``'s inbox with ``handler``; returns the running subscription.

        The handler gets each :class:`AgentMessage`; for a request, its return value (an
        :class:`AgentResponse`, or any JSON-able data) becomes the reply. A message is
        acknowledged only after the handler returned and its reply was written; if the
        handler raises, the message is delivered again after ``claim_idle`` and
        dead-lettered after ``max_deliveries``. A one-way message whose handler returns a
        failed :class:`AgentResponse` is dead-lettered with that error at once. With security
        on, a message that is not authenticated, replayed, or forbidden by the policy for an
        agent of ``role`` is not handed to the handler. ``addresses``: more inboxes to read, competing with
        their other consumers (a role's address: ``keys.role_address``).
        """
        subscription = Subscription(
            self.pipeliner,
            self.settings,
            agent_id,
            handler,
            concurrency=concurrency or self.settings.concurrency,
            consumer_name=consumer_name or self.client_id,
            security=self._security,
            role=role,
            addresses=addresses,
        )
        await subscription.start()
        self._subscriptions.add(subscription)
        subscription.on_stop(self._subscriptions.discard)
        return subscription

    # -- monitoring ------------------------------------------------------------------------

    async def health_check(self) -> dict[str, Any]:
        """Whether Redis answers, how fast, and this instance's counters."""
        started = time.perf_counter()
        version = None
        try:
            await asyncio.wait_for(self.pipeliner.call("PING", replay=True), 5.0)
            latency = time.perf_counter() - started
            try:  # the version, when this ACL user may read INFO (an agent's or a sender's may not)
                info = await asyncio.wait_for(self.pipeliner.call("INFO", "server", replay=True), 5.0)
                for line in bytes(info).decode(errors="replace").splitlines():
                    if line.startswith("redis_version:"):
                        version = line.partition(":")[2].strip()
            except RedisPermissionError:
                pass
            status, error = "healthy", None
        except (AgentCommsError, TimeoutError) as exc:
            status, error = "unhealthy", str(exc) or "no answer within 5s"
        return {
            "status": status,
            "error": error,
            "latency_ms": round((latency if error is None else time.perf_counter() - started) * 1000, 3),
            "redis_version": version,
            "client_id": self.client_id,
            "subscriptions": sorted(s.agent_id for s in self._subscriptions),
            "stats": asdict(self.stats),
        }

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The live message feed (Pub/Sub): lossy, for dashboards and ``tail`` only.

        The first item is ``{"event": "subscribed"}`` once the feed is listening; after a
        lost connection it resubscribes and yields ``{"event": "resubscribed"}``. On the
        channel itself a message holds one JSON event per line (a batch publishes once);
        a line that is not a JSON object is skipped.

        Raises:
            RedisPermissionError: this Redis ACL user may not subscribe to the feed.
        """
        attempt = 0
        first = True
        while True:
            try:
                # closed with this generator: its connection then goes at once, not when garbage is collected
                specs = [self.spec]
                if isinstance(self.pipeliner, ClusterPipeliner):  # a subscriber on every primary (see subscribe)
                    specs = [node.spec for node in self.pipeliner.nodes]
                name = f"{self.client_id}.feed"
                async with aclosing(subscribe(specs[0], keys.EVENTS_CHANNEL, name=name, also=specs[1:])) as feed:
                    async for data in feed:
                        if not data:
                            yield {"event": "subscribed" if first else "resubscribed"}
                            first, attempt = False, 0
                            continue
                        for line in data.splitlines():  # a feed message holds one event per line
                            try:
                                event = json.loads(line)
                            except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
                                continue
                            if isinstance(event, dict):
                                yield event
            except RedisPermissionError:
                raise  # this ACL user may not read the feed: retrying will not change that
            except (LinkLost, NotReady, AgentCommsError) as exc:
                logger.warning("event feed lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(backoff(attempt))
                attempt += 1

    # -- the record ------------------------------------------------------------------------

    @property
    def record(self) -> MessageRecord:
        """The record of handled and dead-lettered messages, with replies and receipts (:mod:`agentcomms.record`)."""
        return MessageRecord(self.pipeliner)

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letter_agents(self) -> list[str]:
        """Agent ids that have dead letters."""
        return await deadletters.dead_letter_agents(self.pipeliner)

    async def dead_letters(self, agent_id: str, *, count: int = 100, after: str | None = None) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``agent_id`` (after entry id ``after``, to page)."""
        return await deadletters.list_dead_letters(self.pipeliner, agent_id, count=count, after=after)

    async def count_dead_letters(self, agent_id: str) -> int:
        """How many dead letters ``agent_id`` has."""
        return await deadletters.count_dead_letters(self.pipeliner, agent_id)

    async def get_dead_letter(self, agent_id: str, entry_id: str) -> DeadLetter:
        """One dead letter.

        Raises:
            DeadLetterNotFoundError: there is no such dead letter.
        """
        return await deadletters.get_dead_letter(self.pipeliner, agent_id, entry_id)

    async def redrive_dead_letter(self, agent_id: str, entry_id: str) -> PublishResult:
        """Move a dead letter back into its inbox and out of the dead letters, atomically (bypassing dedup).

        With security on, only a process holding an admin identity may: it signs the message
        afresh (with its own token, an agent would refuse it as a replay).

        Raises:
            DeadLetterNotFoundError: there is no such dead letter.
            AgentCommsError: it is not a valid message.
            InboxFullError: the inbox is full.
            PermissionDeniedError: security is on and this process holds no admin identity.
        """
        security = self._security
        if security is not None and security.admin_identity() is None:
            raise PermissionDeniedError(
                "with security on, dead letters are sent back by an admin, who signs them afresh "
                "(AGENTCOMMS_IDENTITY: an identity whose key is a trust anchor)"
            )
        message, entry = await deadletters.redrive_dead_letter(
            self.pipeliner,
            agent_id,
            entry_id,
            max_inbox_length=self.settings.max_inbox_length,
            reauthorize=security.redrive_token if security is not None else None,
        )
        return PublishResult(message.message_id, agent_id, entry)

    async def purge_dead_letters(self, agent_id: str) -> int:
        """Delete all of ``agent_id``'s dead letters; returns how many there were."""
        return await deadletters.purge_dead_letters(self.pipeliner, agent_id)
