"""The transport under faults, each on a private redis-server: restarts still loading, long outages, refusals,
connections killed with commands in flight, flushed scripts, hostile entry ids, failovers, and stopping."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentcomms import (
    AgentMessage,
    BrokerConnectionError,
    CommandOutcomeUnknownError,
    MessageBroker,
    RedisCommandError,
    RedisOutOfMemoryError,
    RequestTimeoutError,
    Settings,
    keys,
)
from faultkit import RedisServer
from test_broker import message

LAST_ID = "18446744073709551615-18446744073709551615"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as instance:
        yield instance


def settings_for(server: RedisServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": server.url, "claim_idle": 0.3, "message_timeout": 10}
    return Settings(**{**values, **overrides})


async def echo(msg: AgentMessage) -> dict[str, Any]:
    return dict(msg.payload.data)


def inbox_numbers(server: RedisServer, agent_id: str) -> list[int]:
    client = server.client()
    try:
        found: Any = client.xrange(keys.inbox(agent_id))
    finally:
        client.close()
    return [json.loads(fields[b"m"])["payload"]["data"]["n"] for _, fields in found]


async def test_a_restart_still_loading_its_data_is_waited_out(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    if server.version < (7,):
        pytest.skip("Redis 6.2 answers clients only every few MB while loading: reproduced on 7.0 only, for speed")
    caplog.set_level(logging.DEBUG, logger="agentcomms")
    server.fill(30_000, value_size=200)
    settings = settings_for(server)
    async with (
        MessageBroker(settings=settings, client_name="caller") as caller,
        MessageBroker(settings=settings, client_name="agent") as agent_side,
    ):
        subscription = await agent_side.subscribe_to_agent("agent.loading", echo)
        assert (await caller.request(message("agent.loading", n=0))).data == {"n": 0}
        await asyncio.to_thread(server.stop)
        # every key takes a little while to load: Redis answers LOADING for seconds
        await asyncio.to_thread(server.start, wait=False, extra=server.slow_loading_args())
        assert server.loading()
        replies = await asyncio.gather(
            *(caller.request(message("agent.loading", n=n), timeout=60) for n in range(1, 21))
        )
        sent = await caller.publish_message(message("agent.loading", n=21))
        assert subscription.running
    assert [r.data["n"] for r in replies] == list(range(1, 21))
    assert sent.entry_id
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "LOADING" in text  # the readers and the pipeliner met it, and went on


async def test_sends_that_gave_up_while_redis_was_down_do_not_block_later_sends(server: RedisServer) -> None:
    async with MessageBroker(settings=settings_for(server, reconnect_timeout=0.5)) as broker:
        await asyncio.to_thread(server.kill)
        together = [broker.publish_message(message("agent.later", n=n)) for n in range(3)]  # one shared SEND call
        results = await asyncio.gather(*together, return_exceptions=True)
        assert all(isinstance(r, BrokerConnectionError) for r in results)
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(20):
            result = await broker.publish_message(message("agent.later", n=3))
    assert result.entry_id and inbox_numbers(server, "agent.later") == [3]


async def test_a_request_ends_by_its_timeout_even_while_redis_is_down(server: RedisServer) -> None:
    settings = settings_for(server, reconnect_timeout=30)
    async with MessageBroker(settings=settings) as broker:
        await asyncio.to_thread(server.kill)
        async with asyncio.timeout(15):  # well before reconnect_timeout: the request's own timer ends it
            with pytest.raises(RequestTimeoutError):
                await broker.request(message("agent.down", n=0), timeout=0.5)
        await asyncio.to_thread(server.start)
        async with MessageBroker(settings=settings, client_name="agent") as agent_side:
            await agent_side.subscribe_to_agent("agent.down", echo)
            assert (await broker.request(message("agent.down", n=1), timeout=30)).data == {"n": 1}
    assert inbox_numbers(server, "agent.down") == []  # the timed-out request was never sent: nothing stale


async def test_commands_written_to_a_redis_that_died_are_sent_again_only_if_safe(server: RedisServer) -> None:
    async with MessageBroker(settings=settings_for(server)) as broker:
        await broker.pipeliner.call("SET", "counter", 0, replay=True)
        server.pause()  # frozen: what we write now stays unanswered
        sends = [asyncio.ensure_future(broker.publish_message(message("agent.burst", n=n))) for n in range(500)]
        unsafe = broker.pipeliner.call("INCR", "counter", replay=False)
        safe = broker.pipeliner.call("SET", "flag", "on", replay=True)
        await asyncio.sleep(0)  # one loop turn: the burst is written
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        results = await asyncio.gather(*sends)
        with pytest.raises(CommandOutcomeUnknownError, match="INCR"):
            await unsafe
        assert await safe == b"OK"
        assert broker.stats.reconnects >= 1
    assert all(not r.duplicate for r in results)
    assert inbox_numbers(server, "agent.burst") == list(range(500))  # all of them, once, in order


async def test_a_script_flush_mid_stream_keeps_the_order_of_sends(server: RedisServer) -> None:
    async with MessageBroker(settings=settings_for(server)) as broker:
        await broker.publish_message(message("agent.order", n=0))
        client = server.client()
        client.script_flush()
        client.close()
        results = await asyncio.gather(*(broker.publish_message(message("agent.order", n=n)) for n in range(1, 300)))
        assert broker.stats.reconnects >= 1  # it met NOSCRIPT and reloaded the scripts
    assert all(r.entry_id for r in results)
    assert inbox_numbers(server, "agent.order") == list(range(300))


async def test_out_of_memory_is_a_typed_error_and_passes(server: RedisServer) -> None:
    async with MessageBroker(settings=settings_for(server)) as broker:
        subscription = await broker.subscribe_to_agent("agent.oom", echo)
        assert (await broker.request(message("agent.oom", n=0))).data == {"n": 0}
        client = server.client()
        client.config_set("maxmemory", "1")
        try:
            with pytest.raises(RedisOutOfMemoryError, match="out of memory"):
                await broker.publish_message(message("agent.oom", n=1))
            with pytest.raises(RedisOutOfMemoryError):
                await broker.request(message("agent.oom", n=2))  # refused at once, not a timeout
        finally:
            client.config_set("maxmemory", "0")
            client.close()
        assert (await broker.request(message("agent.oom", n=3))).data == {"n": 3}
        assert subscription.running


async def test_a_key_of_the_wrong_type_is_a_typed_error(server: RedisServer) -> None:
    client = server.client()
    client.set(keys.inbox("agent.clobbered"), "not a stream")
    client.close()
    async with MessageBroker(settings=settings_for(server)) as broker:
        with pytest.raises(RedisCommandError) as caught:
            await broker.publish_message(message("agent.clobbered", n=0))
        assert caught.value.code == "WRONGTYPE" and "script send" in str(caught.value)
        assert (await broker.publish_message(message("agent.fine", n=0))).entry_id  # the connection carries on


@pytest.mark.parametrize("read_first", [False, True])
async def test_an_entry_with_the_last_possible_id_does_not_block_an_inbox(
    server: RedisServer, read_first: bool
) -> None:
    agent_id = "agent.hostile"
    async with MessageBroker(settings=settings_for(server)) as broker:
        received: asyncio.Queue[int] = asyncio.Queue()

        async def handler(msg: AgentMessage) -> None:
            received.put_nowait(msg.payload.data["n"])

        await broker.publish_message(message(agent_id, n=0))
        client = server.client()
        client.xadd(keys.inbox(agent_id), {"m": "evil"}, id=LAST_ID)
        subscription = await broker.subscribe_to_agent(agent_id, handler) if read_first else None
        if subscription is not None:
            assert await received.get() == 0
            while client.xlen(keys.dead_letters(agent_id)) < 1:  # the hostile entry, dead-lettered as malformed
                await asyncio.sleep(0.01)
        for n in (1, 2):
            assert (await broker.publish_message(message(agent_id, n=n))).entry_id
        if subscription is None:
            subscription = await broker.subscribe_to_agent(agent_id, handler)
            assert await received.get() == 0
        async with asyncio.timeout(10):
            assert [await received.get(), await received.get()] == [1, 2]
        letters = await broker.dead_letters(agent_id)
        client.close()
    assert len(letters) == 1 and letters[0].source_id == LAST_ID


async def test_a_failover_that_makes_redis_read_only_is_survived(tmp_path: Path, server: RedisServer) -> None:
    from agentcomms import BaseAgent, MessageSender, create_agent_config

    settings = settings_for(server, reconnect_timeout=60)

    class Twin(BaseAgent):
        async def handle_request_knowledge(self, msg: AgentMessage) -> dict[str, Any]:
            return dict(msg.payload.data)

    with RedisServer(tmp_path / "other") as other:
        config = create_agent_config("agent.failover", "f", "cfo", "finance")
        async with (
            Twin(config, settings=settings, heartbeat_interval=0.2) as twin,
            MessageSender(settings=settings) as sender,
        ):
            assert (await sender.request("agent.failover", "request_knowledge", {"n": 0})).data == {"n": 0}
            client = server.client()
            client.replicaof("127.0.0.1", other.port)  # demoted: writes now fail with READONLY
            while client.info("replication")["master_link_status"] != "up":
                await asyncio.sleep(0.02)  # the sync with the new primary is the event (it wipes our data)
            client.replicaof("no", "one")  # promoted again, with the other's (empty) data
            client.close()
            # the agent registers again at its next heartbeat, makes its groups again and answers
            await wait_registered(server, "agent.failover")
            reply = await sender.request("agent.failover", "request_knowledge", {"n": 1}, timeout=30)
            assert reply.data == {"n": 1}
            assert twin.running


async def wait_registered(server: RedisServer, agent_id: str, timeout: float = 30) -> None:
    """Until ``agent_id`` is in the registry: woken by keyspace notifications on the registry's hash."""
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=server.port)
    await client.config_set("notify-keyspace-events", "Kh")
    pubsub = client.pubsub()
    await pubsub.subscribe(f"__keyspace@0__:{keys.REGISTRY_AGENTS}")
    try:
        async with asyncio.timeout(timeout):
            while not await client.hexists(keys.REGISTRY_AGENTS, agent_id):
                await pubsub.get_message(timeout=1.0)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def test_stopping_a_subscription_never_waits_out_its_blocked_read(
    redis_url: str, agent_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agentcomms")
    settings = Settings(redis_url=redis_url)  # default claim_idle: reads block for 5 s
    async with MessageBroker(settings=settings) as broker:
        for round_ in range(30):
            subscription = await broker.subscribe_to_agent(agent_id, echo)
            for _ in range(round_ % 3):  # stop at different points of the loop
                await asyncio.sleep(0)
            await subscription.stop()
            assert not subscription.running
    assert not [r for r in caplog.records if "did not end" in r.getMessage()]


def test_the_raw_error_classes_of_redis_py_never_reach_callers() -> None:
    # the transport speaks RESP itself: no code path imports redis-py's connection or exceptions
    import agentcomms.broker
    import agentcomms.registry
    import agentcomms.subscription
    import agentcomms.transport.pipeliner

    for module in (agentcomms.broker, agentcomms.registry, agentcomms.subscription, agentcomms.transport.pipeliner):
        assert "redis" not in {name.split(".")[0] for name in vars(module) if isinstance(name, str)}
        assert not any((getattr(v, "__module__", None) or "").startswith("redis.") for v in vars(module).values())
    assert redis  # the tests' own client is redis-py


async def test_an_outage_longer_than_reconnect_timeout_leaves_no_unretrieved_errors(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import gc

    async with MessageBroker(settings=settings_for(server, reconnect_timeout=0.5)) as broker:
        await broker.subscribe_to_agent("agent.outage", echo)
        await asyncio.to_thread(server.kill)
        with pytest.raises(BrokerConnectionError):  # the outage has outlasted reconnect_timeout
            await broker.publish_message(message("agent.outage", n=0))
        await asyncio.to_thread(server.start)
        assert (await broker.request(message("agent.outage", n=1), timeout=30)).data == {"n": 1}
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_script_that_keeps_redis_busy_is_waited_out_in_order(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agentcomms")
    client = server.client(timeout=30)
    client.config_set("lua-time-limit", "50")  # after 50 ms, other clients get BUSY
    busy = "local s = tonumber(redis.call('TIME')[1]) while tonumber(redis.call('TIME')[1]) < s + 2 do end return 1"
    async with MessageBroker(settings=settings_for(server)) as broker:
        await broker.publish_message(message("agent.busy", n=0))
        running = asyncio.create_task(asyncio.to_thread(client.eval, busy, 0))
        while "BUSY" not in str(await asyncio.to_thread(_ping_error, server)):  # the script holds Redis now
            pass
        results = await asyncio.gather(*(broker.publish_message(message("agent.busy", n=n)) for n in range(1, 50)))
        await running
    client.close()
    assert all(r.entry_id for r in results)
    assert inbox_numbers(server, "agent.busy") == list(range(50))
    assert "BUSY" in caplog.text  # held, then sent again in order


def _ping_error(server: RedisServer) -> BaseException | None:
    client = server.client()
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return exc
    finally:
        client.close()


async def test_refused_credentials_are_a_typed_error_at_connect(tmp_path: Path) -> None:
    from agentcomms import RedisPermissionError

    with RedisServer(tmp_path / "locked") as locked:
        client = locked.client()
        client.config_set("requirepass", "s3cret-pass")
        client.close()
        for password in (None, "wrong-pass"):
            settings = Settings(redis_url=locked.url, redis_password=password)
            with pytest.raises(RedisPermissionError) as caught:
                await MessageBroker(settings=settings).connect()
            assert "wrong-pass" not in str(caught.value) and caught.value.code in ("NOAUTH", "WRONGPASS")
        async with MessageBroker(settings=Settings(redis_url=locked.url, redis_password="s3cret-pass")) as broker:
            assert (await broker.publish_message(message("agent.locked", n=0))).entry_id


async def test_a_connection_cancelled_while_logging_in_is_closed() -> None:
    """A task cancelled mid-handshake (an app shutting down) must not leave its half-made connection open.

    The peer is a loopback server that accepts and never answers (a hung Redis): the login waits until cancelled.
    """
    from agentcomms.transport import ConnectionSpec
    from agentcomms.transport.link import open_link

    accepted, closed = asyncio.Event(), asyncio.Event()

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client closes its end
        closed.set()
        writer.close()

    server = await asyncio.start_server(hung, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        connecting = asyncio.create_task(
            open_link(ConnectionSpec.from_url(f"redis://127.0.0.1:{port}"), name="cancelled", timeout=60)
        )
        async with asyncio.timeout(10):
            await accepted.wait()
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        async with asyncio.timeout(10):
            await closed.wait()  # closed by the cancelled call, not left to garbage collection
    finally:
        server.close()
        await server.wait_closed()
