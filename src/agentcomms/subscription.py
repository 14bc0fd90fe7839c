"""Subscription: one running consumer of an agent id's inbox.

The loop reads new entries with XREADGROUP on a connection of its own and queues them for
a pool of at most ``concurrency`` worker tasks, which run the handler and acknowledge
each message together with its reply in the pipeliner's next write. Every
``claim_idle / 3`` it also

* measures the Redis server's clock against this process's monotonic clock, so that
  expiry never depends on the local wall clock (which may be stepped),
* keeps its own long-running entries from looking abandoned (XCLAIM ... JUSTID), and
* takes over entries pending longer than ``claim_idle`` (a dead instance's, or ones
  whose handler failed), dead-lettering those delivered ``max_deliveries`` times.

The loop never ends on its own: any Redis error, including a restart that is still
loading its data, is logged, waited out with backoff, and followed by a fresh start
(consumer groups made again if Redis lost them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from agentcomms import keys
from agentcomms.deadletters import move_to_dead_letters
from agentcomms.exceptions import AgentCommsError, BrokerConnectionError, RedisCommandError, RedisPermissionError
from agentcomms.schemas import CURRENT_CONVERSATION, AgentMessage, AgentResponse, VerifiedMessage, describe_errors
from agentcomms.security.guard import Refusal, Security
from agentcomms.settings import Settings
from agentcomms.transport import (
    MAX_BLOCK_MS,
    BlockingReader,
    Commands,
    LinkLost,
    NotReady,
    backoff,
    key_slot,
    stop_blocked,
)
from agentcomms.transport.scripts import ACK

__all__ = ["Handler", "Subscription", "SubscriptionStats", "feed_event"]

logger = logging.getLogger(__name__)

Handler = Callable[[AgentMessage], Awaitable[Any]]
"""An async function taking a message; for a request its return value becomes the reply."""

_Work = tuple[str, str, Sequence[bytes] | None, int]
"""A queued message: stream, entry id, its raw ``[field, value, ...]``, deliveries so far."""

_validate_message = AgentMessage.__pydantic_validator__.validate_json
_validate_verified = VerifiedMessage.__pydantic_validator__.validate_json  # security on: sender_roles is set
_dump_response = AgentResponse.__pydantic_serializer__.to_json

_PENDING_PAGE = 100
_ACK_BATCH = 1000
"""Entry ids acknowledged by one ACK call at the most (Lua's unpack limit is about 8,000)."""
_RECORD_HOUSEKEEPING = 60.0
"""Seconds between trims of an agent's record by age (and refreshes of its TTL), at the most."""

_Ack = tuple[str, str, int, bytes, bytes]
"""An acknowledgement to send: entry id, conversation id, delivered at (server ms), the message's body as stored,
the reply's body (b"" = none)."""

_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class _Read:
    """One blocking read loop: the streams it reads (one hash slot on a cluster) and its connection."""

    def __init__(self, streams: list[str], reader: BlockingReader) -> None:
        self.streams = streams
        self.new = [">"] * len(streams)
        self.reader = reader
        self.task: asyncio.Task[None] | None = None
        self.reading = True


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription."""

    received: int = 0
    handled: int = 0
    failed: int = 0
    reclaimed: int = 0
    expired: int = 0
    dead_lettered: int = 0
    rejected: int = 0
    """One-way messages whose handler answered with an error (dead-lettered with it)."""
    replies_failed: int = 0
    """Replies Redis refused to store (e.g. out of memory); their callers time out."""
    refused: int = 0
    """Messages security refused: unauthenticated, replayed (dead-lettered) or forbidden (answered so)."""
    unrecorded: int = 0
    """Handled messages Redis refused to record (e.g. its record key is of another type); acknowledged all the same."""


def feed_event(kind: str, message: AgentMessage, **extra: Any) -> str:
    """One line of the monitoring feed, as JSON (``sent`` and ``handled`` lines are built by the scripts)."""
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


def _as_response(result: Any, message: AgentMessage, agent_id: str) -> AgentResponse:
    correlation_id = message.correlation_id or message.message_id
    if isinstance(result, AgentResponse):
        return result.model_copy(update={"correlation_id": correlation_id, "responder_id": agent_id})
    return AgentResponse(success=True, data=result, correlation_id=correlation_id, responder_id=agent_id)


def _field_names(fields: dict[bytes, bytes]) -> str:
    return ", ".join(sorted(k.decode(errors="replace") for k in fields)) or "none"


class Subscription:
    """Handles the messages of one agent id; created by :meth:`MessageBroker.subscribe_to_agent`.

    Args:
        pipeliner: carries acknowledgements, replies, dead letters and housekeeping, and says where each
            blocking read connects (``spec_for_key``: on a cluster, the primary that holds its streams).
        settings: claim idle time, deliveries, limits, feed.
        agent_id: whose inbox.
        handler: called once per message.
        concurrency: handlers running at once at the most.
        consumer_name: this instance's name in the consumer group.
        addresses: other recipients whose inboxes it reads too, competing with the other consumers of their
            group: a role's address (``keys.role_address``), for messages to whichever agent of the role is free.
    """

    def __init__(
        self,
        pipeliner: Commands,
        settings: Settings,
        agent_id: str,
        handler: Handler,
        *,
        concurrency: int,
        consumer_name: str,
        security: Security | None = None,
        role: str = "",
        addresses: Sequence[str] = (),
    ) -> None:
        self.agent_id = agent_id
        self.consumer = consumer_name
        self._consumer_bytes = consumer_name.encode()
        self.stats = SubscriptionStats()
        self._security = security
        self._role = role
        self._pipeliner = pipeliner
        self._settings = settings
        self._handler = handler
        # every inbox it reads, by priority (high first), its own before a role's; and whose each one is
        self._owner = {stream: owner for owner in (agent_id, *addresses) for stream in keys.inboxes(owner)}
        self._streams = sorted(self._owner, key=lambda stream: keys.PRIORITIES.index(stream.rsplit(":", 1)[1]))
        # one blocking read per hash slot: one on a single server; on a Redis Cluster an agent's own inboxes and
        # a role's live in different slots, and XREADGROUP may not span slots (CROSSSLOT)
        by_slot: dict[int, list[str]] = {}
        for stream in self._streams:
            by_slot.setdefault(key_slot(stream) if pipeliner.cluster else 0, []).append(stream)
        self._reads = [
            _Read(
                streams,
                BlockingReader(
                    functools.partial(pipeliner.spec_for_key, streams[0]), name=f"{consumer_name}.read{n or ''}"
                ),
            )
            for n, streams in enumerate(by_slot.values())
        ]
        self._concurrency = concurrency
        self._claim_idle_ms = int(settings.claim_idle * 1000)
        self._tick = max(0.02, min(settings.claim_idle / 3, MAX_BLOCK_MS / 1000))
        self._max_bytes = settings.max_message_bytes
        self._max_deliveries = settings.max_deliveries
        self._channel = keys.EVENTS_CHANNEL if settings.event_feed else ""
        self._inflight: dict[tuple[str, str], float] = {}
        self._last_error: dict[tuple[str, str], str] = {}
        self._unanswered_claims: dict[tuple[str, str], int] = {}  # entry -> its delivery count had the claim run
        self._queue: collections.deque[_Work] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: list[asyncio.Future[None]] = []
        self._waking = False
        self._slot_free = asyncio.Event()
        self._server_offset_ms = 0.0  # Redis server ms minus this process's monotonic ms
        self._clock_rtt, self._clock_at = float("inf"), 0.0  # the round trip of the sample it came from, and when
        self._housekeeping_at = 0.0
        self._ttl_refreshed: dict[str, float] = {}
        self._acks: dict[str, list[_Ack]] = {}
        self._recording = settings.record
        self._record_trim_at: dict[str, float] = {}  # record key -> monotonic time of its next trim by age
        self._ack_futures: set[asyncio.Future[Any]] = set()
        self._ack_scheduled = False
        self._stop_callbacks: list[Callable[[Subscription], object]] = []
        self._stopped = False
        self._stopping = asyncio.Event()
        self.reading = True
        """Whether the last read of the inbox went through (false while Redis is away, say)."""

    @property
    def running(self) -> bool:
        """Whether the read loop is alive."""
        return any(read.task is not None and not read.task.done() for read in self._reads)

    @property
    def in_flight(self) -> int:
        """Messages read and not yet acknowledged by this subscription."""
        return len(self._inflight)

    def on_stop(self, callback: Callable[[Subscription], object]) -> None:
        """Call ``callback(self)`` once the subscription has stopped."""
        self._stop_callbacks.append(callback)

    async def start(self) -> None:
        """Create the consumer groups (at 0, so nothing sent earlier is skipped) and start reading.

        Raises:
            BrokerConnectionError: Redis stayed unreachable for ``reconnect_timeout``.
            RedisCommandError: Redis refused to create the groups (e.g. the key is not a stream).
        """
        await self._prepare()
        for n, read in enumerate(self._reads):
            read.task = asyncio.create_task(self._run(read, housekeeping=n == 0), name=f"subscription-{self.agent_id}")
            read.task.add_done_callback(self._loop_ended)
        logger.info("%s: consuming %s as %s", self.agent_id, ", ".join(self._streams), self.consumer)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop reading, let handlers in hand finish for up to ``timeout`` s, then close.

        Messages whose handler did not finish stay pending and are delivered again to
        another instance after ``claim_idle``.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._slot_free.set()
        for read in self._reads:
            if read.task is not None:
                await stop_blocked(read.task, read.reader, self._pipeliner.node_for_key(read.streams[0]))
            read.reader.close()
        idle, self._idle = self._idle, []
        for wake in idle:  # idle workers end; busy ones end once the queue is empty
            if not wake.done():  # cancelled with its worker (the event loop is shutting down)
                wake.set_result(None)
        if self._workers:
            _, unfinished = await asyncio.wait(set(self._workers), timeout=timeout)
            for task in unfinished:
                task.cancel()
            if unfinished:
                logger.warning(
                    "%s: %d handlers and %d queued messages unfinished at stop; handed back",
                    self.agent_id,
                    len(unfinished),
                    len(self._queue),
                )
                await asyncio.gather(*unfinished, return_exceptions=True)
        if self._ack_scheduled:
            self._flush_acks()
        if self._ack_futures:  # acknowledgements of finished handlers still on the wire
            await asyncio.wait(set(self._ack_futures), timeout=timeout)
        for callback in self._stop_callbacks:
            callback(self)
        logger.info("%s: subscription %s stopped", self.agent_id, self.consumer)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- the loop --------------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Groups at 0 (Redis may have restarted without them), and inboxes kept: no TTL once a consumer reads them."""
        pipeliner = self._pipeliner
        with pipeliner.batch():
            created = [
                pipeliner.call("XGROUP", "CREATE", stream, keys.GROUP, "0", "MKSTREAM", replay=True)
                for stream in self._streams
            ]
            persisted = [pipeliner.call("PERSIST", stream, replay=True) for stream in self._streams]
            if self._recording:  # so tools find the records without SCAN
                owners = list(dict.fromkeys(self._owner.values()))
                persisted.append(pipeliner.call("SADD", keys.RECORD_INDEX, *owners, replay=True))
        # every future's outcome is read, so none is left with an error nobody retrieved
        for outcome in await asyncio.gather(*created, *persisted, return_exceptions=True):
            if isinstance(outcome, RedisCommandError) and outcome.code == "BUSYGROUP":
                continue  # the group exists already
            if isinstance(outcome, BaseException):
                raise outcome

    def _server_ms(self) -> float:
        return time.monotonic() * 1000 + self._server_offset_ms

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: read loop crashed", self.agent_id, exc_info=task.exception())

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the subscription is stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _run(self, read: _Read, *, housekeeping: bool) -> None:
        attempt = 0
        prepared = True
        # stop() sets the flag and wakes a blocked read with CLIENT UNBLOCK (see stop_blocked)
        while not self._stopped:
            try:
                if not prepared:
                    await self._prepare()  # Redis may have restarted without the groups
                    prepared = True
                response = await self._read(read, housekeeping=housekeeping)
                if attempt:
                    logger.info("%s: reading again", self.agent_id)
                attempt = 0
                read.reading = True
                self.reading = all(other.reading for other in self._reads)
            except (LinkLost, NotReady, AgentCommsError) as exc:
                # lost connection, LOADING, READONLY, NOGROUP (Redis restarted without its data) ...
                if self._stopped:
                    return
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                if isinstance(exc, RedisPermissionError) and attempt % 60 == 0:  # a wrong ACL user: say it loudly
                    level = logging.ERROR
                logger.log(level, "%s: cannot read (%s); retrying", self.agent_id, exc)
                self.reading = read.reading = False
                prepared = False
                await self._pause(backoff(attempt))
                attempt += 1
                continue
            except Exception:  # a bug must not leave a registered agent deaf: log it and go on
                if self._stopped:
                    return
                logger.exception("%s: unexpected error in the read loop; retrying", self.agent_id)
                self.reading = read.reading = False
                prepared = False
                await self._pause(backoff(attempt))
                attempt += 1
                continue
            if response:
                for stream, batch in response:  # raw: [stream, [[entry id, [field, value, ...]], ...]]
                    self._dispatch(stream.decode(), batch, deliveries=1)
                # let the workers start on them first: their replies go out before the next read is written
                await asyncio.sleep(0)

    async def _read(self, read: _Read, *, housekeeping: bool) -> Any:
        """Housekeeping when due (one loop does it), then one XREADGROUP for as many entries as there are free slots."""
        loop = asyncio.get_running_loop()
        if housekeeping and loop.time() >= self._housekeeping_at:
            await self._housekeeping()
            self._housekeeping_at = loop.time() + self._tick
        if len(self._reads) > 1:
            await read.reader.connect()  # so that no other loop fills the free slots between this count and the read
        free = self._concurrency - len(self._inflight)
        if free <= 0:
            self._slot_free.clear()
            if not self._stopped:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), self._tick)
            return None
        if self._stopped:
            return None
        block_ms = max(1, int((self._housekeeping_at - loop.time()) * 1000)) if housekeeping else MAX_BLOCK_MS
        return await read.reader.call(
            "XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", free, "BLOCK", block_ms,
            "STREAMS", *read.streams, *read.new, block_ms=block_ms,
        )  # fmt: skip

    def _dispatch(self, stream: str, batch: list[list[Any]], *, deliveries: int) -> None:
        """Queue raw entries ``[entry id, [field, value, ...]]`` of one stream for the workers."""
        now, inflight, queue = time.monotonic(), self._inflight, self._queue
        for entry_id, flat in batch:
            key = (stream, entry_id.decode())
            inflight[key] = now
            queue.append((*key, flat, deliveries))
        self.stats.received += len(batch)
        if len(self._reads) > 1 and len(inflight) >= self._concurrency:
            self._unblock_reads(stream)
        self._wake_worker()

    def _unblock_reads(self, stream: str) -> None:
        """Every handler slot is taken: end the other loops' blocked reads, which asked for entries while one was free.

        (On a cluster, where an agent's own inboxes and a role's are read by two loops.) A read whose entries are
        already on their way still delivers them; they wait for a free handler.
        """
        for read in self._reads:
            if stream not in read.streams and read.reader.busy and read.reader.client_id is not None:
                node = self._pipeliner.node_for_key(read.streams[0])
                node.fire("CLIENT", "UNBLOCK", read.reader.client_id, replay=False)

    # -- the workers -----------------------------------------------------------------------
    #
    # A task per message costs more than most handlers (creating, scheduling and finishing
    # it). Workers are long-lived instead: a worker runs queued messages one after another
    # for as long as their handlers finish without waiting, and one more worker is woken
    # whenever messages are left in the queue, so that when a handler does wait (on an
    # LLM, a database) the next message starts at once on another worker. A batch of
    # quick handlers costs two wake-ups, not a task each; at most ``concurrency``
    # handlers run at once.

    def _wake_worker(self) -> None:
        if self._waking:
            return  # one already woken, not yet running, will take the next message
        while self._idle and self._idle[-1].done():  # cancelled with its worker
            self._idle.pop()
        if self._idle:
            self._idle.pop().set_result(None)
        elif len(self._workers) < self._concurrency:
            task = asyncio.get_running_loop().create_task(self._work(), name=f"worker-{self.agent_id}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        else:
            return  # all busy: each takes the next queued message when its handler finishes
        self._waking = True

    async def _work(self) -> None:
        queue, loop = self._queue, asyncio.get_running_loop()
        while True:
            self._waking = False
            while queue:
                work = queue.popleft()
                if queue:
                    self._wake_worker()  # stand by in case this handler waits
                try:
                    await self._process(*work)
                except Exception:  # _process handles handler errors; this is a bug, not a reason to stop
                    logger.exception("%s: unexpected error processing %s", self.agent_id, work[1])
            if self._stopped:
                return
            wake: asyncio.Future[None] = loop.create_future()
            self._idle.append(wake)
            await wake

    # -- one message -----------------------------------------------------------------------

    def _parse(
        self, flat: Sequence[bytes] | None, recipient: str | None = None
    ) -> tuple[AgentMessage, bytes, bytes | None] | str:
        """The message in a raw entry's fields, its body and token, or why it is not one.

        Checked before parsing where possible.
        """
        token = None
        if flat is not None and len(flat) == 2 and flat[0] == b"m":
            body = flat[1]  # what every entry we write looks like (without security)
        elif flat is not None and len(flat) == 4 and flat[0] == b"m" and flat[2] == b"a":
            body, token = flat[1], flat[3]  # and with security
        else:
            items = iter(flat or ())
            fields = dict(zip(items, items, strict=False))
            found = fields.get(b"m")
            if found is None:
                return f"malformed: entry has no 'm' field (fields: {_field_names(fields)[:200]})"
            body, token = found, fields.get(b"a")
        if len(body) > self._max_bytes:
            return f"too large: {len(body)} bytes, limit {self._max_bytes}"
        try:
            message: AgentMessage = (_validate_message if self._security is None else _validate_verified)(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if errors and errors[0]["type"] == "json_invalid":
                return f"malformed: not JSON ({errors[0]['msg']})"
            return f"invalid schema: {describe_errors(exc, limit=5)}"
        if message.recipient_id != (recipient or self.agent_id):
            return f"wrong recipient: addressed to {message.recipient_id!r}"
        if message.reply_to is not None and not keys.is_reply_stream(message.reply_to):
            return f"invalid reply_to {message.reply_to[:80]!r}: not a reply stream"
        return message, body, token

    def _expired(self, entry_id: str, message: AgentMessage) -> bool:
        timeout = message.payload.response_timeout
        if message.reply_to is None or timeout is None:
            return False
        sent_ms = int(entry_id.split("-", 1)[0])  # the entry id is the Redis server's clock at XADD
        return self._server_ms() > sent_ms + timeout * 1000

    async def _process(self, stream: str, entry_id: str, flat: Sequence[bytes] | None, deliveries: int) -> None:
        key = (stream, entry_id)
        acknowledging = False
        try:
            parsed = self._parse(flat, self._owner.get(stream))
            if isinstance(parsed, str):
                await self._dead_letter(stream, entry_id, parsed, deliveries)
                return
            message, body, token = parsed
            if self._expired(entry_id, message):
                self.stats.expired += 1
                await self._dead_letter(stream, entry_id, "expired: not handled within response_timeout", deliveries)
                return
            sealed = message.sealed is not None
            if self._security is not None:
                verdict = self._security.check_now(message, body, token, entry_id, self._role)
                if verdict is None:  # a new or stale sender, another kind of token, or a wrong one
                    verdict = await self._security.check(message, body, token, entry_id, self._role)
                if isinstance(verdict, Refusal):
                    acknowledging = await self._refused(stream, entry_id, message, body, verdict, deliveries)
                    return
                message = verdict
            try:
                CURRENT_CONVERSATION.set(message.conversation_id)  # what the handler sends joins the conversation
                result = await self._handler(message)
            except Exception as exc:
                await self._failed(key, message, deliveries, exc)
                return
            if message.reply_to is None and isinstance(result, AgentResponse) and not result.success:
                # a one-way message refused by its handler: nobody would see the error, so it is kept with it
                self.stats.rejected += 1
                error = result.error
                reason = f"rejected: {error.code}: {error.message}" if error else "rejected by the handler"
                await self._dead_letter(stream, entry_id, reason[:1000], deliveries)
                return
            self._complete(stream, entry_id, message, body, result, sealed=sealed)
            acknowledging = True  # _acked() finishes the bookkeeping when the ack is answered
        except AgentCommsError as exc:
            logger.warning(
                "%s: could not dead-letter %s (%s); it will be delivered again", self.agent_id, entry_id, exc
            )
        finally:
            if not acknowledging:
                self._inflight.pop(key, None)
                self._slot_free.set()

    async def _failed(self, key: tuple[str, str], message: AgentMessage, deliveries: int, exc: Exception) -> None:
        self.stats.failed += 1
        error = f"{type(exc).__name__}: {exc}"[:500]
        self._last_error[key] = error
        logger.exception(
            "%s: handler failed on %s (%s), delivery %d of %d",
            self.agent_id,
            message.message_id,
            message.intent,
            deliveries,
            self._max_deliveries,
        )
        if deliveries >= self._max_deliveries:
            reason = f"handler failed {deliveries} times; last error: {error}"
            await self._dead_letter(key[0], key[1], reason, deliveries)
        # otherwise it stays pending and is delivered again after claim_idle

    async def _refused(
        self, stream: str, entry_id: str, message: AgentMessage, body: bytes, refusal: Refusal, deliveries: int
    ) -> bool:
        """Security refused the message: a ``forbidden`` request is answered so; anything else is dead-lettered.

        Returns whether an acknowledgement was queued (the reply's).
        """
        self.stats.refused += 1
        if refusal.kind == "forbidden" and message.reply_to is not None:
            refused = AgentResponse.fail("forbidden", refusal.reason)
            self._complete(stream, entry_id, message, body, refused, sealed=False)
            return True
        # unauthenticated or replayed: no answer (its reply_to is not to be trusted)
        await self._dead_letter(stream, entry_id, str(refusal), deliveries, tell=False)
        return False

    def _complete(
        self, stream: str, entry_id: str, message: AgentMessage, stored: bytes, result: Any, *, sealed: bool
    ) -> None:
        """Write the reply (if any) and queue the acknowledgement behind it (``stored``: the message's body)."""
        body = b""
        if message.reply_to is not None:
            response = _as_response(result, message, self.agent_id)
            security = self._security
            if security is not None:
                response = security.reply_body(response, own_id=self.agent_id, peer_id=message.sender_id, sealed=sealed)
            try:
                body = _dump_response(response, exclude_none=True)
            except PydanticSerializationError as exc:
                failure = AgentResponse.fail(
                    "invalid_result",
                    f"the handler's result cannot be sent as JSON: {exc}",
                    correlation_id=response.correlation_id,
                    responder_id=self.agent_id,
                )
                body = _dump_response(failure, exclude_none=True)
            token = b""
            if security is not None:
                token = security.reply_token(body, own_id=self.agent_id, peer_id=message.sender_id)
            written = self._reply(message.reply_to, body, token)
            pipeliner = self._pipeliner
            if pipeliner.cluster and pipeliner.node_for_key(message.reply_to) is not pipeliner.node_for_key(stream):
                # on a cluster the reply may go to another primary, over another connection: the acknowledgement
                # waits for the reply's answer instead of queueing behind it
                ack = functools.partial(self._acknowledge, stream, entry_id, message.conversation_id, stored, body)
                written.add_done_callback(functools.partial(self._ack_after_reply, stream, entry_id, ack))
                return
        self._acknowledge(stream, entry_id, message.conversation_id, stored, body)

    def _ack_after_reply(self, stream: str, entry_id: str, ack: Callable[[], None], done: asyncio.Future[Any]) -> None:
        """A cluster's acknowledgement once the reply, on another primary, is answered (see :meth:`_reply_written`)."""
        error = None if done.cancelled() else done.exception()
        if isinstance(error, BrokerConnectionError) or done.cancelled():
            self._inflight.pop((stream, entry_id), None)  # left pending: handled again after claim_idle
            self._slot_free.set()
            return
        ack()

    def _reply(self, reply_stream: str, body: bytes, token: bytes = b"") -> asyncio.Future[Any]:
        """Queue a reply (a repeat after a lost connection is harmless: the caller drops duplicates)."""
        if token:
            written = self._pipeliner.call("XADD", reply_stream, "*", "r", body, "a", token, replay=True)
        else:
            written = self._pipeliner.call("XADD", reply_stream, "*", "r", body, replay=True)
        written.add_done_callback(self._reply_written)
        self._refresh_ttl(reply_stream)
        return written

    def _reply_written(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or (error := done.exception()) is None:
            return
        self.stats.replies_failed += 1
        if isinstance(error, BrokerConnectionError):
            # Redis was away: the acknowledgement queued behind the reply fails too, so the
            # message stays pending and is handled again (its caller may still get that answer)
            logger.warning("%s: a reply could not be written (%s); it will be handled again", self.agent_id, error)
        else:  # refused (out of memory ...): the acknowledgement behind it goes through
            logger.error("%s: a reply could not be written (%s); its caller will time out", self.agent_id, error)

    def _acknowledge(self, stream: str, entry_id: str, conversation_id: str, stored: bytes, reply: bytes) -> None:
        """Queue an acknowledgement; those queued in one event-loop tick go out as one ACK call per stream.

        It is queued after the reply's XADD, and commands run in order on one connection,
        so once the ack is answered the reply was written (or refused: see ``replies_failed``).
        While recording, the call also records the message with its reply and when it was delivered.
        """
        delivered = 0  # only the record wants it
        if self._recording:
            read_at = self._inflight.get((stream, entry_id)) or time.monotonic()
            delivered = int(read_at * 1000 + self._server_offset_ms)
        self._acks.setdefault(stream, []).append((entry_id, conversation_id, delivered, stored, reply))
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        batches, self._acks = self._acks, {}
        for stream, items in batches.items():
            for start in range(0, len(items), _ACK_BATCH):
                batch = items[start : start + _ACK_BATCH]
                ids = [item[0] for item in batch]
                if self._recording:
                    record = keys.record(self._owner.get(stream, self.agent_id))
                    args: list[Any] = [keys.GROUP, self._channel, self._settings.record_max_entries]
                    args += self._record_housekeeping(record)
                    for item in batch:
                        args += item
                    acked = self._pipeliner.script(ACK, [stream, record], args, replay=True)
                else:
                    acked = self._pipeliner.script(
                        ACK, [stream], [keys.GROUP, self._channel, 0, 0, 0, *ids], replay=True
                    )
                self._ack_futures.add(acked)
                acked.add_done_callback(functools.partial(self._acked, stream, ids))

    def _record_housekeeping(self, record: str) -> list[int]:
        """The ACK call's cutoff (server ms; 0: not this call) and TTL for a record: due every minute at most."""
        now = time.monotonic()
        max_age_ms = int(self._settings.record_max_age * 1000)
        if now < self._record_trim_at.get(record, 0.0):
            return [0, max_age_ms]
        self._record_trim_at[record] = now + min(_RECORD_HOUSEKEEPING, self._settings.record_max_age / 10)
        return [max(1, int(now * 1000 + self._server_offset_ms) - max_age_ms), max_age_ms]

    def _acked(self, stream: str, ids: list[str], done: asyncio.Future[Any]) -> None:
        """Bookkeeping once a batch of acknowledgements was answered (or failed)."""
        self._ack_futures.discard(done)
        failed = done.cancelled() or done.exception() is not None
        for entry_id in ids:
            self._inflight.pop((stream, entry_id), None)
            self._last_error.pop((stream, entry_id), None)
        if failed:
            error = "cancelled" if done.cancelled() else done.exception()
            logger.warning(
                "%s: could not acknowledge %d messages (%s); they will be delivered again",
                self.agent_id,
                len(ids),
                error,
            )
        else:
            self.stats.handled += len(ids)
            unrecorded = done.result()[1]
            if unrecorded:
                self.stats.unrecorded += unrecorded
                logger.warning("%s: Redis refused to record %d handled messages", self.agent_id, unrecorded)
        self._slot_free.set()

    async def _dead_letter(
        self,
        stream: str,
        entry_id: str,
        reason: str,
        deliveries: int,
        *,
        claim_idle_ms: int | None = None,
        tell: bool = True,
    ) -> None:
        record = None
        owner = self._owner.get(stream, self.agent_id)
        if self._recording:
            read_at = self._inflight.get((stream, entry_id))
            delivered = int(read_at * 1000 + self._server_offset_ms) if read_at is not None else 0
            record = (self._settings.record_max_entries, int(self._settings.record_max_age * 1000), delivered)
        moved = await move_to_dead_letters(
            self._pipeliner, owner, stream, entry_id, reason, deliveries,
            consumer=self.consumer, claim_idle_ms=claim_idle_ms, record=record,
        )  # fmt: skip
        if moved is None:
            return  # another instance holds it
        body, by_this_call = moved
        self._last_error.pop((stream, entry_id), None)
        if tell and not reason.startswith("expired"):
            self._tell_caller(body, reason)  # also after a repeat: the caller drops a second answer
        if not by_this_call:
            return  # moved by an earlier run of this call (its answer was lost), or by another instance
        self.stats.dead_lettered += 1
        parsed = self._parse([b"m", body], owner) if body else None
        if isinstance(parsed, tuple) and self._channel:
            self._pipeliner.fire(
                "PUBLISH", self._channel, feed_event("dead_lettered", parsed[0], reason=reason), replay=False
            )

    def _tell_caller(self, body: bytes, reason: str) -> None:
        """If a dead-lettered entry was a request with a valid reply stream, answer ``dead_lettered`` at once.

        Read leniently: a request refused for its schema or its recipient still names who waits.
        """
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):
            return
        if not isinstance(raw, dict):
            return
        reply_to, correlation = raw.get("reply_to"), raw.get("correlation_id") or raw.get("message_id")
        if not isinstance(reply_to, str) or not keys.is_reply_stream(reply_to):
            return
        if not isinstance(correlation, str) or _MESSAGE_ID.fullmatch(correlation) is None:
            return
        failure = AgentResponse.fail("dead_lettered", reason, correlation_id=correlation, responder_id=self.agent_id)
        reply = _dump_response(failure, exclude_none=True)
        token = b""
        if self._security is not None:
            sender = raw.get("sender_id")
            # only to a sender verified before (its keys agreed), at its own reply stream
            if not isinstance(sender, str) or self._security.known(self.agent_id, sender) is None:
                return
            if not keys.is_reply_stream_of(reply_to, sender):
                return
            token = self._security.reply_token(reply, own_id=self.agent_id, peer_id=sender)
        self._reply(reply_to, reply, token)

    def _refresh_ttl(self, reply_stream: str) -> None:
        """Keep a caller's reply stream expiring ``reply_ttl`` after its last reply (refreshed at most every ttl/10)."""
        now = time.monotonic()
        if now < self._ttl_refreshed.get(reply_stream, 0.0):
            return
        if len(self._ttl_refreshed) > 10_000:
            self._ttl_refreshed.clear()
        ttl = self._settings.reply_ttl
        self._ttl_refreshed[reply_stream] = now + ttl / 10
        self._pipeliner.fire("PEXPIRE", reply_stream, int(ttl * 1000), replay=True)

    # -- housekeeping ----------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """The server's clock, then keep-alive of long handlers and takeover of abandoned entries."""
        sent = time.monotonic()
        seconds, micros = await self._pipeliner.call("TIME", replay=True)
        now = time.monotonic()
        # the server's time at the middle of the round trip, against the monotonic clock (immune to clock steps);
        # a slow round trip (a busy connection) says little: kept only if the last good one is 30 s old
        server_ms = int(seconds) * 1000 + int(micros) / 1000
        rtt = now - sent
        if rtt <= self._clock_rtt * 2 + 0.001 or now - self._clock_at > 30:
            self._server_offset_ms = server_ms - (sent + now) * 500
            self._clock_rtt, self._clock_at = rtt, now
        await self._keepalive()
        await self._reclaim()

    async def _adopt(self, stream: str, orphans: dict[str, int]) -> None:
        """Handle entries pending for this consumer that it does not hold: reset their idle time, read, queue."""
        ids = list(orphans)
        await self._pipeliner.call("XCLAIM", stream, keys.GROUP, self.consumer, 0, *ids, "JUSTID", replay=True)
        with self._pipeliner.batch():
            reads = [self._pipeliner.call("XRANGE", stream, i, i, replay=True) for i in ids]
        for entry_id, found in zip(ids, await asyncio.gather(*reads), strict=True):
            if found:
                logger.info("%s: handling %s, delivered to this instance but not taken in", self.agent_id, entry_id)
                self._dispatch(stream, [found[0]], deliveries=orphans[entry_id])

    async def _keepalive(self) -> None:
        """Reset the idle time of entries still being handled, so no other instance takes them."""
        threshold = time.monotonic() - self._claim_idle_ms / 3000
        by_stream: dict[str, list[str]] = {}
        for (stream, entry_id), started in self._inflight.items():
            if started < threshold:
                by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self._pipeliner.call("XCLAIM", stream, keys.GROUP, self.consumer, 0, *ids, "JUSTID", replay=True)

    async def _reclaim(self) -> None:
        """Take over entries idle longer than ``claim_idle``; dead-letter the exhausted ones."""
        for stream in self._streams:
            start = "-"
            while True:
                page = await self._pipeliner.call(
                    "XPENDING", stream, keys.GROUP, "IDLE", self._claim_idle_ms, start, "+", _PENDING_PAGE,
                    replay=True,
                )  # fmt: skip
                if not page:
                    break
                await self._take_over(stream, page)
                if len(page) < _PENDING_PAGE:
                    break
                start = "(" + page[-1][0].decode()

    async def _take_over(self, stream: str, page: list[list[Any]]) -> None:
        retry: dict[str, int] = {}
        orphans: dict[str, int] = {}
        for pending in page:  # [entry id, consumer, idle ms, times delivered]
            entry_id, delivered = pending[0].decode(), int(pending[3])
            key = (stream, entry_id)
            if key in self._inflight:
                continue
            if pending[1] == self._consumer_bytes and (
                key not in self._last_error or self._unanswered_claims.get(key) == delivered
            ):
                # ours and not in hand: delivered to us by a claim whose answer was lost with the
                # connection (or its acknowledgement was lost): handle it, without spending a delivery
                self._unanswered_claims.pop(key, None)
                orphans[entry_id] = delivered
                continue
            if delivered >= self._max_deliveries:
                last = self._last_error.get((stream, entry_id))
                reason = f"delivery attempts exhausted after {delivered} deliveries" + (
                    f"; last error: {last}" if last else ""
                )
                await self._dead_letter(stream, entry_id, reason, delivered, claim_idle_ms=self._claim_idle_ms)
            else:
                retry[entry_id] = delivered
        if orphans:
            await self._adopt(stream, orphans)
        if not retry:
            return
        # a repeat after a lost connection claims nothing (the first run did): the entries stay
        # ours, pending, and come back as orphans above at the next round
        claimed = await self._pipeliner.call(
            "XCLAIM", stream, keys.GROUP, self.consumer, self._claim_idle_ms, *retry, replay=True
        )
        answered = {entry[0].decode() for entry in claimed or () if entry is not None}
        if len(self._unanswered_claims) > 10_000:
            self._unanswered_claims.clear()
        for entry_id in retry.keys() - answered:  # another instance's now, or ours if the claim's answer was lost
            self._unanswered_claims[(stream, entry_id)] = retry[entry_id] + 1
        for entry in claimed or ():
            if entry is None or entry[1] is None:
                continue  # deleted while pending (Redis 6.2): dead-lettered when its deliveries run out
            taken = entry[0].decode()
            self.stats.reclaimed += 1
            logger.info("%s: took over %s after %d deliveries", self.agent_id, taken, retry[taken])
            self._dispatch(stream, [entry], deliveries=retry[taken] + 1)
