"""The far side of every benchmark, each run as its own process: ``python servers.py KIND URL NAME [COUNT]``.

Kinds:
  floor-rr        a minimal hand-written redis-py responder: XREADGROUP, then XADD reply + XACK in one pipeline
  ours-rr         an agentcomms agent answering every request (default settings: validation, dedup, event feed)
  faststream-rr   a FastStream RedisBroker stream subscriber returning the request (FastStream's request())
  pubsub-rr       a Pub/Sub responder: SUBSCRIBE, PUBLISH the reply (no persistence: the lossy reference)
  floor-sink      XREADGROUP COUNT 500 + XACK batches, until COUNT messages are acknowledged
  ours-sink       an agentcomms subscription, until COUNT messages are handled and acknowledged
  ours-role       an agent of the role "worker" (registered, reading the role's inbox: role routing) answering
                  every request after COUNT ms (the work a handler waits for: an LLM, a database)

Each prints READY when it is listening, and the sinks print DONE once COUNT messages were acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentcomms import AgentMessage, AgentRegistry, MessageBroker, Settings, keys


def ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


async def floor_client(url: str, stream: str) -> Redis:
    """A plain client, with the floor's consumer group on ``stream`` (made at 0 if it does not exist)."""
    redis = Redis.from_url(url)
    with contextlib.suppress(ResponseError):  # BUSYGROUP: made by an earlier run
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    return redis


async def floor_rr(url: str, stream: str, _: int) -> None:
    redis = await floor_client(url, stream)
    ready()
    while True:
        response: Any = await redis.xreadgroup("g", "c", {stream: ">"}, count=100, block=1000)
        if not response:
            continue
        pipe = redis.pipeline(transaction=False)
        for _, entries in response:
            for entry_id, fields in entries:
                pipe.xadd(fields[b"reply_to"], {"id": fields[b"id"], "body": fields[b"body"]})
                pipe.xack(stream, "g", entry_id)
        await pipe.execute()


async def ours_rr(url: str, agent_id: str, _: int) -> None:
    async def echo(message: AgentMessage) -> Any:
        return message.payload.data

    async with MessageBroker(settings=Settings(redis_url=url), client_name=f"bench{os.getpid()}") as broker:
        await broker.subscribe_to_agent(agent_id, echo, concurrency=200)
        ready()
        await asyncio.Event().wait()


async def faststream_rr(url: str, stream: str, _: int) -> None:
    from faststream.redis import RedisBroker, StreamSub

    # typed as Any: mypy must pass with and without the [bench] extra installed
    make_broker: Any = RedisBroker
    broker: Any = make_broker(url, logger=None)  # None: no per-message logs

    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    broker.subscriber(stream=StreamSub(stream, group="g", consumer=f"c{os.getpid()}"))(echo)
    await broker.start()
    ready()
    await asyncio.Event().wait()


async def pubsub_rr(url: str, channel: str, _: int) -> None:
    redis = Redis.from_url(url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    ready()
    async for message in pubsub.listen():
        if message["type"] == "message":
            request = json.loads(message["data"])
            await redis.publish(request["reply_to"], json.dumps({"id": request["id"], "body": request["body"]}))


async def floor_sink(url: str, stream: str, count: int) -> None:
    redis = await floor_client(url, stream)
    ready()
    acked = 0
    while acked < count:
        response: Any = await redis.xreadgroup("g", "c", {stream: ">"}, count=500, block=1000)
        for _, entries in response or ():
            await redis.xack(stream, "g", *[entry_id for entry_id, _ in entries])
            acked += len(entries)
    sys.stdout.write("DONE\n")
    sys.stdout.flush()


async def ours_sink(url: str, agent_id: str, count: int) -> None:
    taken = 0
    all_taken = asyncio.Event()

    async def take(message: AgentMessage) -> None:
        nonlocal taken
        taken += 1
        if taken >= count:
            all_taken.set()

    async with MessageBroker(settings=Settings(redis_url=url), client_name=f"sink{os.getpid()}") as broker:
        subscription = await broker.subscribe_to_agent(agent_id, take, concurrency=500)
        ready()
        await all_taken.wait()  # no polling while messages flow (the floor's sink does not poll either)
        while subscription.stats.handled < count:  # handled counts acknowledged messages: the last acks
            await asyncio.sleep(0.001)
    sys.stdout.write("DONE\n")
    sys.stdout.flush()


async def faststream_caller(url: str, stream: str, _: int) -> None:
    """FastStream's client side, in its own process so its event loop shares nothing with ours.

    Reads commands on stdin: ``seq N`` (N sequential requests: prints p50, p99 in µs and CPU µs
    per request as JSON) and ``flight N W`` (N requests, W in flight: prints req/s).
    """
    import time

    from faststream.redis import RedisBroker

    make_broker: Any = RedisBroker  # Any: mypy must pass with and without the [bench] extra installed
    broker: Any = make_broker(url, logger=None, max_connections=1000)  # each request() holds a connection
    await broker.connect()
    body = {"query": "What's our current sales pipeline and Q4 forecast?", "context": "dashboard"}

    async def call() -> None:
        await broker.request(body, stream=stream, timeout=30)

    ready()
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).split():
        if line[0] == "seq":
            samples, cpu = [], time.process_time()
            for _ in range(int(line[1])):
                started = time.perf_counter()
                await call()
                samples.append((time.perf_counter() - started) * 1e6)
            samples.sort()
            result: Any = {
                "p50": samples[len(samples) // 2],
                "p99": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
                "cpu": (time.process_time() - cpu) / len(samples) * 1e6,
            }
        else:
            count, width = int(line[1]), int(line[2])
            remaining, started = count, time.perf_counter()

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await call()

            await asyncio.gather(*(worker() for _ in range(width)))
            result = count / (time.perf_counter() - started)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    await broker.stop()


async def ours_role(url: str, agent_id: str, delay_ms: int) -> None:
    async def work(message: AgentMessage) -> Any:
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        return message.payload.data

    async with MessageBroker(settings=Settings(redis_url=url), client_name=f"bench{os.getpid()}") as broker:
        info = {"agent_id": agent_id, "user_name": "w", "role": "worker", "department": "ops"}
        presence = await AgentRegistry(broker).keep_alive(info, heartbeat_interval=5)
        await broker.subscribe_to_agent(agent_id, work, addresses=[keys.role_address("worker")])
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            await presence.stop()


SERVERS = {
    "ours-role": ours_role,
    "faststream-caller": faststream_caller,
    "floor-rr": floor_rr,
    "ours-rr": ours_rr,
    "faststream-rr": faststream_rr,
    "pubsub-rr": pubsub_rr,
    "floor-sink": floor_sink,
    "ours-sink": ours_sink,
}


def main() -> None:
    kind, url, name = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    if os.environ.get("BENCH_UVLOOP"):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(SERVERS[kind](url, name, count))


if __name__ == "__main__":
    main()
