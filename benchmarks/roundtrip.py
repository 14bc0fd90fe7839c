"""Request/reply round trip: agentcomms against a minimal hand-written redis-py Streams program.

Both run on the same redis-server (started here on a loopback port), each with its
responder in its own process; runs are interleaved and repeated, and the medians are
reported with their ratio. Usage:

    python benchmarks/roundtrip.py [--sequential 2000] [--concurrent 5000] [--in-flight 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from agentcomms import AgentMessage, EmbeddedRedis, MessageBroker, MessageIntent, MessagePayload, Settings

# -- the floor: what a user could write by hand ------------------------------------------


async def serve_floor(url: str, stream: str) -> None:
    """XREADGROUP requests; for each, XADD the reply and XACK, in one pipeline per batch."""
    redis = Redis.from_url(url)
    try:
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    except Exception:
        pass
    print("READY", flush=True)
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


class FloorClient:
    """XADD a request, wait for its reply on a private stream read by one XREAD loop."""

    def __init__(self, url: str, stream: str) -> None:
        self.redis = Redis.from_url(url)
        self.reader = Redis.from_url(url)
        self.stream = stream
        self.replies = f"floor:replies:{uuid.uuid4().hex}"
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        last = "0-0"
        while True:
            response: Any = await self.reader.xread({self.replies: last}, count=1000, block=1000)
            for _, entries in response or ():
                for entry_id, fields in entries:
                    last = entry_id
                    future = self.waiting.pop(fields[b"id"], None)
                    if future is not None:
                        future.set_result(fields[b"body"])

    async def request(self, body: bytes) -> bytes:
        request_id = uuid.uuid4().hex.encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        await self.redis.xadd(self.stream, {"id": request_id, "reply_to": self.replies, "body": body})
        return await future

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        await self.redis.aclose()
        await self.reader.aclose()


# -- ours --------------------------------------------------------------------------------


async def serve_ours(url: str, agent_id: str) -> None:
    async def echo(message: AgentMessage) -> Any:
        return message.payload.data

    async with MessageBroker(settings=Settings(redis_url=url, event_feed=False)) as broker:
        await broker.subscribe_to_agent(agent_id, echo, concurrency=200)
        print("READY", flush=True)
        await asyncio.Event().wait()


# -- measurement -------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "READY":
        raise RuntimeError(f"responder {args} did not start")
    return process


async def sequential(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def concurrent(call: Callable[[], Awaitable[object]], count: int, in_flight: int) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return count / (time.perf_counter() - started)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace, url: str) -> dict[str, dict[str, list[float]]]:
    stream = f"floor:{uuid.uuid4().hex[:8]}"
    agent_id = f"agent.bench.{uuid.uuid4().hex[:8]}"
    responders = [spawn("serve-floor", url, stream), spawn("serve-ours", url, agent_id)]
    floor = FloorClient(url, stream)
    await floor.start()
    body = b'{"query": "Q4 pipeline?"}'
    results: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "p99": [], "rps": []} for name in ("floor", "agentcomms")
    }
    async with MessageBroker(settings=Settings(redis_url=url, event_feed=False)) as broker:

        def ours() -> Awaitable[object]:
            return broker.request(
                AgentMessage(
                    sender_id="bench.caller",
                    recipient_id=agent_id,
                    intent=MessageIntent.REQUEST_KNOWLEDGE,
                    payload=MessagePayload(data={"query": "Q4 pipeline?"}),
                )
            )

        def hand_written() -> Awaitable[object]:
            return floor.request(body)

        calls = {"floor": hand_written, "agentcomms": ours}
        for call in calls.values():  # warm up both
            await sequential(call, 200)
        for repeat in range(args.repeats):
            for name, call in calls.items() if repeat % 2 == 0 else reversed(calls.items()):
                samples = await sequential(call, args.sequential)
                results[name]["p50"].append(percentile(samples, 0.5))
                results[name]["p99"].append(percentile(samples, 0.99))
                results[name]["rps"].append(await concurrent(call, args.concurrent, args.in_flight))
    await floor.close()
    for process in responders:
        process.kill()
        process.wait()
    return results


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(results[name][key])

    def spread(name: str, key: str) -> str:
        values = results[name][key]
        return f"{min(values):,.0f}-{max(values):,.0f}"

    print(f"\nrequest/reply, {args.repeats} repeats (median, min-max); {args.in_flight} in flight for req/s")
    print(f"{'':12} {'p50 µs':>10} {'p99 µs':>10} {'req/s':>10}   spread p50 / req/s")
    for name in ("floor", "agentcomms"):
        print(
            f"{name:12} {med(name, 'p50'):>10,.0f} {med(name, 'p99'):>10,.0f} {med(name, 'rps'):>10,.0f}"
            f"   {spread(name, 'p50')} / {spread(name, 'rps')}"
        )
    print(
        f"ratio agentcomms/floor: p50 {med('agentcomms', 'p50') / med('floor', 'p50'):.2f}x, "
        f"req/s {med('agentcomms', 'rps') / med('floor', 'rps'):.2f}x"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("serve-floor", "serve-ours"):
        serve = serve_floor if sys.argv[1] == "serve-floor" else serve_ours
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis(folder, transport="tcp") as server:
        print(f"redis-server on {server.url}, python {sys.version.split()[0]}, pid {os.getpid()}")
        report(asyncio.run(measure(args, server.url)), args)


if __name__ == "__main__":
    main()
