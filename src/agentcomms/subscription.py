"""Subscription: one running consumer of an agent id's inbox.

The loop reads new entries with XREADGROUP on its own connection and queues them for a
pool of at most ``concurrency`` worker tasks, which run the handler and acknowledge each
message together with its reply in the broker's next pipeline. Every ``claim_idle / 3``
it also

* keeps its own long-running entries from looking abandoned (XCLAIM ... JUSTID), and
* takes over entries pending longer than ``claim_idle`` (a dead instance's, or ones
  whose handler failed), dead-lettering those delivered ``max_deliveries`` times.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError
from redis.exceptions import RedisError, ResponseError

from agentcomms import keys
from agentcomms._redis import (
    ACK,
    MAX_BLOCK_MS,
    READER_TIMEOUT,
    TRANSIENT_ERRORS,
    RawConnection,
    backoff,
    decode,
    fields_dict,
    stop_reader,
)
from agentcomms.exceptions import BrokerConnectionError
from agentcomms.schemas import AgentMessage, AgentResponse, describe_errors

if TYPE_CHECKING:
    from agentcomms.broker import MessageBroker

__all__ = ["Handler", "Subscription", "SubscriptionStats"]

logger = logging.getLogger(__name__)

Handler = Callable[[AgentMessage], Awaitable[Any]]
"""An async function taking a message; for a request its return value becomes the reply."""

_Work = tuple[str, str, Sequence[bytes] | None, int]
"""A queued message: stream, entry id, its raw ``[field, value, ...]``, deliveries so far."""

_validate_message = AgentMessage.__pydantic_validator__.validate_json
_dump_response = AgentResponse.__pydantic_serializer__.to_json

_PENDING_PAGE = 100
_ACK_BATCH = 1000
"""Entry ids acknowledged by one ACK call at the most (Lua's unpack limit is about 8,000)."""


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription."""

    received: int = 0
    handled: int = 0
    failed: int = 0
    reclaimed: int = 0
    expired: int = 0
    dead_lettered: int = 0


def _as_response(result: Any, message: AgentMessage, agent_id: str) -> AgentResponse:
    correlation_id = message.correlation_id or message.message_id
    if isinstance(result, AgentResponse):
        return result.model_copy(update={"correlation_id": correlation_id, "responder_id": agent_id})
    return AgentResponse(success=True, data=result, correlation_id=correlation_id, responder_id=agent_id)


class Subscription:
    """Handles the messages of one agent id; created by :meth:`MessageBroker.subscribe_to_agent`."""

    def __init__(
        self, broker: MessageBroker, agent_id: str, handler: Handler, *, concurrency: int, consumer_name: str
    ) -> None:
        settings = broker.settings
        self.agent_id = agent_id
        self.consumer = consumer_name
        self.stats = SubscriptionStats()
        self._broker = broker
        self._handler = handler
        self._streams = keys.inboxes(agent_id)
        self._new = [">"] * len(self._streams)
        self._concurrency = concurrency
        self._claim_idle_ms = int(settings.claim_idle * 1000)
        self._tick = max(0.02, min(settings.claim_idle / 3, MAX_BLOCK_MS / 1000))
        self._max_bytes = settings.max_message_bytes
        self._max_deliveries = settings.max_deliveries
        self._inflight: dict[tuple[str, str], float] = {}
        self._last_error: dict[tuple[str, str], str] = {}
        self._queue: collections.deque[_Work] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: list[asyncio.Future[None]] = []
        self._waking = False
        self._slot_free = asyncio.Event()
        self._reader: RawConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._clock_offset_ms = 0.0
        self._reader_id: int | None = None
        self._ttl_refreshed: dict[str, float] = {}
        self._acks: dict[str, list[str]] = {}
        self._ack_futures: set[asyncio.Future[Any]] = set()
        self._ack_scheduled = False
        self._stop_callbacks: list[Callable[[Subscription], object]] = []
        self._stopped = False

    @property
    def running(self) -> bool:
        """Whether the read loop is alive."""
        return self._task is not None and not self._task.done()

    @property
    def in_flight(self) -> int:
        """Messages read and not yet acknowledged by this subscription."""
        return len(self._inflight)

    def on_stop(self, callback: Callable[[Subscription], object]) -> None:
        """Call ``callback(self)`` once the subscription has stopped."""
        self._stop_callbacks.append(callback)

    async def start(self) -> None:
        """Create the consumer groups (at 0, so nothing sent earlier is skipped) and start reading."""
        self._reader = RawConnection(self._broker.client, read_timeout=READER_TIMEOUT)
        await self._prepare()
        self._task = asyncio.create_task(self._run(), name=f"subscription-{self.agent_id}")
        self._task.add_done_callback(self._loop_ended)
        logger.info("%s: consuming %s as %s", self.agent_id, ", ".join(self._streams), self.consumer)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop reading, let handlers in hand finish for up to ``timeout`` s, then close.

        Messages whose handler did not finish stay pending and are delivered again to
        another instance after ``claim_idle``.
        """
        if self._stopped:
            return
        self._stopped = True
        self._slot_free.set()
        if self._task is not None:
            await stop_reader(self._task, self._broker.client, self._reader_id)
        idle, self._idle = self._idle, []
        for wake in idle:  # idle workers end; busy ones end once the queue is empty
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
        if self._reader is not None:
            await self._reader.close()
        for callback in self._stop_callbacks:
            callback(self)
        logger.info("%s: subscription %s stopped", self.agent_id, self.consumer)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- the loop --------------------------------------------------------------------------

    @property
    def _redis(self) -> RawConnection:
        assert self._reader is not None
        return self._reader

    async def _prepare(self) -> None:
        for stream in self._streams:
            try:
                await self._redis.call("XGROUP", "CREATE", stream, keys.GROUP, "0", "MKSTREAM")
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._reader_id = int(await self._redis.call("CLIENT", "ID"))
        seconds, micros = await self._redis.call("TIME")
        self._clock_offset_ms = int(seconds) * 1000 + int(micros) / 1000 - time.time() * 1000

    def _server_ms(self) -> float:
        return time.time() * 1000 + self._clock_offset_ms

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: read loop crashed", self.agent_id, exc_info=task.exception())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        housekeeping_at = 0.0
        reconnected = False
        # stop() sets the flag and wakes a blocked read with CLIENT UNBLOCK (see stop_reader)
        while not self._stopped:
            try:
                if reconnected:
                    await self._prepare()  # Redis may have restarted: groups and clock again
                    reconnected = False
                if loop.time() >= housekeeping_at:
                    await self._keepalive()
                    await self._reclaim()
                    housekeeping_at = loop.time() + self._tick
                free = self._concurrency - len(self._inflight)
                if free <= 0:
                    self._slot_free.clear()
                    if self._stopped:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_free.wait(), self._tick)
                    continue
                block_ms = max(1, int((housekeeping_at - loop.time()) * 1000))
                response = await self._redis.call(
                    "XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", free, "BLOCK", block_ms,
                    "STREAMS", *self._streams, *self._new,
                )  # fmt: skip
                attempt = 0
            except TRANSIENT_ERRORS as exc:
                if self._stopped:
                    return
                logger.warning("%s: lost Redis (%s); reconnecting", self.agent_id, exc)
                await asyncio.sleep(backoff(attempt))
                attempt, reconnected = attempt + 1, True
                continue
            except RedisError as exc:
                # NOGROUP (group deleted, Redis restarted without its data) or any other server error
                logger.warning("%s: Redis error in read loop (%s); retrying", self.agent_id, exc)
                await asyncio.sleep(backoff(attempt))
                attempt, reconnected = attempt + 1, True
                continue
            if response:
                for stream, batch in response:  # raw: [stream, [[entry id, [field, value, ...]], ...]]
                    self._dispatch(decode(stream), batch, deliveries=1)
                # let the workers start on them first: their replies go out before the next read is written
                await asyncio.sleep(0)

    def _dispatch(self, stream: str, batch: list[list[Any]], *, deliveries: int) -> None:
        """Queue raw entries ``[entry id, [field, value, ...]]`` of one stream for the workers."""
        now, inflight, queue = time.monotonic(), self._inflight, self._queue
        for entry_id, flat in batch:
            key = (stream, entry_id.decode())
            inflight[key] = now
            queue.append((*key, flat, deliveries))
        self.stats.received += len(batch)
        self._wake_worker()

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

    def _parse(self, flat: Sequence[bytes] | None) -> AgentMessage | str:
        """The message in a raw entry's fields, or why it is not one (checked before parsing where possible)."""
        if flat is not None and len(flat) == 2 and flat[0] == b"m":
            body = flat[1]  # what every entry we write looks like
        else:
            fields = fields_dict(flat)
            found = fields.get(b"m")
            if found is None:
                names = ", ".join(sorted(decode(k) for k in fields)) or "none"
                return f"malformed: entry has no 'm' field (fields: {names[:200]})"
            body = found
        if len(body) > self._max_bytes:
            return f"too large: {len(body)} bytes, limit {self._max_bytes}"
        try:
            message: AgentMessage = _validate_message(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if errors and errors[0]["type"] == "json_invalid":
                return f"malformed: not JSON ({errors[0]['msg']})"
            return f"invalid schema: {describe_errors(exc, limit=5)}"
        if message.recipient_id != self.agent_id:
            return f"wrong recipient: addressed to {message.recipient_id!r}"
        if message.reply_to is not None and not keys.is_reply_stream(message.reply_to):
            return f"invalid reply_to {message.reply_to[:80]!r}: not a reply stream"
        return message

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
            message = self._parse(flat)
            if isinstance(message, str):
                await self._dead_letter(stream, entry_id, message, deliveries)
                return
            if self._expired(entry_id, message):
                self.stats.expired += 1
                await self._dead_letter(stream, entry_id, "expired: not handled within response_timeout", deliveries)
                return
            try:
                result = await self._handler(message)
            except Exception as exc:
                await self._failed(key, message, deliveries, exc)
                return
            self._complete(stream, entry_id, message, result)
            acknowledging = True  # _acked() finishes the bookkeeping when the ack is answered
        except BrokerConnectionError as exc:
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

    def _complete(self, stream: str, entry_id: str, message: AgentMessage, result: Any) -> None:
        """Write the reply (if any) and queue the acknowledgement behind it."""
        broker = self._broker
        if message.reply_to is not None:
            response = _as_response(result, message, self.agent_id)
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
            broker.pipeliner.fire("XADD", message.reply_to, "*", "r", body)
            self._refresh_ttl(message.reply_to)
        self._acknowledge(stream, entry_id)

    def _acknowledge(self, stream: str, entry_id: str) -> None:
        """Queue an acknowledgement; those queued in one event-loop tick go out as one ACK call per stream.

        It is queued after the reply's XADD, and commands run in order on one connection,
        so once the ack is answered the reply was written.
        """
        self._acks.setdefault(stream, []).append(entry_id)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        batches, self._acks = self._acks, {}
        channel = keys.EVENTS_CHANNEL if self._broker.settings.event_feed else ""
        for stream, items in batches.items():
            for start in range(0, len(items), _ACK_BATCH):
                ids = items[start : start + _ACK_BATCH]
                acked = self._broker.pipeliner.script(ACK, [stream], [keys.GROUP, channel, *ids])
                self._ack_futures.add(acked)
                acked.add_done_callback(functools.partial(self._acked, stream, ids))

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
        self._slot_free.set()

    async def _dead_letter(
        self, stream: str, entry_id: str, reason: str, deliveries: int, *, claim_idle_ms: int | None = None
    ) -> None:
        body = await self._broker.dead_letter(
            self.agent_id, stream, entry_id, reason, deliveries, claim_idle_ms=claim_idle_ms
        )
        if body is None:
            return  # another instance took it first
        self.stats.dead_lettered += 1
        self._last_error.pop((stream, entry_id), None)
        message = self._parse([b"m", body]) if body else None
        if not isinstance(message, AgentMessage):
            return
        pipeliner = self._broker.pipeliner
        if message.reply_to is not None and not reason.startswith("expired"):
            # tell the waiting caller now rather than let it time out
            failure = AgentResponse.fail(
                "dead_lettered",
                reason,
                correlation_id=message.correlation_id or message.message_id,
                responder_id=self.agent_id,
            )
            pipeliner.fire("XADD", message.reply_to, "*", "r", failure.model_dump_json())
            self._refresh_ttl(message.reply_to)
        if self._broker.settings.event_feed:
            pipeliner.fire("PUBLISH", keys.EVENTS_CHANNEL, self._broker.event("dead_lettered", message, reason=reason))

    def _refresh_ttl(self, reply_stream: str) -> None:
        """Keep a caller's reply stream expiring ``reply_ttl`` after its last reply (refreshed at most every ttl/10)."""
        now = time.monotonic()
        if now < self._ttl_refreshed.get(reply_stream, 0.0):
            return
        if len(self._ttl_refreshed) > 10_000:
            self._ttl_refreshed.clear()
        ttl = self._broker.settings.reply_ttl
        self._ttl_refreshed[reply_stream] = now + ttl / 10
        self._broker.pipeliner.fire("PEXPIRE", reply_stream, int(ttl * 1000))

    # -- housekeeping ----------------------------------------------------------------------

    async def _keepalive(self) -> None:
        """Reset the idle time of entries still being handled, so no other instance takes them."""
        threshold = time.monotonic() - self._claim_idle_ms / 3000
        by_stream: dict[str, list[str]] = {}
        for (stream, entry_id), started in self._inflight.items():
            if started < threshold:
                by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self._redis.call("XCLAIM", stream, keys.GROUP, self.consumer, 0, *ids, "JUSTID")

    async def _reclaim(self) -> None:
        """Take over entries idle longer than ``claim_idle``; dead-letter the exhausted ones."""
        for stream in self._streams:
            start = "-"
            while True:
                page = await self._redis.call(
                    "XPENDING", stream, keys.GROUP, "IDLE", self._claim_idle_ms, start, "+", _PENDING_PAGE
                )
                if not page:
                    break
                await self._take_over(stream, page)
                if len(page) < _PENDING_PAGE:
                    break
                start = "(" + decode(page[-1][0])

    async def _take_over(self, stream: str, page: list[list[Any]]) -> None:
        retry: dict[str, int] = {}
        for pending in page:  # [entry id, consumer, idle ms, times delivered]
            entry_id, delivered = decode(pending[0]), int(pending[3])
            if (stream, entry_id) in self._inflight:
                continue
            if delivered >= self._max_deliveries:
                last = self._last_error.get((stream, entry_id))
                reason = f"delivery attempts exhausted after {delivered} deliveries" + (
                    f"; last error: {last}" if last else ""
                )
                await self._dead_letter(stream, entry_id, reason, delivered, claim_idle_ms=self._claim_idle_ms)
            else:
                retry[entry_id] = delivered
        if not retry:
            return
        claimed = await self._redis.call("XCLAIM", stream, keys.GROUP, self.consumer, self._claim_idle_ms, *retry)
        for entry in claimed or ():
            if entry is None or entry[1] is None:
                continue  # deleted while pending (Redis 6.2): dead-lettered when its deliveries run out
            taken = decode(entry[0])
            self.stats.reclaimed += 1
            logger.info("%s: took over %s after %d deliveries", self.agent_id, taken, retry[taken])
            self._dispatch(stream, [entry], deliveries=retry[taken] + 1)
