"""Delivery over Redis Streams on a real redis-server: send, receive, reply, fan-out, limits."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from redis.asyncio import Redis

from agentcomms import (
    AgentMessage,
    AgentResponse,
    InboxFullError,
    MessageBroker,
    MessageIntent,
    MessagePayload,
    MessageTooLargeError,
    Priority,
    RequestTimeoutError,
    Settings,
    keys,
)
from agentcomms.transport import ClusterPipeliner
from conftest import keyspace_events, server_time_passes


def message(recipient: str, sender: str = "agent.sender", **data: Any) -> AgentMessage:
    return AgentMessage(
        sender_id=sender,
        recipient_id=recipient,
        intent=MessageIntent.REQUEST_KNOWLEDGE,
        payload=MessagePayload(data=data),
    )


async def inbox_of(raw: Redis, agent_id: str) -> list[tuple[str, AgentMessage]]:
    """Entry id and message of everything in an agent's normal-priority inbox, oldest first."""
    found: Any = await raw.xrange(keys.inbox(agent_id))
    return [(entry_id.decode(), AgentMessage.model_validate_json(fields[b"m"])) for entry_id, fields in found]


async def collect(broker: MessageBroker, agent_id: str, count: int, **options: Any) -> list[AgentMessage]:
    """Subscribe, wait until ``count`` messages arrived, stop, return them in arrival order."""
    received: list[AgentMessage] = []
    done = asyncio.Event()

    async def handler(msg: AgentMessage) -> None:
        received.append(msg)
        if len(received) >= count:
            done.set()

    subscription = await broker.subscribe_to_agent(agent_id, handler, **options)
    async with asyncio.timeout(30):
        await done.wait()
    await subscription.stop()
    return received


async def test_published_message_reaches_its_agent(broker: MessageBroker, agent_id: str) -> None:
    sent = message(agent_id, query="pipeline?")
    result = await broker.publish_message(sent)
    assert result.message_id == sent.message_id and not result.duplicate
    [received] = await collect(broker, agent_id, 1)
    assert received == sent


async def test_request_gets_its_reply(broker: MessageBroker, agent_id: str) -> None:
    async def handler(msg: AgentMessage) -> dict[str, Any]:
        return {"answer": msg.payload.data["n"] * 2}

    await broker.subscribe_to_agent(agent_id, handler)
    reply = await broker.request(message(agent_id, n=21))
    assert reply.success and reply.data == {"answer": 42}
    assert reply["data"] == {"answer": 42} and reply.get("success") is True
    assert reply.responder_id == agent_id


async def test_handler_may_return_an_error_response(broker: MessageBroker, agent_id: str) -> None:
    async def handler(msg: AgentMessage) -> AgentResponse:
        return AgentResponse.fail("not_found", "no such roadmap")

    await broker.subscribe_to_agent(agent_id, handler)
    reply = await broker.request(message(agent_id))
    assert not reply.success
    assert reply["error"] == {"code": "not_found", "message": "no such roadmap"}


async def test_unserialisable_result_becomes_an_error_reply(broker: MessageBroker, agent_id: str) -> None:
    async def handler(msg: AgentMessage) -> object:
        return {"handle": object()}

    await broker.subscribe_to_agent(agent_id, handler)
    reply = await broker.request(message(agent_id))
    assert not reply.success and reply.error is not None and reply.error.code == "invalid_result"


async def test_message_sent_before_the_agent_ever_started_is_delivered(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    await broker.publish_message(message(agent_id, n=1))
    assert await raw.xinfo_groups(keys.inbox(agent_id)) == []  # no consumer group yet: the stream keeps it anyway
    [received] = await collect(broker, agent_id, 1)  # the consumer creates its group at 0 and sees it
    assert received.payload.data == {"n": 1}


async def test_offline_agent_gets_all_500_in_per_sender_order(settings: Settings, agent_id: str) -> None:
    senders = [MessageBroker(settings=settings, client_name=f"s{i}") for i in range(5)]
    for sender in senders:
        await sender.connect()
    try:

        async def send_all(index: int, sender: MessageBroker) -> None:
            for seq in range(100):
                await sender.publish_message(message(agent_id, sender=f"agent.sender{index}", seq=seq))

        await asyncio.gather(*(send_all(i, s) for i, s in enumerate(senders)))
        received = await collect(senders[0], agent_id, 500, concurrency=1)
    finally:
        for sender in senders:
            await sender.close()
    assert len(received) == 500
    for index in range(5):
        sequence = [m.payload.data["seq"] for m in received if m.sender_id == f"agent.sender{index}"]
        assert sequence == list(range(100))


async def test_duplicate_message_id_is_suppressed(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    sent = message(agent_id)
    first = await broker.publish_message(sent)
    second = await broker.publish_message(sent)
    assert not first.duplicate and first.entry_id and second.duplicate and second.entry_id == ""
    assert await raw.xlen(keys.inbox(agent_id)) == 1
    assert broker.stats.duplicates == 1


@pytest.mark.single_server  # reads one server's command stats, Pub/Sub or keyspace events
async def test_sends_in_one_tick_share_one_script_call(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    await broker.health_check()  # connected and idle
    sent = [message(agent_id, n=n) for n in range(40)]
    repeated = sent[7]
    await raw.config_resetstat()
    before = broker.stats.round_trips
    results = await asyncio.gather(*(broker.publish_message(m) for m in [*sent, repeated]))
    # the first goes out at once on the idle connection; the other 40 join one SEND call
    assert (await raw.info("commandstats"))["cmdstat_evalsha"]["calls"] == 2
    assert broker.stats.round_trips - before == 2
    assert [r.message_id for r in results[:40]] == [m.message_id for m in sent] and not any(
        r.duplicate for r in results[:40]
    )
    assert results[40].duplicate and not results[7].duplicate  # dedup works inside one call too
    assert [entry_id for entry_id, _ in await inbox_of(raw, agent_id)] == [
        r.entry_id for r in results[:40]
    ]  # in the order of the calls


async def test_a_batch_sent_in_between_is_not_overtaken(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    await broker.health_check()
    first, second, third, fourth = (message(agent_id, n=n) for n in range(4))
    await asyncio.gather(
        broker.publish_message(first),  # written at once
        broker.publish_message(second),  # opens a shared SEND call
        broker.publish_many([third]),  # closes it: nothing sent later may join and overtake this one
        broker.publish_message(fourth),
    )
    assert [m.payload.data["n"] for _, m in await inbox_of(raw, agent_id)] == [0, 1, 2, 3]


async def test_a_send_cancelled_before_its_write_is_not_sent(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    await broker.health_check()
    tasks = [asyncio.create_task(broker.publish_message(message(agent_id, n=n))) for n in range(3)]
    await asyncio.sleep(0)  # one loop turn: all three queued; the first is written, two wait for the end of the tick
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [m.payload.data["n"] for _, m in await inbox_of(raw, agent_id)] == [0, 2]


async def test_a_waiting_handler_does_not_hold_up_the_next_messages(broker: MessageBroker, agent_id: str) -> None:
    for n in range(4):
        await broker.publish_message(message(agent_id, n=n))  # all read in one batch once the agent starts
    release, done = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def handler(msg: AgentMessage) -> None:
        n = msg.payload.data["n"]
        if n == 0:
            await release.wait()  # set only once the three behind it were handled
        handled.append(n)
        if len(handled) == 3:
            release.set()
        if len(handled) == 4:
            done.set()

    subscription = await broker.subscribe_to_agent(agent_id, handler, concurrency=2)
    async with asyncio.timeout(20):
        await done.wait()
    await subscription.stop()
    assert handled == [1, 2, 3, 0]


async def test_full_inbox_rejects_instead_of_trimming(redis_url: str, agent_id: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, max_inbox_length=3)
    async with MessageBroker(settings=settings) as broker:
        for n in range(3):
            await broker.publish_message(message(agent_id, n=n))
        refused = message(agent_id, n=3)
        with pytest.raises(InboxFullError) as caught:
            await broker.publish_message(refused)
        assert caught.value.agent_id == agent_id and caught.value.limit == 3 and caught.value.length == 3
        assert "full" in str(caught.value)
        received = await collect(broker, agent_id, 3)
        assert [m.payload.data["n"] for m in received] == [0, 1, 2]
        # handled messages are removed, so the inbox takes new ones again
        assert await raw.xlen(keys.inbox(agent_id)) == 0
        # and a refused message was not marked as seen: sent again, it is accepted, not called a duplicate
        assert not (await broker.publish_message(refused)).duplicate


async def test_a_message_id_is_accepted_again_after_the_dedup_window(redis_url: str, agent_id: str, raw: Redis) -> None:
    async def server_clock_passes(ms: int) -> None:
        # the window is judged on the Redis server's clock: the wait is the scenario itself
        while True:
            seconds, micros = await raw.time()
            if seconds * 1000 + micros // 1000 > ms:
                return
            await asyncio.sleep(0.01)

    settings = Settings(redis_url=redis_url, dedup_window=1.0)
    async with MessageBroker(settings=settings) as broker:
        early, later = message(agent_id), message(agent_id)
        accepted_ms = int((await broker.publish_message(early)).entry_id.split("-")[0])
        assert (await broker.publish_message(early)).duplicate
        await server_clock_passes(accepted_ms + 500)
        await broker.publish_message(later)  # keeps the dedup set alive past the first one's window
        await server_clock_passes(accepted_ms + 1000)
        assert not (await broker.publish_message(early)).duplicate  # its mark expired; the inbox takes it again
        assert (await broker.publish_message(later)).duplicate  # still within its own window
        found: Any = await raw.zrange(keys.dedup(agent_id), 0, -1)
        members = {m.decode() for m in found}
        assert members == {early.message_id, later.message_id, "~"}  # "~": when housekeeping last ran
        assert 0 < await raw.pttl(keys.dedup(agent_id)) <= 1100  # an idle inbox's dedup set goes away by itself


async def test_oversized_message_is_rejected_before_sending(redis_url: str, agent_id: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, max_message_bytes=2048)
    async with MessageBroker(settings=settings) as broker:
        with pytest.raises(MessageTooLargeError) as caught:
            await broker.publish_message(message(agent_id, blob="x" * 4096))
        assert caught.value.limit == 2048 and caught.value.size > 4096
    assert await raw.exists(keys.inbox(agent_id)) == 0


async def test_high_priority_is_read_first(broker: MessageBroker, agent_id: str) -> None:
    for n, priority in enumerate([Priority.LOW, Priority.NORMAL, Priority.HIGH]):
        msg = message(agent_id, n=n)
        msg.payload.priority = priority
        await broker.publish_message(msg)
    received = await collect(broker, agent_id, 3, concurrency=1)
    assert [m.payload.priority for m in received] == [Priority.HIGH, Priority.NORMAL, Priority.LOW]


async def test_fan_out_is_one_round_trip(broker: MessageBroker, raw: Redis) -> None:
    recipients = [f"agent.fan.{n}.{uuid.uuid4().hex[:6]}" for n in range(200)]  # distinct ids
    before = broker.stats.round_trips
    results = await broker.publish_many([message(r, note="all hands") for r in recipients])
    primaries = len(broker.pipeliner.nodes) if isinstance(broker.pipeliner, ClusterPipeliner) else 1
    assert broker.stats.round_trips - before == primaries  # one write per server (per primary of a cluster)
    assert all(not isinstance(r, Exception) for r in results)
    lengths = [await raw.xlen(keys.inbox(r)) for r in recipients]
    assert lengths == [1] * 200


async def test_fan_out_reports_each_recipient(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, max_inbox_length=1)
    async with MessageBroker(settings=settings) as broker:
        await broker.publish_message(message("agent.busy"))
        results = await broker.publish_many([message("agent.busy"), message("agent.free")])
    assert isinstance(results[0], InboxFullError)
    assert not isinstance(results[1], Exception) and results[1].recipient_id == "agent.free"


async def test_two_instances_share_the_load(settings: Settings, agent_id: str) -> None:
    seen: dict[str, list[str]] = {"a": [], "b": []}
    both_busy = asyncio.Event()
    done = asyncio.Event()

    def make(name: str) -> Any:
        async def handler(msg: AgentMessage) -> None:
            seen[name].append(msg.message_id)
            if seen["a"] and seen["b"]:
                both_busy.set()
            await both_busy.wait()  # each instance holds a message until the other has one too
            if len(seen["a"]) + len(seen["b"]) >= 20:
                done.set()

        return handler

    async with MessageBroker(settings=settings) as one, MessageBroker(settings=settings) as two:
        await one.subscribe_to_agent(agent_id, make("a"), concurrency=1)
        await two.subscribe_to_agent(agent_id, make("b"), concurrency=1)
        for n in range(20):
            await one.publish_message(message(agent_id, n=n))
        async with asyncio.timeout(30):
            await done.wait()
    assert seen["a"] and seen["b"]
    assert len(set(seen["a"]) | set(seen["b"])) == 20
    assert not set(seen["a"]) & set(seen["b"])


async def test_request_times_out_when_nobody_answers(broker: MessageBroker, agent_id: str) -> None:
    with pytest.raises(RequestTimeoutError) as caught:
        await broker.request(message(agent_id), timeout=0.2)
    assert caught.value.agent_id == agent_id and isinstance(caught.value, TimeoutError)
    assert broker.stats.timeouts == 1


async def test_event_feed_shows_sent_and_handled(broker: MessageBroker, agent_id: str) -> None:
    feed = broker.events()
    assert isinstance(feed, AsyncGenerator)
    assert (await anext(feed))["event"] == "subscribed"

    async def handler(msg: AgentMessage) -> str:
        return "ok"

    await broker.subscribe_to_agent(agent_id, handler)
    sent = message(agent_id)
    await broker.request(sent)
    kinds = []
    async with asyncio.timeout(10):
        async for event in feed:
            if event.get("message_id") == sent.message_id:
                kinds.append(event["event"])
            if "handled" in kinds:
                break
    await feed.aclose()
    assert kinds == ["sent", "handled"]


async def test_event_feed_yields_each_event_of_a_batch(broker: MessageBroker, agent_id: str) -> None:
    feed = broker.events()
    assert isinstance(feed, AsyncGenerator)
    assert (await anext(feed))["event"] == "subscribed"
    batch = [message(agent_id, n=n) for n in range(3)]
    await broker.publish_many(batch)  # one SEND call: its three events travel in one feed message
    async with asyncio.timeout(10):
        events = [await anext(feed) for _ in range(3)]
    await feed.aclose()
    assert [(e["event"], e["message_id"]) for e in events] == [("sent", m.message_id) for m in batch]


@pytest.mark.single_server  # reads one server's command stats
async def test_event_feed_costs_nothing_while_nobody_listens(settings: Settings, agent_id: str, raw: Redis) -> None:
    async def handler(msg: AgentMessage) -> str:
        return "ok"

    # without the record, whose ack reads each entry (XRANGE) to keep it
    async with MessageBroker(settings=settings.model_copy(update={"record": False})) as broker:
        await broker.subscribe_to_agent(agent_id, handler)
        await raw.config_resetstat()
        await broker.request(message(agent_id))
        await broker.publish_many([message(agent_id, n=n) for n in range(5)])
        stats = await raw.info("commandstats")
    assert "cmdstat_evalsha" in stats
    assert "cmdstat_publish" not in stats and "cmdstat_xrange" not in stats  # no events built, none published


@pytest.mark.single_server  # reads one server's command stats, Pub/Sub or keyspace events
async def test_the_feed_turns_on_for_a_channel_subscriber_not_a_pattern(
    broker: MessageBroker, agent_id: str, raw: Redis
) -> None:
    patterns = raw.pubsub(ignore_subscribe_messages=True)
    await patterns.psubscribe("ac:*")
    await raw.config_resetstat()
    await broker.publish_message(message(agent_id))
    assert "cmdstat_publish" not in await raw.info("commandstats")  # a pattern alone: nothing is built
    channel = raw.pubsub(ignore_subscribe_messages=True)
    await channel.subscribe(keys.EVENTS_CHANNEL)
    sent = message(agent_id)
    await broker.publish_message(sent)
    async with asyncio.timeout(10):
        while (feed := await channel.get_message(timeout=None)) is None:
            pass
    for pubsub in (patterns, channel):
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    event = json.loads(feed["data"])
    assert event["event"] == "sent" and event["message_id"] == sent.message_id
    assert event["sender_id"] == sent.sender_id and event["intent"] == sent.intent


async def test_health_check(broker: MessageBroker, agent_id: str) -> None:
    async def handler(msg: AgentMessage) -> None:
        return None

    await broker.subscribe_to_agent(agent_id, handler)
    health = await broker.health_check()
    assert health["status"] == "healthy" and health["redis_version"]
    assert health["subscriptions"] == [agent_id]


@pytest.mark.single_server  # reads one server's command stats, Pub/Sub or keyspace events
async def test_reply_stream_expires_and_is_trimmed(broker: MessageBroker, agent_id: str, raw: Redis) -> None:
    async def handler(msg: AgentMessage) -> int:
        return 1

    await broker.subscribe_to_agent(agent_id, handler)
    async with keyspace_events(raw, broker.reply_stream) as events:
        for _ in range(3):
            await broker.request(message(agent_id))
        ttl = await raw.pttl(broker.reply_stream)
        assert 0 < ttl <= broker.settings.reply_ttl * 1000
        async with asyncio.timeout(10):
            while await raw.xlen(broker.reply_stream):  # the reader trims what it read once replies stop
                assert await events.get() in (b"xadd", b"expire", b"xtrim")
    assert await raw.exists(broker.reply_stream)  # trimmed, not deleted: it keeps its TTL


async def test_a_handler_running_longer_than_claim_idle_is_not_taken_over(
    settings: Settings, agent_id: str, raw: Redis
) -> None:
    # two instances; the first holds a message for several claim_idle periods (the waiting is the scenario)
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    def make(name: str) -> Any:
        async def handler(msg: AgentMessage) -> str:
            runs.append(name)
            started.set()
            await release.wait()
            return name

        return handler

    async with MessageBroker(settings=settings) as one, MessageBroker(settings=settings) as two:
        await one.subscribe_to_agent(agent_id, make("one"))
        asking = asyncio.create_task(one.request(message(agent_id), timeout=30))
        await started.wait()
        await two.subscribe_to_agent(agent_id, make("two"))
        await server_time_passes(raw, 5 * settings.claim_idle)
        release.set()
        reply = await asyncio.wait_for(asking, 30)
    assert runs == ["one"] and reply.data == "one"  # kept alive: the second instance never took it over


async def test_a_worker_cancelled_while_idle_does_not_break_the_subscription(
    broker: MessageBroker, agent_id: str
) -> None:
    # an event loop shutting down cancels every task: idle workers included, before stop() runs
    handled: list[int] = []
    first, second = asyncio.Event(), asyncio.Event()

    async def handler(msg: AgentMessage) -> None:
        handled.append(msg.payload.data["n"])
        (first if len(handled) == 1 else second).set()

    subscription = await broker.subscribe_to_agent(agent_id, handler)
    await broker.publish_message(message(agent_id, n=1))
    async with asyncio.timeout(20):
        await first.wait()
        while len(subscription._idle) < len(subscription._workers):  # the worker is back waiting
            await asyncio.sleep(0)
    for worker in list(subscription._workers):
        worker.cancel()
    await asyncio.gather(*subscription._workers, return_exceptions=True)
    await broker.publish_message(message(agent_id, n=2))
    async with asyncio.timeout(20):
        await second.wait()
    await subscription.stop()
    assert handled == [1, 2]
