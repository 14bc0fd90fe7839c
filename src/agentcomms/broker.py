"""MessageBroker: delivery over Redis Streams. Delivery semantics live here and in ``subscription``.

* Each agent id has an inbox stream per priority and one consumer group; instances of an
  agent id share the group, so each message reaches one of them.
* A send is one Lua call (dedup check, inbox bound, XADD), pipelined with whatever else
  is being sent at the same moment.
* Requests carry ``reply_to`` (the caller's reply stream) and a correlation id; replies are
  read by one blocking reader per broker and matched to waiting callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentcomms import keys
from agentcomms._redis import (
    DEAD_LETTER,
    FLUSH_AT,
    MAX_BLOCK_MS,
    READER_TIMEOUT,
    SEND,
    TRANSIENT_ERRORS,
    Command,
    Pipeliner,
    RawConnection,
    backoff,
    decode,
    entries,
    make_client,
    stop_reader,
)
from agentcomms.embedded import EmbeddedRedis, shared_embedded_redis
from agentcomms.exceptions import (
    AgentCommsError,
    BrokerClosedError,
    BrokerConnectionError,
    InboxFullError,
    MessageTooLargeError,
    RequestTimeoutError,
)
from agentcomms.schemas import AgentMessage, AgentResponse
from agentcomms.settings import Settings
from agentcomms.subscription import Handler, Subscription

__all__ = ["BrokerStats", "DeadLetter", "Handler", "MessageBroker", "PublishResult"]

logger = logging.getLogger(__name__)

_SEND_BATCH = 128
"""Messages to one inbox sent by one SEND call of ``publish_many`` at the most."""

_TRIM_EVERY = 256
"""Replies read before the reply stream is trimmed (it is trimmed sooner when it goes idle)."""


_dump_message = AgentMessage.__pydantic_serializer__.to_json
_validate_response = AgentResponse.__pydantic_validator__.validate_json

_OpenSend = list[tuple[AgentMessage, bytes, asyncio.Future[Any]]]
"""Messages to one inbox waiting for their shared SEND call to be written."""


def _answer_sends(batch: _OpenSend, done: asyncio.Future[Any]) -> None:
    """Hand each message of a shared SEND call its own reply (or the call's error)."""
    if done.cancelled():
        return  # nothing was sent: every caller had given up
    error = done.exception()
    replies = done.result() if error is None else [error] * len(batch)
    for (_, _, future), reply in zip(batch, replies, strict=True):
        if future.done():
            continue
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        else:
            future.set_result(reply)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a message went: its stream entry id, or ``duplicate=True`` (and no entry id) if it was accepted before."""

    message_id: str
    recipient_id: str
    entry_id: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be delivered, with why and after how many deliveries."""

    agent_id: str
    entry_id: str
    reason: str
    deliveries: int
    source_id: str
    payload: bytes
    """The message as it was in the inbox (empty if the entry had no ``m`` field; see ``raw``)."""
    raw: str | None = None
    """The entry's fields as JSON when it was not a message at all."""

    @property
    def message(self) -> AgentMessage | None:
        """The payload parsed as a message, or ``None`` if it is not one."""
        try:
            return AgentMessage.model_validate_json(self.payload) if self.payload else None
        except ValidationError:
            return None


@dataclass(slots=True)
class BrokerStats:
    """Counters of one broker instance since it connected."""

    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    requests: int = 0
    replies_received: int = 0
    replies_unmatched: int = 0
    timeouts: int = 0
    round_trips: int = 0


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
        self.client_id = f"{client_name}.{uuid.uuid4().hex[:12]}"
        self.reply_stream = keys.replies(self.client_id)
        self._client: Redis | None = None
        self._pipeliner: Pipeliner | None = None
        self._embedded: EmbeddedRedis | None = None
        self._reply_reader: asyncio.Task[None] | None = None
        self._reply_ready: asyncio.Event | None = None
        self._reply_reader_id: int | None = None
        self._closing = False
        self._waiting: dict[str, asyncio.Future[AgentResponse]] = {}
        self._open_sends: dict[str, _OpenSend] = {}
        self._subscriptions: set[Subscription] = set()
        self._stats = BrokerStats()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The Redis URL in use (password not included)."""
        if self._url is None:
            raise BrokerClosedError("broker is not connected yet")
        return self._url

    @property
    def connected(self) -> bool:
        """Whether :meth:`connect` succeeded and :meth:`close` has not been called."""
        return self._client is not None

    async def connect(self) -> Self:
        """Connect to Redis (starting the embedded server if no URL is set).

        Raises:
            BrokerConnectionError: Redis does not answer.
        """
        if self._client is not None:
            return self
        if self._url is None:
            self._url, self._embedded = await asyncio.to_thread(
                shared_embedded_redis, self.settings.data_dir, binary=self.settings.redis_server
            )
        password = self.settings.redis_password.get_secret_value() if self.settings.redis_password else None
        client = make_client(self.url, password=password, db=self.settings.redis_db)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise BrokerConnectionError(f"cannot reach Redis: {exc}", url=self._url) from exc
        self._client = client
        self._pipeliner = Pipeliner(client, reconnect_timeout=self.settings.reconnect_timeout, url=self._url)
        self._pipeliner.start()
        logger.info("broker %s connected to %s", self.client_id, self._url)
        return self

    initialize = connect
    """The seed's name for :meth:`connect`."""

    async def close(self) -> None:
        """Stop every subscription (finishing handlers in hand), then disconnect."""
        for subscription in list(self._subscriptions):
            await subscription.stop()
        self._closing = True
        if self._reply_reader is not None:
            await stop_reader(self._reply_reader, self.client, self._reply_reader_id)
            self._reply_reader = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrokerClosedError("broker closed while waiting for a reply"))
        self._waiting.clear()
        if self._pipeliner is not None:
            await self._pipeliner.aclose()
            self._pipeliner = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def client(self) -> Redis:
        """The connection pool for commands (not for blocking reads)."""
        if self._client is None:
            raise BrokerClosedError("broker is not connected: call connect() or use `async with`")
        return self._client

    @property
    def pipeliner(self) -> Pipeliner:
        """The batching command sender (internal, shared with subscriptions)."""
        if self._pipeliner is None:
            raise BrokerClosedError("broker is not connected: call connect() or use `async with`")
        return self._pipeliner

    @property
    def stats(self) -> BrokerStats:
        """A snapshot of this instance's counters."""
        snapshot = BrokerStats(**asdict(self._stats))
        snapshot.round_trips = self._pipeliner.round_trips if self._pipeliner else 0
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

    def event(self, kind: str, message: AgentMessage, **extra: Any) -> str:
        """One line of the monitoring feed, as JSON (``sent`` and ``handled`` are built by the scripts)."""
        fields = {
            "event": kind,
            "message_id": message.message_id,
            "sender_id": message.sender_id,
            "recipient_id": message.recipient_id,
            "intent": str(message.intent),
            "ts": round(time.time(), 6),
            **extra,
        }
        return json.dumps(fields, separators=(",", ":"))

    def _send_command(self, batch: Sequence[tuple[AgentMessage, bytes]], *, dedup: bool = True) -> Command:
        """The SEND call for messages to the same inbox (same recipient and priority)."""
        settings = self.settings
        first = batch[0][0]
        recipient = first.recipient_id
        return (
            "EVALSHA",
            SEND.sha,
            2,
            keys.inbox(recipient, first.payload.priority),
            keys.dedup(recipient),
            settings.max_inbox_length,
            int(settings.dedup_window * 1000) if dedup else 0,
            keys.EVENTS_CHANNEL if settings.event_feed else "",
            len(batch),
            *(m.message_id for m, _ in batch),
            *(body for _, body in batch),
        )

    def _queue_sends(self, batch: Sequence[tuple[AgentMessage, bytes]], *, dedup: bool = True) -> asyncio.Future[Any]:
        """Queue one SEND call for ``batch`` as it is (messages to one inbox)."""
        first = batch[0][0]
        # a send still open for this inbox takes no more messages: they would overtake this batch
        self._open_sends.pop(keys.inbox(first.recipient_id, first.payload.priority), None)
        return self.pipeliner.call(*self._send_command(batch, dedup=dedup))

    def _send(self, message: AgentMessage, body: bytes) -> asyncio.Future[Any]:
        """Queue one message; those to the same inbox in one event-loop tick share one SEND call.

        The future resolves to the message's own reply from the script: its entry id, ``dup`` or ``full <length>``.
        """
        inbox = keys.inbox(message.recipient_id, message.payload.priority)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = self._open_sends.get(inbox)
        if batch is not None:
            batch.append((message, body, future))
            if len(batch) >= FLUSH_AT:
                del self._open_sends[inbox]
                self.pipeliner.write_now()
            return future
        batch = [(message, body, future)]
        self._open_sends[inbox] = batch
        # built when written: on an idle connection at once (a batch of one), under load at the end of the tick
        sent = self.pipeliner.call_lazy(functools.partial(self._close_send, inbox, batch))
        sent.add_done_callback(functools.partial(_answer_sends, batch))
        return future

    def _close_send(self, inbox: str, batch: _OpenSend) -> Command | None:
        if self._open_sends.get(inbox) is batch:
            del self._open_sends[inbox]
        batch[:] = [item for item in batch if not item[2].cancelled()]  # callers that gave up before the write
        return self._send_command([(m, b) for m, b, _ in batch]) if batch else None

    def _sent(self, message: AgentMessage, reply: bytes) -> PublishResult:
        """The result of one message from its SEND call's reply: an entry id, ``dup`` or ``full <length>``."""
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

    async def publish_message(self, message: AgentMessage) -> PublishResult:
        """Put ``message`` into its recipient's inbox (durable once this returns).

        A message whose ``message_id`` was accepted within the dedup window is not added
        again: the result says ``duplicate=True``.

        Raises:
            MessageTooLargeError: the message is over ``max_message_bytes``.
            InboxFullError: the recipient has ``max_inbox_length`` messages waiting.
            BrokerConnectionError: Redis stayed unreachable for ``reconnect_timeout``.
        """
        reply = await self._send(message, self._encode(message))
        return self._sent(message, reply)

    async def publish_many(self, messages: Sequence[AgentMessage]) -> list[PublishResult | AgentCommsError]:
        """Send ``messages`` together: one SEND call per recipient inbox; per message, its result or error.

        A fan-out (one message to each of many inboxes) is one write. Many messages to one
        inbox go out in calls of up to ``_SEND_BATCH``, each written as soon as it is
        encoded, so that Redis stores the first while the next are being encoded.
        """
        results: list[PublishResult | AgentCommsError | None] = [None] * len(messages)
        groups: dict[tuple[str, str], list[tuple[int, AgentMessage]]] = {}
        for index, message in enumerate(messages):
            groups.setdefault((message.recipient_id, message.payload.priority), []).append((index, message))
        calls: list[tuple[list[tuple[int, AgentMessage, bytes]], asyncio.Future[Any]]] = []
        with self.pipeliner.batch():  # one write for a fan-out
            for group in groups.values():
                for start in range(0, len(group), _SEND_BATCH):
                    chunk: list[tuple[int, AgentMessage, bytes]] = []
                    for index, message in group[start : start + _SEND_BATCH]:
                        try:
                            chunk.append((index, message, self._encode(message)))
                        except AgentCommsError as exc:
                            results[index] = exc
                    if chunk:
                        calls.append((chunk, self._queue_sends([(m, b) for _, m, b in chunk])))
                    if start + _SEND_BATCH < len(group):
                        self.pipeliner.write_now()  # more of this inbox follows: let Redis start on this part
        for chunk, future in calls:
            try:
                replies = await future
            except AgentCommsError as exc:
                replies = [exc] * len(chunk)
            for (index, message, _), reply in zip(chunk, replies, strict=True):
                try:
                    results[index] = reply if isinstance(reply, AgentCommsError) else self._sent(message, reply)
                except AgentCommsError as exc:
                    results[index] = exc
        return [r for r in results if r is not None]

    # -- request / reply -------------------------------------------------------------------

    async def request(self, message: AgentMessage, *, timeout: float | None = None) -> AgentResponse:
        """Send ``message`` and wait for its reply.

        The timeout is ``timeout``, else the message's ``response_timeout``, else
        ``MESSAGE_TIMEOUT``. If it passes before the recipient handled the request, the
        request is dead-lettered as expired when it is read, and never answered late.

        Raises:
            RequestTimeoutError: no reply in time.
            MessageTooLargeError, InboxFullError, BrokerConnectionError: as for :meth:`publish_message`.
        """
        payload = message.payload
        timeout = timeout or payload.response_timeout or self.settings.message_timeout
        if not payload.requires_response or payload.response_timeout != timeout:
            payload = payload.model_copy(update={"requires_response": True, "response_timeout": timeout})
        request = message.model_copy(
            update={"reply_to": self.reply_stream, "correlation_id": message.message_id, "payload": payload}
        )
        if self._reply_ready is None or not self._reply_ready.is_set():
            await self._ensure_reply_reader()
        correlation = request.message_id
        if correlation in self._waiting:
            raise AgentCommsError(f"a request with message_id {correlation} is already waiting for its reply")
        body = self._encode(request)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[AgentResponse] = loop.create_future()
        self._waiting[correlation] = reply
        self._stats.requests += 1
        # one future to await: the send's failure, the reply, or the deadline (a timer, cheaper than a timeout scope)
        sent = self._send(request, body)
        sent.add_done_callback(functools.partial(self._request_sent, request, reply))
        timer = loop.call_at(loop.time() + timeout, self._request_expired, request, timeout, reply)
        try:
            return await reply
        finally:
            timer.cancel()
            sent.cancel()  # a request not yet written when its caller gives up is not sent at all
            self._waiting.pop(correlation, None)

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
        reply.set_exception(error)

    def _request_expired(self, request: AgentMessage, timeout: float, reply: asyncio.Future[AgentResponse]) -> None:
        if not reply.done():
            self._stats.timeouts += 1
            reply.set_exception(
                RequestTimeoutError(agent_id=request.recipient_id, message_id=request.message_id, timeout=timeout)
            )

    async def _ensure_reply_reader(self) -> None:
        if self._reply_reader is None:
            self._reply_ready = asyncio.Event()
            self._reply_reader = asyncio.create_task(self._read_replies(), name=f"replies-{self.client_id}")
        assert self._reply_ready is not None
        if not self._reply_ready.is_set():
            await self._reply_ready.wait()

    async def _read_replies(self) -> None:
        reader = RawConnection(self.client, read_timeout=READER_TIMEOUT)
        last = "0-0"  # the stream is this instance's own and new: read it from the start
        attempt = untrimmed = 0
        try:
            self._reply_reader_id = int(await reader.call("CLIENT", "ID"))
            assert self._reply_ready is not None
            self._reply_ready.set()
            while not self._closing:
                try:
                    block = MAX_BLOCK_MS if not untrimmed else 200  # wake soon to trim once replies stop
                    response = await reader.call(
                        "XREAD", "COUNT", 1024, "BLOCK", block, "STREAMS", self.reply_stream, last
                    )
                    attempt = 0
                except (*TRANSIENT_ERRORS, RedisError) as exc:  # e.g. WRONGTYPE if the key was overwritten
                    if self._closing:
                        return
                    logger.warning("reply reader lost Redis (%s); reconnecting", exc)
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        self._reply_reader_id = int(await reader.call("CLIENT", "ID"))
                    continue
                for _stream, batch in response or ():
                    for entry_id, flat in batch:  # raw: [id, [b"r", reply]]
                        last = decode(entry_id)
                        self._deliver_reply(flat[1] if flat and flat[0] == b"r" else b"")
                        untrimmed += 1
                if untrimmed >= _TRIM_EVERY or (untrimmed and not response):
                    # drop what was read, off the hot path: in batches, or when the stream is idle
                    self.pipeliner.fire("XTRIM", self.reply_stream, "MINID", last)
                    untrimmed = 0
                if response:
                    await asyncio.sleep(0)  # the waiting callers resume before the next read is written
        finally:
            await reader.close()

    def _deliver_reply(self, body: bytes) -> None:
        try:
            response = _validate_response(body)
        except ValidationError:
            self._stats.replies_unmatched += 1
            logger.warning("ignoring a malformed reply on %s", self.reply_stream)
            return
        future = self._waiting.pop(response.correlation_id or "", None)
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
    ) -> Subscription:
        """Start handling ``agent_id``'s inbox with ``handler``; returns the running subscription.

        The handler gets each :class:`AgentMessage`; for a request, its return value (an
        :class:`AgentResponse`, or any JSON-able data) becomes the reply. A message is
        acknowledged only after the handler returned and its reply was written; if the
        handler raises, the message is delivered again after ``claim_idle`` and
        dead-lettered after ``max_deliveries``.
        """
        subscription = Subscription(
            self,
            agent_id,
            handler,
            concurrency=concurrency or self.settings.concurrency,
            consumer_name=consumer_name or self.client_id,
        )
        await subscription.start()
        self._subscriptions.add(subscription)
        subscription.on_stop(self._subscriptions.discard)
        return subscription

    # -- monitoring ------------------------------------------------------------------------

    async def health_check(self) -> dict[str, Any]:
        """Whether Redis answers, how fast, and this instance's counters."""
        started = time.perf_counter()
        try:
            info = await self.client.info("server")
            status = "healthy"
            error = None
        except (RedisError, OSError) as exc:
            info, status, error = {}, "unhealthy", str(exc)
        return {
            "status": status,
            "error": error,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "redis_version": info.get("redis_version"),
            "client_id": self.client_id,
            "subscriptions": sorted(s.agent_id for s in self._subscriptions),
            "stats": asdict(self.stats),
        }

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The live message feed (Pub/Sub): lossy, for dashboards and ``tail`` only.

        The first item is ``{"event": "subscribed"}`` once the feed is listening; after a
        lost connection it resubscribes and yields ``{"event": "resubscribed"}``. On the
        channel itself a message holds one JSON event per line (a batch publishes once).
        """
        attempt = 0
        first = True
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                yield {"event": "subscribed" if first else "resubscribed"}
                first, attempt = False, 0
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        for line in message["data"].splitlines():  # a feed message holds one event per line
                            yield json.loads(line)
            except TRANSIENT_ERRORS as exc:
                logger.warning("event feed lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(backoff(attempt))
                attempt += 1
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letter(
        self, agent_id: str, stream: str, entry_id: str, reason: str, deliveries: int, *, claim_idle_ms: int | None
    ) -> bytes | None:
        """Move one inbox entry to ``agent_id``'s dead-letter stream (internal: used by subscriptions).

        Returns the entry's body, or ``None`` if another instance dead-lettered or claimed it first.
        """
        result = await self.pipeliner.script(
            DEAD_LETTER,
            [stream, keys.dead_letters(agent_id)],
            [keys.GROUP, entry_id, reason, deliveries, self.client_id, "" if claim_idle_ms is None else claim_idle_ms],
        )
        if result is None:
            return None
        self.pipeliner.fire("SADD", keys.DEAD_LETTER_INDEX, agent_id)
        logger.warning("dead-lettered %s from %s after %d deliveries: %s", entry_id, stream, deliveries, reason)
        body = result[1]
        return body if isinstance(body, bytes) else str(body).encode()

    async def dead_letter_agents(self) -> list[str]:
        """Agent ids that have dead letters."""
        members = await self.client.smembers(keys.DEAD_LETTER_INDEX)
        return sorted(decode(m) for m in members)

    async def dead_letters(self, agent_id: str, *, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``agent_id``."""
        found = entries(await self.client.xrange(keys.dead_letters(agent_id), count=count))
        return [_dead_letter(agent_id, entry_id, fields) for entry_id, fields in found]

    async def redrive_dead_letter(self, agent_id: str, entry_id: str) -> PublishResult:
        """Send a dead letter back into its inbox (bypassing the dedup window) and remove it.

        Raises:
            AgentCommsError: there is no such dead letter, or it is not a valid message.
        """
        found = entries(await self.client.xrange(keys.dead_letters(agent_id), min=entry_id, max=entry_id))
        if not found:
            raise AgentCommsError(f"no dead letter {entry_id} for {agent_id!r}")
        letter = _dead_letter(agent_id, *found[0])
        message = letter.message
        if message is None:
            raise AgentCommsError(f"dead letter {entry_id} is not a valid message ({letter.reason}); purge it instead")
        [reply] = await self._queue_sends([(message, letter.payload)], dedup=False)
        result = self._sent(message, reply)
        await self.client.xdel(keys.dead_letters(agent_id), entry_id)
        return result

    async def purge_dead_letters(self, agent_id: str) -> int:
        """Delete all of ``agent_id``'s dead letters; returns how many there were."""
        stream = keys.dead_letters(agent_id)
        count = int(await self.client.xlen(stream))
        await self.client.delete(stream)
        await self.client.srem(keys.DEAD_LETTER_INDEX, agent_id)
        return count


def _dead_letter(agent_id: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
    raw = fields.get(b"raw")
    return DeadLetter(
        agent_id=agent_id,
        entry_id=decode(entry_id),
        reason=decode(fields.get(b"reason", b"")),
        deliveries=int(fields.get(b"deliveries", b"0")),
        source_id=decode(fields.get(b"source_id", b"")),
        payload=fields.get(b"payload", b""),
        raw=decode(raw) if raw is not None else None,
    )
