"""Faults placed at exact moments, on a real redis-server: each test once showed a defect of the transport
and delivery code (found by an independent review), and now shows it is gone.

Faults are placed with faultkit (kill, pause, restart) or with ``Proxy``, a TCP proxy in
front of a private redis-server that cuts a connection right after Redis answered a
chosen command, withholds Redis's bytes from a chosen point on, or hands them over piece
by piece: a network fault at an exact moment, without timing luck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentcomms import (
    AgentMessage,
    AgentRegistry,
    BrokerConnectionError,
    MessageBroker,
    MessageSender,
    RequestTimeoutError,
    Settings,
    keys,
)
from agentcomms.transport import pipeliner as pipeliner_module
from agentcomms.transport.scripts import DEAD_LETTER, REDRIVE
from faultkit import RedisServer
from test_broker import message


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as instance:
        yield instance


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": url, "claim_idle": 0.3, "message_timeout": 10}
    return Settings(**{**values, **overrides})


# -- a proxy that places network faults exactly ---------------------------------------------


class _Conn:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.cut = False  # drop Redis's next bytes and cut the connection
        self.stalled = False  # withhold everything Redis sends from now on
        self.held = bytearray()  # Redis's bytes kept back while the proxy holds replies

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class Proxy:
    """A TCP proxy in front of a redis-server.

    * ``cut_when(data)``: once a client sends matching bytes, they reach Redis, Redis's
      answer is dropped and the client's connection is cut (once: the predicate is cleared);
    * ``stall_when(data)``: once a client sends matching bytes, nothing more from Redis
      reaches that client (a peer that went silent: no FIN, no RST);
    * ``hold_replies``: Redis's bytes are kept back until :meth:`release`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_when: Callable[[bytes], bool] | None = None
        self.stall_when: Callable[[bytes], bool] | None = None
        self.hold_replies = False
        self.cuts = 0
        self.connections: list[_Conn] = []
        self.changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(predicate)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            self._tasks.discard(task)
            return
        conn = _Conn(client_writer, upstream_writer)
        self.connections.append(conn)
        pumps = [
            asyncio.ensure_future(self._up(conn, client_reader)),
            asyncio.ensure_future(self._down(conn, upstream_reader)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            conn.abort()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.discard(task)

    async def _up(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(1 << 16):
            if self.cut_when is not None and self.cut_when(data):
                self.cut_when = None
                conn.cut = True
            if self.stall_when is not None and self.stall_when(data):
                conn.stalled = True
            conn.upstream.write(data)
            await conn.upstream.drain()

    async def _down(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(1 << 16):
            if conn.cut:  # Redis ran the command and answered: the answer is lost with the connection
                self.cuts += 1
                conn.abort()
                await self._notify()
                return
            if conn.stalled:
                continue
            if self.hold_replies:
                conn.held += data
                await self._notify()
                continue
            conn.client.write(data)
            await conn.client.drain()

    def release(self, conn: _Conn, size: int | None = None) -> None:
        """Hand ``size`` held bytes (all by default) of ``conn`` to its client."""
        size = len(conn.held) if size is None else size
        chunk, conn.held[:] = bytes(conn.held[:size]), conn.held[size:]
        conn.client.write(chunk)

    def drop_all(self) -> None:
        """Cut every client connection now (as a restarted router would)."""
        for conn in self.connections:
            conn.abort()


@contextlib.asynccontextmanager
async def proxy_for(server: RedisServer) -> AsyncIterator[Proxy]:
    proxy = await Proxy(server.port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def sends(*needles: bytes) -> Callable[[bytes], bool]:
    """A trigger: the client's bytes contain every one of ``needles``."""
    return lambda data: all(needle in data for needle in needles)


async def ends(future: asyncio.Future[Any], *, within: float) -> bool:
    """Whether ``future`` is done within ``within`` seconds (a bound for a hang, far above what it should take).

    If it is not, it is cancelled, so that the test can go on to clean up.
    """
    await asyncio.wait({future}, timeout=within)
    if not future.done():
        await settle(future)
        return False
    if not future.cancelled():
        future.exception()  # retrieved: its outcome is the test's to check
    return True


async def settle(*futures: asyncio.Future[Any]) -> None:
    """Cancel what is still pending and collect every outcome (no "exception never retrieved")."""
    for future in futures:
        future.cancel()
    await asyncio.gather(*futures, return_exceptions=True)


def inbox_numbers(server: RedisServer, agent_id: str) -> list[Any]:
    client = server.client()
    try:
        found: Any = client.xrange(keys.inbox(agent_id))
    finally:
        client.close()
    return [json.loads(fields[b"m"])["payload"]["data"].get("n") for _, fields in found]


# -- 1. flow control: a producer waiting for a full socket is stranded by a lost connection ----


async def test_a_publish_waiting_for_a_full_socket_is_not_stranded_by_a_lost_connection(server: RedisServer) -> None:
    """publish_message waits in Pipeliner.wait_writable while the socket is full; then the link is lost.

    Nothing sets ``Pipeliner._writable`` again: ``_on_lost`` does not, and a new link that is
    never paused does not. Redis is down past ``reconnect_timeout`` here, so nothing is
    replayed (a big replay would pause and resume the new link and, by luck, wake the
    waiter: with a plain kill and restart this test's setup hangs in ~1 run of 4). The
    waiting publish neither fails with BrokerConnectionError, as documented, nor succeeds
    once Redis is back: it waits forever.
    """
    blob = "x" * 200_000
    async with MessageBroker(settings=settings_for(server.url, reconnect_timeout=0.5)) as broker:
        assert (await broker.publish_message(message("agent.flow", n=0))).entry_id
        server.pause()  # frozen: it reads nothing, the socket fills up
        burst: list[asyncio.Future[Any]] = []
        async with asyncio.timeout(30):
            while not broker.pipeliner.write_paused:
                burst.append(asyncio.ensure_future(broker.publish_message(message("agent.flow", n=1, blob=blob))))
                await asyncio.sleep(0)  # one loop turn: the scheduled write goes out
        waiting = asyncio.ensure_future(broker.publish_message(message("agent.flow", n=2)))
        await asyncio.sleep(0)  # it now waits in wait_writable
        assert not waiting.done()
        await asyncio.to_thread(server.kill)  # the link is lost while paused; Redis stays away > reconnect_timeout
        async with asyncio.timeout(20):
            failed = await asyncio.gather(burst[0], return_exceptions=True)
        assert isinstance(failed[0], BrokerConnectionError)  # what was queued gave up after reconnect_timeout
        await asyncio.to_thread(server.start)
        assert (await broker.publish_message(message("agent.flow", n=3))).entry_id  # Redis is back
        ended = await ends(waiting, within=20)  # 40 x reconnect_timeout, and Redis has been back all along
        await settle(*burst)
    assert ended, "publish_message still waits in Pipeliner.wait_writable"


# -- 2. a request through MessageSender / BaseAgent does not end by its timeout while Redis is down --


async def test_a_sender_request_ends_by_its_timeout_while_redis_is_down(server: RedisServer) -> None:
    """MessageSender.request checks the registry (HEXISTS) before broker.request starts the request's timer.

    While Redis is down that check waits out ``reconnect_timeout`` and ends with
    BrokerConnectionError: the request's own 0.5 s timeout is never applied. The docs:
    "a request still ends by its own timeout (RequestTimeoutError)"; issue 9 #3: "A request
    must end by its timeout, always." The same holds for BaseAgent.request (it goes through
    its sender), request_role and get_agent_status.
    """
    settings = settings_for(server.url, reconnect_timeout=3)
    async with AgentRegistry(settings=settings) as registry:
        await registry.register_agent(
            {"agent_id": "agent.known", "user_name": "k", "role": "cfo", "department": "finance"}
        )
    async with MessageSender(settings=settings, sender_id="agent.asker") as sender:
        await asyncio.to_thread(server.kill)
        outcome = await asyncio.gather(
            sender.request("agent.known", "request_knowledge", {"n": 1}, timeout=0.5), return_exceptions=True
        )
        await asyncio.to_thread(server.start)
    assert isinstance(outcome[0], RequestTimeoutError), repr(outcome[0])


# -- 3. a Redis that goes silent right after the handshake hangs connect and recovery forever ---


async def test_connect_to_a_redis_that_goes_silent_after_the_handshake_fails_in_time(server: RedisServer) -> None:
    """Pipeliner.connect -> _load_scripts awaits SCRIPT LOAD with no timeout (open_link's covers the handshake only).

    A peer that stops answering there (a stalled host, a partition without RST) makes
    ``MessageBroker.connect()`` wait forever instead of raising BrokerConnectionError.
    """
    async with proxy_for(server) as proxy:
        proxy.stall_when = sends(b"SCRIPT")
        settings = settings_for(proxy.url, reconnect_timeout=1)
        broker = MessageBroker(settings=settings)
        connecting = asyncio.ensure_future(broker.connect())
        ended = await ends(connecting, within=20)  # connect_timeout is 5 s, reconnect_timeout 1 s
        await broker.close()
    assert ended, "MessageBroker.connect() still waits for SCRIPT LOAD from a silent Redis"


async def test_a_redis_that_goes_silent_during_recovery_does_not_hang_commands(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipeliner._recover -> _load_scripts on a fresh link: no timeout, and the watchdog does not see that link.

    The recovery task waits forever; ``_expire`` runs only between attempts, so a queued
    send never fails with BrokerConnectionError after ``reconnect_timeout`` and the
    silence rule ("Redis owes replies and sends nothing for 15 s: replaced") never fires.
    """
    monkeypatch.setattr(pipeliner_module, "READ_TIMEOUT", 1.0)  # the silence rule, shortened
    async with proxy_for(server) as proxy:
        settings = settings_for(proxy.url, reconnect_timeout=1)
        async with MessageBroker(settings=settings) as broker:
            assert (await broker.publish_message(message("agent.silent", n=0))).entry_id
            proxy.stall_when = sends(b"SCRIPT")  # the next connection goes silent once it loads scripts
            proxy.drop_all()
            sending = asyncio.ensure_future(broker.publish_message(message("agent.silent", n=1)))
            ended = await ends(sending, within=20)  # 20 x reconnect_timeout, 20 x READ_TIMEOUT
            outcome = sending.exception() if ended and not sending.cancelled() else None
            proxy.stall_when = None
            proxy.drop_all()
    assert ended, "publish_message still waits: the recovery hangs in _load_scripts"
    assert outcome is None or isinstance(outcome, BrokerConnectionError)


# -- 4. an argument hiredis cannot pack leaves a phantom command in _sent: replies go to the wrong callers --


async def test_a_bad_argument_does_not_shift_every_later_reply(server: RedisServer) -> None:
    """Pipeliner._write moves the batch to ``_sent`` and only then packs it; a TypeError from
    ``hiredis.pack_command`` (None, a bool, a list ...) leaves commands in ``_sent`` that were
    never written. Every later reply is then handed to the command before it.

    Reached through the public API with a wrong-typed argument (here
    ``AgentRegistry.is_registered(None)``); the caller also gets a raw TypeError.
    """
    client = server.client()
    client.mset({"review:a": "value of a", "review:b": "value of b"})
    client.close()
    async with MessageBroker(settings=settings_for(server.url)) as broker:
        registry = AgentRegistry(broker)
        outcome = await asyncio.gather(registry.is_registered(None), return_exceptions=True)  # type: ignore[arg-type]
        pipeliner = broker.pipeliner
        get_a = pipeliner.call("GET", "review:a", replay=True)
        get_b = pipeliner.call("GET", "review:b", replay=True)
        replies = await asyncio.wait_for(asyncio.gather(get_a, get_b), 30)
    assert list(replies) == [b"value of a", b"value of b"], "a reply went to the wrong caller"
    assert not isinstance(outcome[0], TypeError), "a raw TypeError reached the caller"


# -- 5. closing: two concurrent closes, and a close that meets a "not now" refusal ---------------


async def test_two_concurrent_closes_both_return(server: RedisServer) -> None:
    """Pipeliner.aclose replaces ``self._drained`` on each call: the first caller waits on an
    Event nobody will set again, and ``MessageBroker.close()`` never returns for it."""
    async with MessageBroker(settings=settings_for(server.url)) as broker:
        assert (await broker.publish_message(message("agent.close", n=0))).entry_id
        server.pause()  # replies owed while both closes start
        sending = asyncio.ensure_future(broker.publish_message(message("agent.close", n=1)))
        await asyncio.sleep(0)  # written
        first = asyncio.ensure_future(broker.close())
        await asyncio.sleep(0)
        second = asyncio.ensure_future(broker.close())
        await asyncio.sleep(0)
        server.resume()
        second_ended = await ends(second, within=20)
        first_ended = await ends(first, within=20)
        assert (await sending).entry_id
    assert second_ended
    assert first_ended, "the first MessageBroker.close() never returns"


async def test_close_returns_when_a_refusal_and_a_new_command_meet_during_it(server: RedisServer) -> None:
    """aclose waits for ``_drained``; ``_on_reply`` sets it only if the outbox is empty.

    Here a command in flight is refused "not now" (NOSCRIPT after a SCRIPT FLUSH: the
    pipeliner holds it and stops writing), another send is queued meanwhile (it stays in
    the outbox), then the last reply arrives: ``_drained`` is not set (the outbox is not
    empty) and recovery is not started (``_closing``). Nothing else ever happens: close()
    and the sends wait forever.
    """
    async with proxy_for(server) as proxy:
        broker = await MessageBroker(settings=settings_for(proxy.url)).connect()
        assert (await broker.publish_message(message("agent.one", n=0))).entry_id
        client = server.client()
        client.script_flush()  # the next SEND calls are refused with NOSCRIPT
        client.close()
        [conn] = proxy.connections
        proxy.hold_replies = True
        first = asyncio.ensure_future(broker.publish_message(message("agent.one", n=1)))
        second = asyncio.ensure_future(broker.publish_message(message("agent.two", n=1)))
        await proxy.wait_for(lambda: conn.held.count(b"\r\n") >= 2)  # both NOSCRIPT replies are at the proxy
        closing = asyncio.ensure_future(broker.close())
        await asyncio.sleep(0)  # close() now waits for the two replies
        proxy.release(conn, conn.held.index(b"\r\n") + 2)  # the first NOSCRIPT: held, writing stops
        async with asyncio.timeout(20):
            while broker.pipeliner.connected:
                await asyncio.sleep(0.01)
        third = asyncio.ensure_future(broker.publish_message(message("agent.three", n=1)))  # queued, not written
        await asyncio.sleep(0)
        proxy.hold_replies = False
        proxy.release(conn)  # the last reply owed
        closed = await ends(closing, within=20)
        await settle(first, second, third)
    assert closed, "MessageBroker.close() never returns"


async def test_close_during_a_refusal_does_not_call_a_command_that_ran_not_sent(server: RedisServer) -> None:
    """aclose() while the pipeliner holds a refused command (``_ready`` False) skips the wait and
    ``_fail_all`` fails the commands still in ``_sent`` with BrokerClosedError "...the command was
    not sent". They were sent, and Redis ran them: a caller that trusts the message and sends
    again (a new message) makes a duplicate."""
    async with proxy_for(server) as proxy:
        broker = await MessageBroker(settings=settings_for(proxy.url)).connect()
        assert (await broker.publish_message(message("agent.one", n=0))).entry_id
        client = server.client()
        client.script_flush()
        [conn] = proxy.connections
        proxy.hold_replies = True
        refused = asyncio.ensure_future(broker.publish_message(message("agent.one", n=1)))  # NOSCRIPT
        await asyncio.sleep(0)
        written = broker.pipeliner.call("SET", "review:ran", "yes", replay=True)
        await proxy.wait_for(lambda: conn.held.count(b"\r\n") >= 2)  # NOSCRIPT and +OK are at the proxy
        proxy.release(conn, conn.held.index(b"\r\n") + 2)  # the NOSCRIPT: held, not ready
        async with asyncio.timeout(20):
            while broker.pipeliner.connected:
                await asyncio.sleep(0.01)
        await broker.close()
        outcome = await asyncio.gather(written, refused, return_exceptions=True)
        ran = client.get("review:ran")
        client.close()
    assert ran == b"yes"  # Redis ran the SET
    assert "not sent" not in str(outcome[0]), f"the caller of a SET that ran was told: {outcome[0]!r}"


# -- 6. replays that are "safe" but lose what the first run did ----------------------------------


async def test_a_dead_letter_whose_answer_was_lost_still_tells_the_waiting_caller(server: RedisServer) -> None:
    """DEAD_LETTER is replayed after a lost connection; the replay finds nothing to move and
    returns nil, so Subscription._dead_letter returns early: no ``dead_lettered`` reply (the
    caller waits out its timeout), no event, no count, no ``SADD ac:dead:index``."""

    async def failing(msg: AgentMessage) -> None:
        raise RuntimeError("boom")

    async with proxy_for(server) as proxy:
        agent_settings = settings_for(proxy.url, max_deliveries=1)  # a failure dead-letters at once
        async with (
            MessageBroker(settings=agent_settings, client_name="agent") as agent_side,
            MessageBroker(settings=settings_for(server.url), client_name="caller") as caller,
        ):
            await agent_side.subscribe_to_agent("agent.dl", failing)
            proxy.cut_when = sends(DEAD_LETTER.sha.encode())  # Redis runs it; its answer is lost
            outcome = await asyncio.gather(caller.request(message("agent.dl", n=1), timeout=5), return_exceptions=True)
            letters = await caller.dead_letters("agent.dl")
            indexed = await caller.dead_letter_agents()
    assert proxy.cuts == 1 and len(letters) == 1  # it was dead-lettered once
    problems = []
    if "agent.dl" not in indexed:
        problems.append("ac:dead:index misses the agent: `dlq list` and dead_letter_agents() do not show it")
    if isinstance(outcome[0], RequestTimeoutError):
        problems.append("the caller got no dead_lettered reply and waited out its timeout")
    assert not problems, problems


async def test_a_redrive_whose_answer_was_lost_reports_success(server: RedisServer) -> None:
    """REDRIVE is replayed after a lost connection; the replay finds the dead letter gone and
    the caller gets DeadLetterNotFoundError, although the message is back in its inbox."""
    payload = message("agent.rd", n=7).model_dump_json()
    client = server.client()
    added: Any = client.xadd(
        keys.dead_letters("agent.rd"),
        {"reason": "test", "deliveries": "1", "source": keys.inbox("agent.rd"), "source_id": "1-1", "payload": payload},
    )
    letter_id = added.decode()
    client.close()
    async with proxy_for(server) as proxy, MessageBroker(settings=settings_for(proxy.url)) as broker:
        proxy.cut_when = sends(REDRIVE.sha.encode())
        outcome = await asyncio.gather(broker.redrive_dead_letter("agent.rd", letter_id), return_exceptions=True)
    assert proxy.cuts == 1
    assert inbox_numbers(server, "agent.rd") == [7]  # it was redriven
    assert not isinstance(outcome[0], Exception), repr(outcome[0])


async def test_a_takeover_whose_answer_was_lost_does_not_spend_a_delivery(server: RedisServer) -> None:
    """The take-over XCLAIM (min idle time) is replayed after a lost connection; the first run
    claimed the entry (delivery count +1, idle reset), so the replay returns nothing and the
    entry is never dispatched. At the next take-over its count has reached max_deliveries and
    it is dead-lettered, although its handler failed once and would now succeed."""
    calls: list[int] = []
    handled = asyncio.Event()

    async def flaky(msg: AgentMessage) -> None:
        calls.append(msg.payload.data["n"])
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")
        handled.set()

    async with proxy_for(server) as proxy:
        settings = settings_for(proxy.url, max_deliveries=2)
        async with MessageBroker(settings=settings) as broker:
            # the take-over's XCLAIM, not the keep-alive's (JUSTID) nor a script's
            proxy.cut_when = lambda data: b"XCLAIM" in data and b"JUSTID" not in data
            await broker.subscribe_to_agent("agent.takeover", flaky)
            await broker.publish_message(message("agent.takeover", n=1))
            await asyncio.wait({asyncio.ensure_future(handled.wait())}, timeout=15)  # claim_idle is 0.3 s
            letters = await broker.dead_letters("agent.takeover")
    assert proxy.cuts == 1
    assert [letter.reason for letter in letters] == [] and calls == [1, 1]


# -- 7. signals: the program's own SIGTERM handler is removed by an agent's shutdown --------------

_OWN_HANDLER_PROGRAM = """
import asyncio, os, signal, sys
from agentcomms import BaseAgent, Settings, create_agent_config

async def main(url, how):
    settings = Settings(redis_url=url, handle_signals=True)
    agent = BaseAgent(create_agent_config("agent.sig", "s", "sig", "lab"), settings=settings)
    await agent.initialize()
    got = asyncio.Event()
    loop = asyncio.get_running_loop()
    if how == "loop":  # the program installs its own SIGTERM handler after the agent started
        loop.add_signal_handler(signal.SIGTERM, got.set)
    else:
        signal.signal(signal.SIGTERM, lambda *_: loop.call_soon_threadsafe(got.set))
    await agent.shutdown()  # e.g. the program restarts or replaces one agent and goes on
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(got.wait(), 10)
    print("HANDLED", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["loop", "signal"])
async def test_a_sigterm_handler_the_program_installed_after_the_agent_survives_its_shutdown(
    server: RedisServer, how: str
) -> None:
    """_signals.unwatch calls ``loop.remove_signal_handler(SIGTERM)`` whatever the handler is by then,
    resetting SIGTERM to SIG_DFL. The docs: "A program with its own SIGTERM handler (before
    or after) keeps full control"; here the program is killed by its own signal."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OWN_HANDLER_PROGRAM, server.url, how,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert (process.returncode, out.strip()) == (0, b"HANDLED")


# -- 8. raw exceptions that reach callers -----------------------------------------------------


async def test_a_hostile_last_beat_value_does_not_break_discovery(server: RedisServer) -> None:
    """registry._find catches ValidationError and ValueError per record, but
    ``datetime.fromtimestamp`` raises OSError (EOVERFLOW) or OverflowError for a huge value:
    one bad ``:seen`` field breaks discovery for everyone with a raw OSError."""
    async with AgentRegistry(settings=settings_for(server.url)) as registry:
        for agent_id in ("agent.good", "agent.bad"):
            await registry.register_agent(
                {"agent_id": agent_id, "user_name": "u", "role": "cfo", "department": "finance"}
            )
        client = server.client()
        client.hset(keys.REGISTRY_SEEN, "agent.bad", "100000000000000000000")
        client.close()
        outcome = await asyncio.gather(registry.discover_agents(role="cfo"), return_exceptions=True)
    assert not isinstance(outcome[0], BaseException), repr(outcome[0])
    assert [a.agent_id for a in outcome[0]] == ["agent.good"]


async def test_the_event_feed_skips_a_line_nested_too_deeply(server: RedisServer) -> None:
    """MessageBroker.events() catches ValueError from json.loads, not RecursionError: anyone who can
    PUBLISH on ac:events ends every dashboard's and ``agentcomms tail``'s feed with a raw error."""
    async with MessageBroker(settings=settings_for(server.url)) as broker:
        feed = broker.events()
        assert (await anext(feed))["event"] == "subscribed"
        client = server.client()
        client.publish(keys.EVENTS_CHANNEL, "[" * 100_000)
        client.publish(keys.EVENTS_CHANNEL, json.dumps({"event": "sent", "message_id": "after"}))
        client.close()
        outcome = await asyncio.gather(asyncio.wait_for(anext(feed), 10), return_exceptions=True)
        await feed.aclose()  # type: ignore[attr-defined]
    assert not isinstance(outcome[0], BaseException), repr(outcome[0])
    assert outcome[0]["message_id"] == "after"


async def test_a_handler_error_with_a_long_code_is_answered_once(server: RedisServer) -> None:
    """BaseAgent._on_message turns HandlerError into ``AgentResponse.fail(code, ...)``; a code over 64
    characters (or empty) raises pydantic's ValidationError there, so the request is treated as a
    crash: handled again max_deliveries times (side effects repeated), then dead-lettered."""
    from agentcomms import BaseAgent, HandlerError, create_agent_config

    calls: list[str] = []

    class Strict(BaseAgent):
        async def handle_request_knowledge(self, msg: AgentMessage) -> None:
            calls.append(msg.message_id)
            raise HandlerError("budget_exceeded_for_the_quarter_" + "x" * 40, "over budget")

    settings = settings_for(server.url)
    async with (
        Strict(create_agent_config("agent.strict", "s", "cfo", "finance"), settings=settings),
        MessageSender(settings=settings, sender_id="agent.asker") as sender,
    ):
        reply = await sender.request("agent.strict", "request_knowledge", {"n": 1}, timeout=20)
    assert len(calls) == 1, f"the handler ran {len(calls)} times"
    assert reply.error is not None and reply.error.code != "dead_lettered", reply.error


# -- 9. send.lua: a hostile id just below the last one makes a real message "hostile" ------------


async def test_an_entry_just_below_the_last_id_costs_no_accepted_message(server: RedisServer) -> None:
    """send.lua repairs only an exhausted stream. After a hostile entry at ``<max>-<max - 1>``,
    the next send is accepted *with the last possible id* (the sender gets that entry id);
    the send after it exhausts the stream, and the repair moves every entry dated ahead,
    the accepted message included, to the dead letters as "hostile entry id". It is never
    delivered. (Until then every accepted message is dated ~585 million years ahead, so no
    request to that inbox can expire either.)"""
    received: asyncio.Queue[int] = asyncio.Queue()

    async def handler(msg: AgentMessage) -> None:
        received.put_nowait(msg.payload.data["n"])

    async with MessageBroker(settings=settings_for(server.url)) as broker:
        assert (await broker.publish_message(message("agent.hostile2", n=0))).entry_id
        client = server.client()
        client.xadd(keys.inbox("agent.hostile2"), {"m": "evil"}, id="18446744073709551615-18446744073709551614")
        client.close()
        accepted = await broker.publish_message(message("agent.hostile2", n=1))
        assert accepted.entry_id and not accepted.duplicate  # accepted: the sender is told it is stored
        assert (await broker.publish_message(message("agent.hostile2", n=2))).entry_id
        await broker.subscribe_to_agent("agent.hostile2", handler)
        got: list[int] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while len(got) < 3:
                    got.append(await received.get())
        letters = await broker.dead_letters("agent.hostile2")
    assert got == [0, 1, 2], f"delivered {got}; dead letters: {[letter.reason for letter in letters]}"
    assert accepted.entry_id != "18446744073709551615-18446744073709551615", "accepted with the last possible id"


async def test_a_send_whose_answer_was_lost_is_not_reported_a_duplicate(server: RedisServer) -> None:
    """SEND is replayed after a lost connection; the replay finds the id in the dedup set, so the
    only publish of this message returns ``duplicate=True`` with no entry id (and the broker
    counts a duplicate, not a send)."""
    async with proxy_for(server) as proxy, MessageBroker(settings=settings_for(proxy.url)) as broker:
        await broker.publish_message(message("agent.dup", n=0))
        proxy.cut_when = sends(b"EVALSHA")
        result = await broker.publish_message(message("agent.dup", n=1))
        stats = broker.stats
    assert proxy.cuts == 1 and inbox_numbers(server, "agent.dup") == [0, 1]
    assert (result.duplicate, stats.duplicates, stats.sent) == (False, 0, 2), (result, stats)


async def test_a_sigterm_shutdown_prints_no_traceback(server: RedisServer) -> None:
    """_signals._terminate raises SystemExit inside a task: asyncio logs "Task exception was never
    retrieved" with a traceback on every ``docker stop`` of a healthy agent (exit status 143 is right)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).parent / "plain_agent.py"), "wait", server.url, "agent.plain.quiet",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        assert (await process.stdout.readline()).strip() == b"READY"
    process.terminate()
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 143
    assert b"Traceback" not in err, err.decode(errors="replace")[-600:]


async def test_a_broker_whose_client_name_makes_an_invalid_reply_stream_fails_fast(server: RedisServer) -> None:
    """MessageBroker(client_name=...) is not checked: a name with ``/`` (or ``+``, ``{`` ...) is a
    valid Redis client name but makes a reply stream that agents refuse (``invalid reply_to``),
    and _tell_caller cannot answer it either: every request silently times out."""

    async def echo(msg: AgentMessage) -> dict[str, Any]:
        return dict(msg.payload.data)

    settings = settings_for(server.url)
    async with MessageBroker(settings=settings, client_name="agent") as agent_side:
        await agent_side.subscribe_to_agent("agent.echo", echo)
        outcome: list[Any] = []
        try:
            async with MessageBroker(settings=settings, client_name="dashboard/v2") as caller:
                outcome = list(
                    await asyncio.gather(caller.request(message("agent.echo", n=1), timeout=3), return_exceptions=True)
                )
        except Exception as exc:  # refused at once: fine
            outcome = [exc]
    assert not isinstance(outcome[0], RequestTimeoutError), "the request silently timed out"


# -- 10. a request before connect() starts a reply reader bound to nothing ------------------------


async def test_a_request_before_connect_does_not_break_requests_after_it(server: RedisServer) -> None:
    """MessageBroker.request starts the reply reader (and registers its future) before ``self.pipeliner``
    raises BrokerClosedError. The reader captured the placeholder ``BlockingReader(ConnectionSpec())``
    (localhost:6379) and, with no ``_closed_event``, retries without any pause (a busy loop). After
    connect() no new reader is started (``_reply_reader`` is not None): every request times out.
    The same happens to a request made after close() when the broker is connected again."""

    async def echo(msg: AgentMessage) -> dict[str, Any]:
        return dict(msg.payload.data)

    settings = settings_for(server.url)
    broker = MessageBroker(settings=settings, client_name="early")
    early = await asyncio.gather(broker.request(message("agent.echo2", n=0), timeout=1), return_exceptions=True)
    assert type(early[0]).__name__ == "BrokerClosedError"  # typed: fine
    async with MessageBroker(settings=settings, client_name="agent") as agent_side:
        await agent_side.subscribe_to_agent("agent.echo2", echo)
        await broker.connect()
        try:
            outcome = await asyncio.gather(
                broker.request(message("agent.echo2", n=1), timeout=5), return_exceptions=True
            )
        finally:
            await broker.close()
    assert not isinstance(outcome[0], BaseException), repr(outcome[0])


# -- 11. backoff() overflows after 1,024 attempts: every retry loop dies in a long outage ----------


def test_backoff_is_defined_for_every_attempt() -> None:
    """``base * 2**attempt`` converts a huge int to float: OverflowError from attempt 1,024 on.

    Every retry loop calls backoff(attempt) with an unbounded counter: Pipeliner._recover and
    connect, Subscription._run, the reply reader, Presence, events(). At the real pace (the
    jitter averages 0.5 s, connection refused at once) that is an outage of ~9 minutes.
    """
    from agentcomms.transport import backoff

    outcome: list[object] = []
    for attempt in (10, 1023, 1024, 5000):
        try:
            outcome.append(0 <= backoff(attempt) <= 1.0)
        except Exception as exc:
            outcome.append(type(exc).__name__)
    assert outcome == [True, True, True, True]


async def test_a_long_outage_does_not_kill_the_pipeliners_recovery(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 1,024 failed reconnection attempts Pipeliner._recover raises OverflowError from backoff();
    the task ends, ``_recovering`` is None, and nothing starts recovery again: once Redis is back,
    every command waits forever (``_expire`` runs only inside that loop, so none even fails).

    The jitter is drawn as 0 here (``random.uniform`` returns its lower bound, a possible draw),
    so that 1,024 attempts take a second instead of ~9 minutes; the code path is the same.
    """
    import types

    monkeypatch.setattr(pipeliner_module, "random", types.SimpleNamespace(uniform=lambda low, high: low))
    attempts = 0
    many = asyncio.Event()
    original_expire = pipeliner_module.Pipeliner._expire

    def counting_expire(self: Any, cause: BaseException) -> None:  # called once per failed attempt
        nonlocal attempts
        attempts += 1
        if attempts >= 1025:
            many.set()
        original_expire(self, cause)

    monkeypatch.setattr(pipeliner_module.Pipeliner, "_expire", counting_expire)
    async with MessageBroker(settings=settings_for(server.url, reconnect_timeout=3600)) as broker:
        assert (await broker.publish_message(message("agent.long", n=0))).entry_id
        await asyncio.to_thread(server.kill)
        sending = asyncio.ensure_future(broker.publish_message(message("agent.long", n=1)))
        await asyncio.wait({asyncio.ensure_future(many.wait())}, timeout=60)  # Redis has been away a long time
        await asyncio.to_thread(server.start)
        ended = await ends(sending, within=20)
    assert ended, f"after {attempts} failed attempts the send never completes: the recovery task died"


async def test_a_connection_that_goes_silent_while_replies_are_owed_is_replaced(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog: Redis owes replies on the attached link and sends nothing for READ_TIMEOUT (a dead peer,
    no FIN, no RST): the link is dropped, a new one made, and the sends written again."""
    monkeypatch.setattr(pipeliner_module, "READ_TIMEOUT", 1.0)  # the silence rule, shortened
    async with proxy_for(server) as proxy:
        async with MessageBroker(settings=settings_for(proxy.url)) as broker:
            assert (await broker.publish_message(message("agent.mute", n=0))).entry_id
            fired: list[bool] = []

            def once(data: bytes) -> bool:  # this link hears nothing back from the next send on; later links do
                if fired or b"agent.mute" not in data:
                    return False
                fired.append(True)
                return True

            proxy.stall_when = once
            sending = asyncio.ensure_future(broker.publish_message(message("agent.mute", n=1)))
            ended = await ends(sending, within=20)
            reconnects = broker.stats.reconnects
    assert fired and ended and not sending.cancelled() and sending.exception() is None
    assert reconnects >= 1
    assert inbox_numbers(server, "agent.mute") == [0, 1]  # sent again on the new link, once
