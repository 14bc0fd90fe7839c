"""What goes wrong, on a real redis-server: failing handlers, garbage, expiry, lost connections, restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentMessage,
    BrokerConnectionError,
    DeadLetterNotFoundError,
    EmbeddedRedis,
    MessageBroker,
    RequestTimeoutError,
    Settings,
    keys,
)
from agentcomms.transport import BlockingReader, ConnectionSpec
from conftest import read_reply, wait_for_dead_letters
from test_broker import collect, message


async def test_always_failing_handler_dead_letters_after_n_deliveries(
    redis_url: str, agent_id: str, raw: Redis
) -> None:
    settings = Settings(redis_url=redis_url, claim_idle=0.05, max_deliveries=3)
    attempts: list[int] = []
    good = asyncio.Event()

    async def handler(msg: AgentMessage) -> str:
        if msg.payload.data.get("poison"):
            attempts.append(1)
            raise RuntimeError("cannot digest this")
        good.set()
        return "fine"

    async with MessageBroker(settings=settings) as broker:
        subscription = await broker.subscribe_to_agent(agent_id, handler)
        poison = message(agent_id, poison=True)
        await broker.publish_message(poison)
        [letter] = await wait_for_dead_letters(raw, agent_id, 1)
        # other messages keep flowing after the poison one
        reply = await broker.request(message(agent_id, poison=False))
        assert reply.success and reply.data == "fine"
        letters = await broker.dead_letters(agent_id)
        assert subscription.stats.failed == 3 and subscription.stats.dead_lettered == 1
    assert len(attempts) == 3
    assert letter[b"deliveries"] == b"3"
    assert b"RuntimeError: cannot digest this" in letter[b"reason"]
    [dead] = letters
    assert dead.message == poison and dead.deliveries == 3
    assert await raw.xlen(keys.inbox(agent_id)) == 0  # acknowledged and removed from the inbox
    assert await raw.xpending(keys.inbox(agent_id), keys.GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_failing_request_gets_a_dead_letter_reply_not_a_timeout(redis_url: str, agent_id: str) -> None:
    settings = Settings(redis_url=redis_url, claim_idle=0.05, max_deliveries=2)

    async def handler(msg: AgentMessage) -> None:
        raise ValueError("bad request")

    async with MessageBroker(settings=settings) as broker:
        await broker.subscribe_to_agent(agent_id, handler)
        reply = await broker.request(message(agent_id), timeout=20)
    assert not reply.success and reply.error is not None
    assert reply.error.code == "dead_lettered" and "ValueError: bad request" in reply.error.message


async def test_garbage_in_the_inbox_is_dead_lettered_and_the_agent_lives_on(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    inbox = keys.inbox(agent_id)
    await broker.publish_message(message(agent_id, n=0))  # creates the group
    await raw.xadd(inbox, {"foo": "bar"})
    await raw.xadd(inbox, {"m": b"\xff\xfe not json"})
    await raw.xadd(inbox, {"m": json.dumps({"hello": "world"})})
    await raw.xadd(inbox, {"m": "x" * (broker.settings.max_message_bytes + 1)})
    other = message("agent.someone.else")
    await raw.xadd(inbox, {"m": other.model_dump_json()})
    hijack = message(agent_id).model_copy(update={"reply_to": keys.inbox("agent.victim")})
    await raw.xadd(inbox, {"m": hijack.model_dump_json()})
    await raw.xadd(inbox, {"m": message(agent_id, n=1).model_dump_json()})

    received = await collect(broker, agent_id, 2)
    assert [m.payload.data["n"] for m in received] == [0, 1]
    letters = await wait_for_dead_letters(raw, agent_id, 6)
    reasons = [letter[b"reason"].decode() for letter in letters]
    assert reasons[0].startswith("malformed: entry has no 'm' field (fields: foo)")
    assert reasons[1].startswith("malformed: not JSON")
    assert reasons[2].startswith("invalid schema:") and "sender_id" in reasons[2]
    assert reasons[3] == f"too large: {broker.settings.max_message_bytes + 1} bytes, limit 1048576"
    assert reasons[4] == "wrong recipient: addressed to 'agent.someone.else'"
    assert reasons[5].startswith("invalid reply_to")
    assert json.loads(letters[0][b"raw"]) == ["foo", "bar"]
    assert await raw.exists(keys.inbox("agent.victim")) == 0
    assert await broker.dead_letter_agents() == [agent_id]


async def test_expired_request_is_dead_lettered_not_answered(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    with pytest.raises(RequestTimeoutError):
        await broker.request(message(agent_id, late=True), timeout=0.05)
    calls: list[AgentMessage] = []

    async def handler(msg: AgentMessage) -> str:
        calls.append(msg)
        return "too late"

    subscription = await broker.subscribe_to_agent(agent_id, handler)
    [letter] = await wait_for_dead_letters(raw, agent_id, 1)
    assert letter[b"reason"].startswith(b"expired")
    assert calls == [] and subscription.stats.expired == 1
    assert await raw.xlen(broker.reply_stream) == 0  # no stale answer was written


async def test_dead_letter_redrive_and_purge(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    await broker.publish_message(message(agent_id, n=0))
    await raw.xadd(keys.inbox(agent_id), {"junk": "1"})
    with pytest.raises(RequestTimeoutError):
        await broker.request(message(agent_id, n=1), timeout=0.05)
    received = await collect(broker, agent_id, 1)
    await wait_for_dead_letters(raw, agent_id, 2)
    junk, expired = await broker.dead_letters(agent_id)
    assert junk.message is None and expired.message is not None
    result = await broker.redrive_dead_letter(agent_id, expired.entry_id)
    assert not result.duplicate  # the dedup window does not swallow a redrive
    assert [d.entry_id for d in await broker.dead_letters(agent_id)] == [junk.entry_id]
    assert await raw.xlen(keys.inbox(agent_id)) == 1
    assert await broker.purge_dead_letters(agent_id) == 1
    assert await broker.dead_letters(agent_id) == [] and await broker.dead_letter_agents() == []
    assert [m.payload.data["n"] for m in received] == [0]


async def test_consumer_survives_a_killed_connection(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    async def handler(msg: AgentMessage) -> Any:
        return msg.payload.data

    await broker.subscribe_to_agent(agent_id, handler)
    assert (await broker.request(message(agent_id, n=1))).data == {"n": 1}
    killed = await raw.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 2  # the subscription's reader, the reply reader and the pool
    for n in range(2, 5):
        assert (await broker.request(message(agent_id, n=n))).data == {"n": n}


async def test_redis_restart_between_send_and_receive_loses_nothing(tmp_path: Path, agent_id: str) -> None:
    server = EmbeddedRedis(tmp_path / "restart", appendfsync="always").start()
    try:
        settings = Settings(redis_url=server.url, claim_idle=0.3)
        async with MessageBroker(settings=settings) as sender:
            for n in range(50):
                await sender.publish_message(message(agent_id, n=n))
        server.stop()
        server.start()
        async with MessageBroker(settings=settings) as receiver:
            received = await collect(receiver, agent_id, 50, concurrency=1)
        assert [m.payload.data["n"] for m in received] == list(range(50))
    finally:
        server.stop()


async def test_subscription_resumes_after_redis_restart(tmp_path: Path, agent_id: str) -> None:
    server = EmbeddedRedis(tmp_path / "restart2", appendfsync="always").start()
    try:
        settings = Settings(redis_url=server.url, claim_idle=0.3, reconnect_timeout=30)
        received: list[int] = []
        arrived = asyncio.Condition()

        async def handler(msg: AgentMessage) -> None:
            async with arrived:
                received.append(msg.payload.data["n"])
                arrived.notify_all()

        async with MessageBroker(settings=settings) as broker:
            await broker.subscribe_to_agent(agent_id, handler)
            await broker.publish_message(message(agent_id, n=0))
            async with asyncio.timeout(20), arrived:
                await arrived.wait_for(lambda: received == [0])
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            for n in range(1, 6):
                await broker.publish_message(message(agent_id, n=n))  # retried until Redis is back
            async with asyncio.timeout(30), arrived:
                await arrived.wait_for(lambda: len(received) == 6)
        assert received == list(range(6))
    finally:
        server.stop()


async def test_cancelled_requests_never_get_someone_elses_reply(
    broker: MessageBroker, settings: Settings, agent_id: str
) -> None:
    async def handler(msg: AgentMessage) -> Any:
        for _ in range(random.randint(0, 3)):
            await asyncio.sleep(0)
        return {"token": msg.payload.data["token"]}

    async with MessageBroker(settings=settings, client_name="agent") as agent_side:
        await agent_side.subscribe_to_agent(agent_id, handler, concurrency=64)
        rng = random.Random(7)

        async def ask(token: int) -> tuple[int, Any]:
            reply = await broker.request(message(agent_id, token=token), timeout=60)
            return token, reply.data["token"]

        tasks = [asyncio.create_task(ask(token)) for token in range(1000)]
        cancelled = set(rng.sample(range(1000), 500))
        for token in sorted(cancelled, key=lambda _: rng.random()):
            for _ in range(rng.randint(0, 40)):  # cancel at a random point of the request's life
                await asyncio.sleep(0)
            tasks[token].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)

    answered = [r for r in results if isinstance(r, tuple)]
    assert all(mine == theirs for mine, theirs in answered)
    assert len(answered) >= 500
    assert all(isinstance(r, asyncio.CancelledError) for r in results if not isinstance(r, tuple))
    # the connection is still in step: a fresh request gets its own answer
    async with MessageBroker(settings=settings, client_name="agent2") as again:
        await again.subscribe_to_agent(agent_id, handler)
        for token in (5001, 5002):
            reply = await broker.request(message(agent_id, token=token))
            assert reply.data == {"token": token}
    # a reply may resolve a future just before its caller's cancel lands: counted, but never misrouted
    assert len(answered) + 2 <= broker.stats.replies_received <= len(answered) + 2 + len(cancelled)


async def test_event_feed_resubscribes_after_its_connection_is_killed(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    feed = broker.events()
    assert isinstance(feed, AsyncGenerator)
    assert (await anext(feed))["event"] == "subscribed"
    assert await raw.client_kill_filter(_type="pubsub") == 1
    async with asyncio.timeout(20):
        assert (await anext(feed))["event"] == "resubscribed"
        sent = message(agent_id)
        await broker.publish_message(sent)
        event = await anext(feed)
    await feed.aclose()
    assert event["event"] == "sent" and event["message_id"] == sent.message_id


async def test_an_empty_blocking_read_keeps_its_connection(redis_url: str, agent_id: str) -> None:
    # a read that blocks and returns nothing is not a dead link: the same connection serves the next one
    reader = BlockingReader(ConnectionSpec.from_url(redis_url), name="test.reader")
    try:
        for _ in range(2):
            assert await reader.call("XREAD", "BLOCK", 200, "STREAMS", keys.inbox(agent_id), "$", block_ms=200) is None
            first = reader.client_id
        assert await reader.call("CLIENT", "ID") == first
    finally:
        reader.close()


async def test_reply_reader_survives_its_stream_being_clobbered(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    async def handler(msg: AgentMessage) -> str:
        return "ok"

    await broker.subscribe_to_agent(agent_id, handler)
    assert (await broker.request(message(agent_id))).data == "ok"
    await raw.delete(broker.reply_stream)
    await raw.set(broker.reply_stream, "not a stream")  # XREAD now fails with WRONGTYPE
    with pytest.raises(RequestTimeoutError):
        await broker.request(message(agent_id), timeout=0.5)  # the reply XADD fails too: logged, not hidden
    await raw.delete(broker.reply_stream)
    assert (await broker.request(message(agent_id))).data == "ok"  # the reader lived on


async def test_an_entry_whose_field_name_is_not_utf8_is_dead_lettered_at_once(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    inbox = keys.inbox(agent_id)
    await broker.publish_message(message(agent_id, n=0))
    await raw.xadd(inbox, {b"\xff\xfe": b"x", b"m\xc3": b"y"})
    await raw.xadd(inbox, {"m": message(agent_id, n=1).model_dump_json()})
    received = await collect(broker, agent_id, 2)
    assert [m.payload.data["n"] for m in received] == [0, 1]
    [letter] = await broker.dead_letters(agent_id)
    assert letter.deliveries == 1  # not retried: it can never be a message
    assert letter.reason.startswith("malformed: entry has no 'm' field (fields: ")
    assert letter.raw is not None and "\ufffd" in letter.raw
    assert letter.as_dict()["raw"] == letter.raw  # listing and showing it never fail


async def test_a_request_refused_for_its_schema_or_recipient_is_answered_dead_lettered(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    async def handler(msg: AgentMessage) -> str:
        return "handled"

    await broker.subscribe_to_agent(agent_id, handler)
    misaddressed = message("agent.someone.else").model_copy(
        update={"reply_to": broker.reply_stream, "correlation_id": "corr-recipient"}
    )
    invalid = {"message_id": "corr-schema", "reply_to": broker.reply_stream, "intent": "NOT AN INTENT"}
    await raw.xadd(keys.inbox(agent_id), {"m": misaddressed.model_dump_json()})
    await raw.xadd(keys.inbox(agent_id), {"m": json.dumps(invalid)})
    replies: dict[str, Any] = {}
    last: Any = "0-0"
    async with asyncio.timeout(20):
        while len(replies) < 2:
            for _, batch in read_reply(await raw.xread({broker.reply_stream: last}, block=1000)):
                for entry_id, fields in batch:
                    last = entry_id
                    reply = json.loads(fields[b"r"])
                    replies[reply["correlation_id"]] = reply
    assert replies["corr-recipient"]["error"]["code"] == "dead_lettered"
    assert "wrong recipient" in replies["corr-recipient"]["error"]["message"]
    assert replies["corr-schema"]["error"]["code"] == "dead_lettered"
    assert "invalid schema" in replies["corr-schema"]["error"]["message"]


async def test_the_password_never_shows_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(redis_url="redis://:hunter2@127.0.0.1:1/0")
    broker = MessageBroker(settings=settings)
    with pytest.raises(BrokerConnectionError) as caught:
        await broker.connect()
    assert "hunter2" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)
    assert "hunter2" not in broker.url and "hunter2" not in repr(broker.spec if broker.connected else settings)
    assert "hunter2" not in caplog.text


async def test_dead_lettering_twice_writes_one_dead_letter(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    from agentcomms.deadletters import move_to_dead_letters

    inbox = keys.inbox(agent_id)
    await raw.xgroup_create(inbox, keys.GROUP, id="0", mkstream=True)
    await broker.publish_message(message(agent_id, n=0))
    [[_, [(entry_id, _)]]] = read_reply(await raw.xreadgroup(keys.GROUP, "c", {inbox: ">"}))
    moves = [
        await move_to_dead_letters(
            broker.pipeliner, agent_id, inbox, entry_id.decode(), "test", 1, consumer="c", claim_idle_ms=None
        )
        for _ in range(2)  # as a replay after a lost connection would run it again
    ]
    assert moves[0] is not None and moves[0][1] is True  # moved by this call
    assert moves[1] is not None and moves[1][1] is False  # the repeat finds that dead letter, writes none
    assert await raw.xlen(keys.dead_letters(agent_id)) == 1
    [letter] = await broker.dead_letters(agent_id)
    first = await broker.redrive_dead_letter(agent_id, letter.entry_id)
    with pytest.raises(DeadLetterNotFoundError):
        await broker.redrive_dead_letter(agent_id, letter.entry_id)  # gone: redriven once, not twice
    assert await raw.xlen(inbox) == 1 and first.entry_id
