"""Redis plumbing for the broker: clients, Lua scripts, and the pipeliner.

The pipeliner is why a request costs one round trip per hop: every send, reply and
acknowledgement issued during one event-loop tick goes out in a single pipeline, and
callers never cancel a Redis command mid-flight (they only stop awaiting its future),
so a cancelled request cannot leave a connection out of step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from agentcomms.exceptions import BrokerConnectionError

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

EncodableT = bytes | str | int | float

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it with RESP2 and bytes: (id, {field: value})."""


def decode(value: bytes | str) -> str:
    """Text of a Redis reply value (the clients return bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def read_reply(response: Any) -> list[tuple[bytes, list[Entry]]]:
    """XREAD / XREADGROUP reply as typed data (redis-py types it as Any)."""
    return cast(list[tuple[bytes, list[Entry]]], response or [])


def entries(response: Any) -> list[Entry]:
    """XRANGE / XCLAIM reply as typed data; XCLAIM on Redis 6.2 may hold (None, None) for deleted entries."""
    return cast(list[Entry], response or [])


def make_client(url: str, *, password: str | None, db: int) -> Redis:
    """A redis-py asyncio client that returns bytes."""
    kwargs: dict[str, Any] = {"password": password, "db": db}
    if not url.startswith("unix://"):
        kwargs["socket_keepalive"] = True
    return Redis.from_url(
        url,
        protocol=2,  # response shapes the same on every supported redis-py (8.x defaults to RESP3)
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 2),
        max_connections=64,
        **kwargs,
    )


class ReplyReader:
    """Replies read straight from a redis-py connection's stream and parsed with hiredis.

    redis-py opens the connection (address, TLS, AUTH, SELECT, client name); after its
    handshake, reading goes through here: one await per read of whatever bytes arrived,
    every complete reply in them parsed at once, instead of redis-py's ``read_response``
    per reply (an await and a timeout scope each). Error replies come back as the
    exceptions redis-py would raise (``NoScriptError``, ``ResponseError``), not raised.
    """

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._parser = self._new_parser()

    def _new_parser(self) -> hiredis.Reader:
        parse_error = getattr(self._connection._parser, "parse_error", ResponseError)
        return hiredis.Reader(protocolError=InvalidResponse, replyError=parse_error)

    def reset(self) -> None:
        """Forget buffered bytes: call after every (re)connect."""
        self._parser = self._new_parser()

    async def read(self, timeout: float | None) -> list[Any]:
        """Wait for bytes (at most ``timeout`` s), then return every complete reply buffered.

        Raises:
            ConnectionError: Redis closed the connection.
            TimeoutError: nothing arrived in time.
            InvalidResponse: a protocol error (the connection is out of step).
        """
        stream: asyncio.StreamReader = self._connection._reader
        async with asyncio.timeout(timeout):
            data = await stream.read(65536)
        if not data:
            raise RedisConnectionError("Redis closed the connection")
        self._parser.feed(data)
        replies = []
        while (reply := self._parser.gets()) is not False:  # False: no complete reply left (RESP2 has no booleans)
            replies.append(reply)
        return replies


class RawConnection:
    """One redis-py connection used directly: pipelined commands in, raw RESP2 replies out.

    The hot path goes through this instead of the client API: the client wraps each
    command in retry, metrics and response-callback layers that cost about a quarter of
    a loopback round trip (see docs/benchmarks.md). Connection handling and AUTH/SELECT
    are still redis-py's; replies are read by a :class:`ReplyReader`.
    """

    def __init__(self, client: Redis, *, read_timeout: float | None = None) -> None:
        self._connection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        # a blocking reader waits longer than its longest BLOCK; others as long as redis-py would
        self._read_timeout = read_timeout if read_timeout is not None else self._connection.socket_timeout
        self._replies = ReplyReader(self._connection)

    async def execute(self, commands: Sequence[Sequence[EncodableT]]) -> list[Any]:
        """Send ``commands`` in one write; per command its reply, or the ResponseError it got.

        Raises:
            ConnectionError, TimeoutError, OSError: the connection failed (it is reset).
        """
        connection = self._connection
        try:
            if not connection.is_connected:
                await connection.connect()
                self._replies.reset()
            # hiredis packs in C (redis-py's asyncio connection packs in Python); its stub mistypes the tuple
            packed = b"".join(hiredis.pack_command(cast(Any, tuple(c))) for c in commands)
            await connection.send_packed_command(packed, check_health=False)
            results: list[Any] = []
            while len(results) < len(commands):
                results += await self._replies.read(self._read_timeout)
            if len(results) > len(commands):
                raise InvalidResponse("more replies arrived than commands were sent")
            return results
        except BaseException:
            await connection.disconnect(nowait=True)
            raise

    async def call(self, *args: EncodableT) -> Any:
        """One command; its raw reply.

        Raises:
            ResponseError: Redis answered with an error.
        """
        [result] = await self.execute([args])
        if isinstance(result, ResponseError):
            raise result
        return result

    async def close(self) -> None:
        """Close the connection."""
        await self._connection.disconnect()


MAX_BLOCK_MS = 5000
"""Longest XREAD / XREADGROUP BLOCK the broker uses; reader connections wait that long plus a margin."""

READER_TIMEOUT = MAX_BLOCK_MS / 1000 + 10


def fields_dict(flat: Sequence[bytes] | None) -> dict[bytes, bytes]:
    """A raw stream entry's ``[field, value, ...]`` as a dict."""
    if not flat:
        return {}
    items = iter(flat)
    return dict(zip(items, items, strict=True))


def backoff(attempt: int, *, base: float = 0.05, cap: float = 2.0) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): exponential with full jitter."""
    return random.uniform(0, min(cap, base * (2**attempt)))


async def stop_reader(task: asyncio.Task[Any], client: Redis, reader_id: int | None, *, grace: float = 2.0) -> None:
    """End a loop blocked in XREAD/XREADGROUP whose stop flag is already set.

    ``CLIENT UNBLOCK`` makes the blocked read return at once, so the loop sees its flag
    and returns; cancelling a blocked read is only the fallback (on Python 3.11 redis-py
    can turn that cancel into a TimeoutError that the loop would treat as transient).
    """
    if task.done():
        return
    if reader_id is not None:
        try:
            await client.client_unblock(reader_id)
        except (RedisError, OSError):
            pass
    _, pending = await asyncio.wait([task], timeout=grace)
    if pending:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@dataclass(frozen=True)
class Script:
    """A Lua script called by SHA, re-sent in full when Redis forgot it (after a restart)."""

    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())
        _SCRIPTS_BY_SHA[self.sha] = self


_SCRIPTS_BY_SHA: dict[str, Script] = {}
"""Every script by SHA, so the pipeliner can re-send one in full after NOSCRIPT."""


_FEED_LUA = """
-- The feed costs nothing while nobody listens: events are built here, from the message
-- bodies, only if the channel has a subscriber (SUBSCRIBE to it; a pattern does not count).
local function listened(channel)
  return channel ~= '' and redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0
end
local function event(kind, body, ts)
  local ok, m = pcall(cjson.decode, body)
  if not ok or type(m) ~= 'table' then return nil end
  return cjson.encode({event = kind, message_id = m.message_id, sender_id = m.sender_id,
                       recipient_id = m.recipient_id, intent = m.intent, ts = ts})
end
local function server_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

SEND = Script(
    _FEED_LUA
    + """
-- KEYS[1] inbox stream, KEYS[2] the inbox's dedup set (message id -> server ms when accepted)
-- ARGV: max length, dedup window ms (0 = no dedup, for a redrive), event channel ('' = none),
--       n, then n message ids, then n bodies
-- returns per message its entry id, or 'dup', or 'full <length>'
-- No consumer group is made here: a stream keeps every entry, and a consumer creates its group at 0.
-- The dedup set is read and written once per call (ZMSCORE, ZADD), not once per message. Its member
-- '~' (never a message id) holds when its TTL was last set and its expired ids were last dropped:
-- that housekeeping runs once per tenth of the window, not on every call.
local max, window, channel, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local len = redis.call('XLEN', KEYS[1])
local known, now = {}, nil
if window > 0 then
  known = redis.call('ZMSCORE', KEYS[2], '~', unpack(ARGV, 5, 4 + n))
  for i = 2, n + 1 do
    if known[i] and not now then
      local t = redis.call('TIME')  -- only a known id needs the clock: is it older than the window?
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
  end
end
local feed = listened(channel)
local ts = feed and server_seconds()
local out, events, marks, here, last = {}, {}, {}, {}, nil
for i = 1, n do
  local id, body = ARGV[4 + i], ARGV[4 + n + i]
  local seen = known[i + 1]
  if window > 0 and ((seen and tonumber(seen) >= now - window) or here[id]) then
    out[i] = 'dup'
  elseif len >= max then
    out[i] = 'full ' .. len
  else
    last = redis.call('XADD', KEYS[1], '*', 'm', body)
    out[i] = last
    len = len + 1
    if window > 0 then
      here[id] = true
      marks[#marks + 1] = id
    end
    if feed then events[#events + 1] = event('sent', body, ts) end
  end
end
if #marks > 0 then
  local ms = tonumber(string.match(last, '^(%d+)'))  -- the server's clock, as the entry id holds it
  local args = {}
  for i = 1, #marks do
    args[2 * i - 1], args[2 * i] = ms, marks[i]
  end
  if not known[1] or tonumber(known[1]) < ms - window / 10 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (ms - window))
    redis.call('PEXPIRE', KEYS[2], window + window / 10)
    args[#args + 1], args[#args + 2] = ms, '~'
  end
  redis.call('ZADD', KEYS[2], unpack(args))
end
-- one feed message for the whole call: one JSON event per line
if #events > 0 then redis.call('PUBLISH', channel, table.concat(events, '\\n')) end
return out
"""
)


ACK = Script(
    _FEED_LUA
    + """
-- KEYS[1] inbox stream; ARGV: group, event channel ('' = none), n entry ids
-- acknowledge and remove together: XDEL alone would leave a dangling pending entry
if listened(ARGV[2]) then
  local ts, events = server_seconds(), {}
  for i = 3, #ARGV do
    local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
    if entry and entry[2][1] == 'm' then events[#events + 1] = event('handled', entry[2][2], ts) end
  end
  if #events > 0 then redis.call('PUBLISH', ARGV[2], table.concat(events, '\\n')) end
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
return acked
"""
)


DEAD_LETTER = Script(
    """
-- KEYS[1] inbox stream, KEYS[2] dead-letter stream
-- ARGV: group, entry id, reason, deliveries, consumer, min idle ms ('' = the caller holds the entry)
if ARGV[6] ~= '' then
  -- claim first, so that of two instances only one dead-letters an abandoned entry
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[5], ARGV[6], ARGV[2], 'JUSTID')
  if #claimed == 0 then return false end
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local out = {'reason', ARGV[3], 'deliveries', ARGV[4], 'source', KEYS[1], 'source_id', ARGV[2]}
local body = nil
if #entry == 1 then
  local f = entry[1][2]
  for i = 1, #f, 2 do if f[i] == 'm' then body = f[i + 1] end end
  if body == nil then table.insert(out, 'raw'); table.insert(out, cjson.encode(f)) end
end
table.insert(out, 'payload'); table.insert(out, body or '')
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return {id, body or ''}
"""
)


Command = tuple[EncodableT, ...]

FLUSH_AT = 64
"""Queued commands (or messages in one SEND) that are written at once instead of at the end of the tick.

Coalescing a whole tick saves writes, but while the last reply of a burst is being
processed, Redis and the far side would sit idle; a long queue goes out in parts.
"""

LazyCommand = Callable[[], Command | None]
"""Builds a command when its write goes out (``None``: nothing to send); see :meth:`Pipeliner.call_lazy`."""


class Pipeliner:
    """One connection, continuously pipelined: commands are written when called, replies read in order.

    ``call`` queues a command and returns a future. On an idle connection it is written
    at once; while replies are awaited, everything queued during one event-loop tick is
    packed and written together by a callback (no task switch). One reader task reads
    whatever bytes arrived, parses every complete reply in them with hiredis, and
    matches them to futures in order. Cancelling a caller only drops its future: a
    written command's reply is still read, so the connection never falls out of step.

    redis-py opens the connection (address, TLS, AUTH, SELECT, client name); after its
    handshake the pipeliner writes to that connection's stream and reads it with a
    :class:`ReplyReader`.

    After a lost connection every command not yet answered is written again, in order,
    for up to ``reconnect_timeout``: only idempotent commands (or ones made idempotent
    by a dedup marker) go through here.
    """

    def __init__(self, client: Redis, *, reconnect_timeout: float, url: str | None = None) -> None:
        self._connection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._connection.socket_timeout = READER_TIMEOUT
        self._reconnect_timeout = reconnect_timeout
        self._url = url
        # a ``None`` future: a command fired without waiting (a failure is logged)
        self._outbox: list[tuple[Command | LazyCommand, asyncio.Future[Any] | None]] = []
        self._sent: collections.deque[tuple[Command, asyncio.Future[Any] | None]] = collections.deque()
        self._write_scheduled = False
        self._batching = 0
        self._ready = False  # connected, handshake done: writes may go out
        self._has_sent = asyncio.Event()
        self._replies = ReplyReader(self._connection)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.round_trips = 0
        """Writes (batches of commands) so far, for statistics and benchmarks."""

    def start(self) -> None:
        """Start the reader task (it also connects)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="agentcomms-pipeliner")

    def call(self, *args: EncodableT) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply or its error."""
        return self._queue(args)

    def call_lazy(self, build: LazyCommand) -> asyncio.Future[Any]:
        """Queue a command built only when it is written, so that callers can add to it until then.

        ``build()`` runs once, at the write (at once if the connection is idle). If it
        returns ``None`` nothing is sent and the future is cancelled.
        """
        return self._queue(build)

    def _queue(self, command: Command | LazyCommand) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._outbox.append((command, future))
        self._after_queue()
        return future

    def _after_queue(self) -> None:
        if not self._ready or self._batching:
            self._schedule_write()
        elif len(self._outbox) >= FLUSH_AT:
            self._write()  # a long queue goes out now, so that Redis and the far side start on it
        elif not self._sent and not self._write_scheduled:
            self._write()  # an idle connection: write now, for latency
        else:
            self._schedule_write()  # under load: what is queued in this tick goes out together

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

    def _schedule_write(self) -> None:
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def fire(self, *args: EncodableT) -> None:
        """Queue a command whose result nobody waits for (a failure is logged)."""
        self._outbox.append((args, None))
        self._after_queue()

    def script(self, script: Script, keys: Sequence[str], args: Sequence[EncodableT]) -> asyncio.Future[Any]:
        """Queue an EVALSHA of ``script``."""
        return self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def _write(self) -> None:
        self._write_scheduled = False
        writer = getattr(self._connection, "_writer", None)
        if not self._ready or writer is None:
            return  # the reader task writes the outbox once it is connected
        batch: list[tuple[Command, asyncio.Future[Any] | None]] = []
        for command, future in self._outbox:
            if future is not None and future.cancelled():
                continue
            if callable(command):
                built = command()
                if built is None:
                    if future is not None:
                        future.cancel()
                    continue
                command = built
            batch.append((command, future))
        self._outbox = []
        if not batch:
            return
        # hiredis packs in C (redis-py's asyncio connection packs in Python); its stub mistypes the tuple
        writer.write(b"".join(hiredis.pack_command(cast(Any, args)) for args, _ in batch))
        self._sent.extend(batch)
        self.round_trips += 1
        self._has_sent.set()

    async def aclose(self) -> None:
        """Send what is queued, wait for the replies, then close."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._write()
        self._has_sent.set()
        await task
        await self._connection.disconnect()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        deadline: float | None = None
        while True:
            if not self._ready:
                if await self._connect():
                    attempt, deadline = 0, None
                    continue
                deadline = deadline or loop.time() + self._reconnect_timeout
                if loop.time() > deadline:
                    self._fail_all(f"Redis unreachable for {self._reconnect_timeout:g}s")
                    deadline = None
                    if self._closing:
                        return
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            if not self._sent:
                if self._closing and not self._outbox:
                    return
                self._has_sent.clear()
                await self._has_sent.wait()
                continue
            try:
                await self._read_replies()
            except (*TRANSIENT_ERRORS, RedisError) as exc:  # lost, or out of step (a protocol error)
                logger.warning("Redis connection lost (%s); %d commands will be sent again", exc, len(self._sent))
                self._ready = False
                await self._connection.disconnect(nowait=True)
                deadline = deadline or loop.time() + self._reconnect_timeout
                continue

    async def _read_replies(self) -> None:
        # Redis owes replies: silence this long means a dead link
        for reply in await self._replies.read(READER_TIMEOUT):
            if not self._sent:
                raise InvalidResponse("a reply arrived that no command was waiting for")
            self._deliver(reply)

    async def _connect(self) -> bool:
        try:
            await self._connection.connect()
        except TRANSIENT_ERRORS as exc:
            logger.debug("pipeliner cannot connect yet: %s", exc)
            return False
        self._ready = True
        self._replies.reset()  # bytes of the lost connection are meaningless now
        # what was written and not answered goes out again first, in order
        self._outbox = [*self._sent, *self._outbox]
        self._sent.clear()
        self._write()
        return True

    def _deliver(self, reply: Any) -> None:
        args, future = self._sent.popleft()
        if isinstance(reply, NoScriptError) and args[0] == "EVALSHA":
            # Redis restarted and forgot the script: send it in full once
            self._outbox.append((("EVAL", _SCRIPTS_BY_SHA[str(args[1])].body, *args[2:]), future))
            self._schedule_write()
        elif future is None:
            if isinstance(reply, Exception):
                logger.warning("a command sent without waiting failed: %s", reply)
        elif future.done():
            pass  # its caller gave up; the reply was read all the same
        elif isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _fail_all(self, reason: str) -> None:
        error = BrokerConnectionError(reason, url=self._url)
        for _, future in [*self._sent, *self._outbox]:
            if future is not None and not future.done():
                future.set_exception(error)
        self._sent.clear()
        self._outbox = []
