"""The record on a real redis-server: every finished message with its reply, receipts, conversations, retention."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from agentcomms import BaseAgent, HandlerError, MessageBroker, MessageSender, RequestTimeoutError, Settings, keys
from agentcomms.examples import create_agent_config
from agentcomms.record import RecordedMessage, in_send_order
from agentcomms.schemas import AgentMessage
from agentcomms.transport.scripts import ACK
from conftest import (
    keyspace_events,
    raw_client,
    read_reply,
    server_time_passes,
    wait_for_dead_letters,
    wait_for_entries,
)

pytestmark = pytest.mark.record  # the record on, as a dashboard's agents would keep it


class Strategist(BaseAgent):
    """Answers a strategy question by asking the engineer first: a conversation of two hops."""

    async def handle_request_strategy(self, message: AgentMessage) -> dict[str, Any]:
        estimate = await self.request("agent.cto", "estimate", {"feature": message.payload.data.get("feature")})
        return {"plan": "ship it", "weeks": estimate.data["weeks"]}

    async def handle_inform(self, message: AgentMessage) -> None:
        return None

    async def handle_request_review(self, message: AgentMessage) -> None:
        raise HandlerError("no_reviews", "reviews are closed")

    async def handle_run_checks(self, message: AgentMessage) -> dict[str, Any]:
        return {"checks": [{"name": "lint", "success": False}]}  # a success whose data says "success": false


class Engineer(BaseAgent):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def handle_estimate(self, message: AgentMessage) -> dict[str, Any]:
        self.entered.set()
        await self.gate.wait()
        return {"weeks": 3}


def strategist(settings: Settings) -> Strategist:
    return Strategist(create_agent_config("agent.cso", "cso", "CSO", "strategy", ["planning"]), settings=settings)


def engineer(settings: Settings) -> Engineer:
    return Engineer(create_agent_config("agent.cto", "cto", "CTO", "engineering", ["estimates"]), settings=settings)


async def wait_recorded(broker: MessageBroker, agent_id: str, count: int) -> list[Any]:
    """The agent's record once it holds ``count`` messages (the ack that records them may trail the reply)."""
    async with raw_client(broker.url) as raw:
        await wait_for_entries(raw, keys.record(agent_id), count)
    return await broker.record.messages(agent_id)


async def wait_finished(broker: MessageBroker, raw: Redis, agent_id: str, message_id: str) -> list[Any]:
    """The records of one message once its recipient finished it (checked again at each change of its record)."""
    async with keyspace_events(raw, keys.record(agent_id)) as events, asyncio.timeout(20):
        while True:
            found = await broker.record.receipts(message_id, agent_id=agent_id)
            if found and found[-1].record_id:
                return found
            await events.get()


async def test_a_request_is_recorded_with_its_reply_and_receipts(settings: Settings) -> None:
    async with strategist(settings), engineer(settings), MessageSender(settings=settings, sender_id="dash") as sender:
        reply = await sender.request("agent.cso", "request_strategy", {"feature": "sso"})
        assert reply.data == {"plan": "ship it", "weeks": 3}
        [recorded] = await wait_recorded(sender.broker, "agent.cso", 1)
    message, answer = recorded.message, recorded.reply
    assert message is not None and answer is not None
    assert (message.sender_id, message.intent, message.payload.data) == ("dash", "request_strategy", {"feature": "sso"})
    assert answer.data == {"plan": "ship it", "weeks": 3} and answer.correlation_id == message.message_id
    assert recorded.outcome == "replied"
    states = [(r.state, r.at) for r in recorded.receipts]
    assert [s for s, _ in states] == ["sent", "delivered", "replied"]
    assert states[0][1] <= states[1][1] <= states[2][1]  # in order on the server's clock
    shown = recorded.as_dict()
    assert shown["intent"] == "request_strategy" and shown["reply"]["data"]["weeks"] == 3
    assert shown["queued_ms"] >= 0 and shown["handling_ms"] >= 0


async def test_a_conversation_is_every_hop_across_agents_in_order(settings: Settings) -> None:
    async with strategist(settings), engineer(settings), MessageSender(settings=settings, sender_id="dash") as sender:
        await sender.request("agent.cso", "request_strategy", {"feature": "sso"}, conversation_id="conv-1")
        await wait_recorded(sender.broker, "agent.cso", 1)
        await wait_recorded(sender.broker, "agent.cto", 1)  # its acknowledgement may come after the CSO's
        timeline = await sender.broker.record.conversation("conv-1")
        [summary] = await sender.broker.record.conversations()
    # the strategist's own request to the engineer joined the conversation it was handling
    hops = [(m.message.sender_id, m.agent_id, str(m.message.intent)) for m in timeline if m.message]
    assert hops == [("dash", "agent.cso", "request_strategy"), ("agent.cso", "agent.cto", "estimate")]
    assert [m.outcome for m in timeline] == ["replied", "replied"]
    assert timeline[0].sent_at <= timeline[1].sent_at <= (timeline[1].finished_at or 0)
    assert summary.conversation_id == "conv-1" and summary.messages == 2
    assert summary.agents == ["dash", "agent.cso", "agent.cto"] and summary.first_intent == "request_strategy"


def test_hops_sent_within_one_millisecond_are_ordered_by_cause() -> None:
    def hop(sender: str, recipient: str, entry_id: str, record_id: str) -> RecordedMessage:
        body = AgentMessage(sender_id=sender, recipient_id=recipient, intent="ask").model_dump_json().encode()
        return RecordedMessage(recipient, record_id, entry_id, "c", "replied", body)

    asked = hop("dash", "agent.cso", "1700000000000-5", "1700000000009-0")  # finished last
    nested = hop("agent.cso", "agent.cto", "1700000000000-0", "1700000000004-0")  # same ms, lower sequence
    later = hop("agent.cso", "agent.cfo", "1700000000001-0", "1700000000005-0")
    assert in_send_order([later, nested, asked]) == [asked, nested, later]


async def test_one_way_failed_and_dead_lettered_messages_are_recorded_with_why(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, claim_idle=0.05, max_deliveries=2, message_timeout=10, record=True)
    async with strategist(settings), MessageSender(settings=settings, sender_id="dash") as sender:
        await sender.send_message("agent.cso", "inform", {"note": "fyi"})
        assert (await sender.request("agent.cso", "run_checks", {})).success
        failed = await sender.request("agent.cso", "request_review", {})
        await sender.send_message("agent.cso", "request_review", {})  # one way: refused, dead-lettered
        await wait_for_dead_letters(raw, "agent.cso", 1)
        found = await wait_recorded(sender.broker, "agent.cso", 4)
    assert not failed.success
    by_intent = {str(m.message.intent) + ("/" + m.outcome): m for m in found if m.message}
    assert set(by_intent) == {
        "inform/handled", "run_checks/replied", "request_review/failed", "request_review/dead_lettered"
    }  # fmt: skip
    dead = by_intent["request_review/dead_lettered"]
    assert dead.reason == "rejected: no_reviews: reviews are closed" and dead.dead_letter_id and dead.deliveries == 1
    assert [r.state for r in dead.receipts] == ["sent", "delivered", "dead_lettered"]


async def test_an_expired_request_is_recorded_as_expired(settings: Settings) -> None:
    async with MessageSender(settings=settings, sender_id="dash") as sender:
        async with engineer(settings) as cto:
            await cto.shutdown()  # registered, not reading: the request waits past its timeout
        with pytest.raises(RequestTimeoutError):
            await sender.request("agent.cto", "estimate", {}, timeout=0.2)
        async with engineer(settings):
            [expired] = await wait_recorded(sender.broker, "agent.cto", 1)
    assert expired.outcome == "expired" and expired.reason == "expired: not handled within response_timeout"
    assert [r.state for r in expired.receipts] == ["sent", "delivered", "expired"]


async def test_receipts_follow_a_message_from_the_inbox_to_its_end(settings: Settings) -> None:
    async with MessageSender(settings=settings, sender_id="dash") as sender:
        async with engineer(settings) as cto:
            await cto.shutdown()  # registered, not reading: the message waits
        sent = await sender.send_message("agent.cto", "estimate", {"feature": "sso"})
        [waiting] = await sender.broker.record.receipts(sent.message_id, agent_id="agent.cto")
        assert waiting.outcome == "sent" and [r.state for r in waiting.receipts] == ["sent"]
        async with engineer(settings) as cto:
            cto.gate.clear()
            await cto.entered.wait()
            [delivered] = await sender.broker.record.receipts(sent.message_id, agent_id="agent.cto")
            assert delivered.outcome == "delivered" and [r.state for r in delivered.receipts] == ["sent", "delivered"]
            cto.gate.set()
            await wait_recorded(sender.broker, "agent.cto", 1)
        [done] = await sender.broker.record.receipts(sent.message_id, agent_id="agent.cto")
        assert done.outcome == "handled" and done.entry_id == sent.entry_id
        # found without the recipient too (every record searched)
        assert [m.record_id for m in await sender.broker.record.receipts(sent.message_id)] == [done.record_id]


async def test_a_redriven_message_has_both_records(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, claim_idle=0.05, max_deliveries=1, record=True)

    class Flaky(BaseAgent):
        broken = True

        async def handle_inform(self, message: AgentMessage) -> None:
            if Flaky.broken:
                raise RuntimeError("down")

    config = create_agent_config("agent.flaky", "flaky", "ops", "ops", ["x"])
    async with Flaky(config, settings=settings) as agent:
        sent = await agent.sender.send_message("agent.flaky", "inform", {"n": 1})
        [letter] = await wait_for_dead_letters(raw, "agent.flaky", 1)
        assert letter[b"reason"].startswith(b"handler failed 1 times")
        [dead] = await agent.broker.dead_letters("agent.flaky")
        entry_id = dead.entry_id
        Flaky.broken = False
        await agent.broker.redrive_dead_letter("agent.flaky", entry_id)
        await wait_recorded(agent.broker, "agent.flaky", 2)
        history = await agent.broker.record.receipts(sent.message_id, agent_id="agent.flaky")
    assert [m.outcome for m in history] == ["dead_lettered", "handled"]
    assert history[0].dead_letter_id == entry_id and history[0].entry_id != history[1].entry_id


async def test_the_record_is_in_redis_for_every_reader(settings: Settings) -> None:
    async with strategist(settings), MessageSender(settings=settings, sender_id="dash") as sender:
        await sender.send_message("agent.cso", "inform", {"n": 1}, conversation_id="kept")
        await wait_recorded(sender.broker, "agent.cso", 1)
    async with MessageBroker(settings=settings) as another:  # a dashboard started later, or a second one
        [found] = await another.record.messages("agent.cso")
        assert found.conversation_id == "kept" and await another.record.agents() == [
            "@cso",
            "@~planning",
            "agent.cso",
        ]  # its role's and its capability's addresses too
        assert [m.record_id for m in await another.record.conversation("kept")] == [found.record_id]


async def test_retention_by_size_and_age(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, record=True, record_max_entries=50, record_max_age=2.0)
    async with strategist(settings), MessageSender(settings=settings, sender_id="dash") as sender:
        for n in range(300):
            sent = await sender.send_message("agent.cso", "inform", {"n": n}, conversation_id=f"c{n}")
        await wait_finished(sender.broker, raw, "agent.cso", sent.message_id)
        length = await raw.xlen(keys.record("agent.cso"))
        assert 50 <= length <= 150  # trimmed as it grows (Redis trims whole nodes of 100 entries)
        found = await sender.broker.record.messages("agent.cso")
        assert found[0].message is not None and found[0].message.payload.data == {"n": 299}
        ttl = await raw.pttl(keys.record("agent.cso"))
        assert 0 < ttl <= 2000  # an agent gone for longer than the age loses its record entirely
        await server_time_passes(raw, 2.1)  # the scenario: the record's age limit passes
        await sender.send_message("agent.cso", "inform", {"n": "new"}, conversation_id="new")
        async with asyncio.timeout(20):
            while (await raw.xlen(keys.record("agent.cso"))) != 1:
                await sender.send_message("agent.cso", "inform", {"n": "again"}, conversation_id="new")
                await asyncio.sleep(0.05)
        [left] = await sender.broker.record.messages("agent.cso")
        assert left.conversation_id == "new"


async def test_with_the_record_off_nothing_is_kept(redis_url: str, raw: Redis) -> None:
    settings = Settings(redis_url=redis_url, record=False)
    async with strategist(settings), MessageSender(settings=settings, sender_id="dash") as sender:
        await sender.request("agent.cso", "request_review", {})
        assert await sender.broker.record.messages() == []
    assert [k async for k in raw.scan_iter("ac:*record*")] == []


async def test_a_repeated_ack_records_nothing_twice(broker: MessageBroker, raw: Redis, agent_id: str) -> None:
    inbox, body = keys.inbox(agent_id), b'{"conversation_id":"c"}'
    await raw.xgroup_create(inbox, keys.GROUP, "0", mkstream=True)

    async def ack(*entries: bytes) -> list[int]:
        args: list[bytes | str | int] = [keys.GROUP, "", 100, 0, 60000]
        for entry in entries:
            args += [entry, "c", 1, body, b""]
        result: list[int] = await broker.pipeliner.script(ACK, [inbox, keys.record(agent_id)], args, replay=True)
        return result

    first, second = [cast(bytes, await raw.xadd(inbox, {"m": body})) for _ in range(2)]
    await raw.xreadgroup(keys.GROUP, "c1", {inbox: ">"})
    assert await ack(first, second) == [2, 0]
    assert await ack(first, second) == [0, 0]  # as after a lost connection: the call is written again
    assert await raw.xlen(keys.record(agent_id)) == 2 and await raw.xlen(inbox) == 0
    third = cast(bytes, await raw.xadd(inbox, {"m": body}))
    await raw.xreadgroup(keys.GROUP, "c1", {inbox: ">"})
    assert await ack(third, first) == [1, 0]  # one acknowledged here, one long gone: only the first is recorded
    recorded = read_reply([[keys.record(agent_id), await raw.xrange(keys.record(agent_id))]])[0][1]
    assert [fields[b"i"] for _, fields in recorded] == [first, second, third]


async def test_out_of_memory_does_not_stop_acknowledgements(settings: Settings, raw: Redis) -> None:
    release, entered = asyncio.Event(), asyncio.Queue[int]()

    class Waiting(BaseAgent):
        async def handle_inform(self, message: AgentMessage) -> None:
            entered.put_nowait(message.payload.data["n"])
            await release.wait()

    config = create_agent_config("agent.wait", "wait", "ops", "ops", ["x"])
    async with Waiting(config, settings=settings) as agent:
        for n in range(3):
            await agent.sender.send_message("agent.wait", "inform", {"n": n})
        assert sorted([await entered.get() for _ in range(3)]) == [0, 1, 2]  # all three in hand
        inbox = keys.inbox("agent.wait")
        async with keyspace_events(raw, inbox) as events:
            await raw.config_set("maxmemory", "1")
            try:
                release.set()
                async with asyncio.timeout(20):
                    while await raw.xlen(inbox) > 0:  # acknowledged (and deleted) all the same
                        await events.get()
            finally:
                await raw.config_set("maxmemory", "0")
    # the ACK script wrote (XACK) before it recorded, and Redis lets a script that wrote finish: recorded too
    assert await raw.xlen(keys.record("agent.wait")) == 3


async def test_a_record_key_of_the_wrong_type_skips_the_record_not_the_acknowledgement(
    settings: Settings, raw: Redis
) -> None:
    await raw.set(keys.record("agent.cso"), "not a stream")  # someone else's key where the record goes
    async with strategist(settings) as cso, MessageSender(settings=settings, sender_id="dash") as sender:
        for _ in range(2):
            assert not (await sender.request("agent.cso", "request_review", {})).success  # answered (an error)
        subscription = cso.subscription
        assert subscription is not None
        # and the readers take it for an empty record
        assert await sender.broker.record.messages() == [] and await sender.broker.record.conversations() == []
    # the agent stopped: its acknowledgements were answered
    assert subscription.stats.handled == 2 and subscription.stats.unrecorded == 2
    assert await raw.xlen(keys.inbox("agent.cso")) == 0 and await raw.get(keys.record("agent.cso")) == b"not a stream"
