"""The benchmark suite: agentcomms against the hand-written floor and its peers, in one run.

    python benchmarks/suite.py [--quick] [--repeats 5] [--uvloop] [--write-docs]

Starts its own redis-server on a loopback port. Every figure is measured in the same run
as its reference, runs are interleaved (the order alternates every repeat), and each
figure is the median over the repeats with its spread (min-max). Prints a table with the
ratios and the goals, writes benchmarks/results/latest.json, and with --write-docs
replaces the results section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import agentcomms
from agentcomms import (
    AgentMessage,
    AgentRegistry,
    EmbeddedRedis,
    MessageBroker,
    MessagePayload,
    MessageSender,
    Settings,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import discovery  # noqa: E402 - a sibling module of this script

from agentcomms.security import create_admin, enrol_team  # noqa: E402

console = Console()
Samples = dict[str, list[float]]
SPAWNED: list[subprocess.Popen[str]] = []
BODY = {"query": "What's our current sales pipeline and Q4 forecast?", "context": "dashboard"}
SECURE_AGENT = "agent.bench.secure"
"""The responder of the security-on round trip."""
RECORD_AGENT = "agent.bench.record"
"""The responder of the round trip with the record on (``AGENTCOMMS_RECORD=true``)."""
RECORD_ON = {"AGENTCOMMS_RECORD": "true"}

LATENCY_BLOCK = 100
"""Sequential requests per client before the next client's turn (see Suite.latencies)."""


# -- processes and measurements ------------------------------------------------------------


@contextmanager
def server(
    kind: str, url: str, name: str, count: int = 0, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "servers.py"), kind, url, name, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    assert process.stdout is not None
    SPAWNED.append(process)
    try:
        if process.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{kind} did not start")
        yield process
    finally:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sequential(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def in_flight(call: Callable[[], Awaitable[object]], count: int, width: int) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return count / (time.perf_counter() - started)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the clients ---------------------------------------------------------------------------


class FloorClient:
    """Minimal hand-written round trip: XADD the request, XREAD the private reply stream."""

    def __init__(self, url: str, stream: str) -> None:
        # one pooled connection per request in flight: how a plain redis-py program runs them
        self.redis, self.reader, self.stream = Redis.from_url(url, max_connections=1000), Redis.from_url(url), stream
        self.replies = f"floor:replies:{uuid.uuid4().hex}"
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.task: asyncio.Task[None] | None = None
        self.body = json.dumps(BODY)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        last: Any = "0-0"
        while True:
            response: Any = await self.reader.xread({self.replies: last}, count=1000, block=1000)
            for _, entries in response or ():
                for entry_id, fields in entries:
                    last = entry_id
                    future = self.waiting.pop(fields[b"id"], None)
                    if future is not None:
                        future.set_result(fields[b"body"])

    async def request(self) -> bytes:
        request_id = uuid.uuid4().hex.encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        await self.redis.xadd(self.stream, {"id": request_id, "reply_to": self.replies, "body": self.body})
        return await future

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        await self.redis.aclose()
        await self.reader.aclose()


class PubSubClient:
    """The same round trip over Pub/Sub (lossy: nothing is kept for a disconnected responder)."""

    def __init__(self, url: str, channel: str) -> None:
        self.redis, self.channel = Redis.from_url(url, max_connections=1000), channel
        self.replies = f"pubsub:replies:{uuid.uuid4().hex}"
        self.pubsub = self.redis.pubsub()
        self.waiting: dict[str, asyncio.Future[str]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.subscribe(self.replies)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message":
                reply = json.loads(message["data"])
                future = self.waiting.pop(reply["id"], None)
                if future is not None:
                    future.set_result(reply["body"])

    async def request(self) -> str:
        request_id = uuid.uuid4().hex
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        await self.redis.publish(self.channel, json.dumps({"id": request_id, "reply_to": self.replies, "body": BODY}))
        return await future

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()


def ours_request(broker: MessageBroker, agent_id: str) -> Callable[[], Awaitable[object]]:
    def call() -> Awaitable[object]:
        message = AgentMessage(
            sender_id="bench.caller",
            recipient_id=agent_id,
            intent="request_knowledge",
            payload=MessagePayload(data=BODY),
        )
        return broker.request(message)

    return call


# -- the benchmarks ------------------------------------------------------------------------


class Suite:
    def __init__(self, url: str, args: argparse.Namespace, progress: Progress) -> None:
        self.url, self.args, self.progress = url, args, progress
        self.results: dict[str, Any] = {}
        self.sync = redis.Redis.from_url(url)

    def net_bytes(self) -> int:
        stats = self.sync.info("stats")
        return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])

    async def secure_identities(self, folder: Path) -> dict[str, str]:
        """An admin, the caller and the secure responder, enrolled; the environment of a secure process."""
        admin = create_admin(folder, "bench.admin")
        async with MessageBroker(settings=Settings(redis_url=self.url), client_name="bench") as broker:
            await enrol_team(broker.pipeliner, folder, admin, [("bench.caller", ["bench"]), (SECURE_AGENT, ["bench"])])
        return {
            "AGENTCOMMS_SECURITY": "on",
            "AGENTCOMMS_IDENTITY_DIR": str(folder),
            "AGENTCOMMS_TRUST_ANCHORS": (folder / "trust_anchors").read_text().strip(),
        }

    async def roundtrip(self) -> None:
        a = self.args
        names = ["floor", "agentcomms", "record", "secure", "faststream", "pubsub"]
        keys_ = ["p50", "p99", "rps", "cpu_client", "cpu_server", "bytes"]
        samples: dict[str, Samples] = {n: {k: [] for k in keys_} for n in names}
        stream, agent_id, fs_stream, channel = "bench:floor", "agent.bench.rr", "bench:faststream", "bench:pubsub"
        folder = Path(tempfile.mkdtemp(prefix="agentcomms-bench-ids-"))
        secure_env = await self.secure_identities(folder)
        secure_settings = Settings(
            redis_url=self.url, security="on", identity_dir=folder,
            trust_anchors=secure_env["AGENTCOMMS_TRUST_ANCHORS"].split(),
        )  # fmt: skip
        with (
            server("floor-rr", self.url, stream) as floor_proc,
            server("ours-rr", self.url, agent_id) as ours_proc,
            server("ours-rr", self.url, RECORD_AGENT, env=RECORD_ON) as record_proc,
            server("ours-rr", self.url, SECURE_AGENT, env=secure_env) as secure_proc,
            server("faststream-rr", self.url, fs_stream) as fs_proc,
            server("faststream-caller", self.url, fs_stream) as fs_caller,
            server("pubsub-rr", self.url, channel) as pubsub_proc,
        ):
            floor, pubsub = FloorClient(self.url, stream), PubSubClient(self.url, channel)
            await floor.start()
            await pubsub.start()

            def ask_caller(command: str) -> Any:
                assert fs_caller.stdin is not None and fs_caller.stdout is not None
                fs_caller.stdin.write(command + "\n")
                fs_caller.stdin.flush()
                return json.loads(fs_caller.stdout.readline())

            async with (
                MessageBroker(settings=Settings(redis_url=self.url), client_name="bench") as broker,
                MessageBroker(settings=secure_settings, client_name="bench.caller") as secure,
            ):
                calls = {
                    "floor": floor.request,
                    "agentcomms": ours_request(broker, agent_id),
                    "record": ours_request(broker, RECORD_AGENT),
                    "secure": ours_request(secure, SECURE_AGENT),
                    "pubsub": pubsub.request,
                }
                pids = {
                    "floor": floor_proc.pid,
                    "agentcomms": ours_proc.pid,
                    "record": record_proc.pid,
                    "secure": secure_proc.pid,
                    "faststream": fs_proc.pid,
                    "pubsub": pubsub_proc.pid,
                }
                for call in calls.values():
                    await sequential(call, 50)  # warm up
                await asyncio.to_thread(ask_caller, "seq 50")
                task = self.progress.add_task("round trip", total=a.repeats * len(names))
                for repeat in range(a.repeats):
                    order = names if repeat % 2 == 0 else list(reversed(names))
                    await self.latencies(a, order, calls, pids, samples)
                    s = samples["faststream"]  # its client runs in its own process: one block
                    cpu, wire = cpu_seconds(pids["faststream"]), self.net_bytes()
                    result = await asyncio.to_thread(ask_caller, f"seq {a.sequential}")
                    s["p50"].append(result["p50"])
                    s["p99"].append(result["p99"])
                    s["cpu_client"].append(result["cpu"])
                    s["cpu_server"].append((cpu_seconds(pids["faststream"]) - cpu) / a.sequential * 1e6)
                    s["bytes"].append((self.net_bytes() - wire) / a.sequential)
                    for name in order:
                        if name == "faststream":
                            count = max(a.concurrent // 5, 100)
                            rps = await asyncio.to_thread(ask_caller, f"flight {count} {a.in_flight}")
                        else:
                            rps = await in_flight(calls[name], a.concurrent, a.in_flight)
                        samples[name]["rps"].append(rps)
                        self.progress.advance(task)
            await floor.close()
            await pubsub.close()
        shutil.rmtree(folder, ignore_errors=True)
        self.results["roundtrip"] = samples

    async def latencies(
        self,
        a: argparse.Namespace,
        order: list[str],
        calls: dict[str, Callable[[], Awaitable[object]]],
        pids: dict[str, int],
        samples: dict[str, Samples],
    ) -> None:
        """Sequential round trips of the in-process clients, alternating in blocks of LATENCY_BLOCK.

        A slow spell of the machine (another process, an AOF rewrite) then hits every
        client alike instead of whichever happened to run in it.
        """
        local = [name for name in order if name in calls]
        seen: dict[str, list[float]] = {name: [] for name in local}
        spent: dict[str, list[float]] = {name: [0.0, 0.0] for name in local}  # client s, server s
        paired: list[float] = []  # per block: agentcomms p50 / floor p50, measured back to back
        paired_secure: list[float] = []  # per block: security on p50 / security off p50
        paired_record: list[float] = []  # per block: record on p50 / record off p50
        for index, start in enumerate(range(0, a.sequential, LATENCY_BLOCK)):
            size = min(LATENCY_BLOCK, a.sequential - start)
            block: dict[str, list[float]] = {}
            for name in local if index % 2 == 0 else list(reversed(local)):
                cpu, server_cpu = time.process_time(), cpu_seconds(pids[name])
                block[name] = await sequential(calls[name], size)
                seen[name] += block[name]
                spent[name][0] += time.process_time() - cpu
                spent[name][1] += cpu_seconds(pids[name]) - server_cpu
            paired.append(percentile(block["agentcomms"], 0.5) / percentile(block["floor"], 0.5))
            if "secure" in block:
                paired_secure.append(percentile(block["secure"], 0.5) / percentile(block["agentcomms"], 0.5))
            if "record" in block:
                paired_record.append(percentile(block["record"], 0.5) / percentile(block["agentcomms"], 0.5))
        samples["agentcomms"].setdefault("paired", []).append(statistics.median(paired))
        if paired_secure:
            samples["secure"].setdefault("paired", []).append(statistics.median(paired_secure))
        if paired_record:
            samples["record"].setdefault("paired", []).append(statistics.median(paired_record))
        for name in local:
            s = samples[name]
            s["p50"].append(percentile(seen[name], 0.5))
            s["p99"].append(percentile(seen[name], 0.99))
            s["cpu_client"].append(spent[name][0] / a.sequential * 1e6)
            s["cpu_server"].append(spent[name][1] / a.sequential * 1e6)
            wire = self.net_bytes()  # bytes per request: counted apart, so that the counting is not timed
            await sequential(calls[name], a.sequential // 2)
            s["bytes"].append((self.net_bytes() - wire) / (a.sequential // 2))

    async def oneway(self) -> None:
        a = self.args
        samples: Samples = {"floor": [], "agentcomms": [], "record": []}
        message = AgentMessage(
            sender_id="bench.sender",
            recipient_id="agent.bench.sink",
            intent="share_insights",
            payload=MessagePayload(data=BODY),
        )
        payload = message.payload
        task = self.progress.add_task("one-way", total=a.repeats * 3)
        async with MessageBroker(settings=Settings(redis_url=self.url), client_name="bench") as broker:
            client = Redis.from_url(self.url)
            for repeat in range(a.repeats):
                for name in ["floor", "agentcomms", "record"] if repeat % 2 == 0 else ["record", "agentcomms", "floor"]:
                    target = f"{name}-{repeat}-{uuid.uuid4().hex[:6]}"
                    if name == "floor":
                        stream = f"bench:sink:{target}"
                        body = message.model_dump_json()
                        with server("floor-sink", self.url, stream, a.messages) as sink:
                            started = time.perf_counter()
                            for start in range(0, a.messages, 500):
                                pipe = client.pipeline(transaction=False)
                                for _ in range(min(500, a.messages - start)):
                                    pipe.xadd(stream, {"m": body})
                                await pipe.execute()
                            await asyncio.to_thread(sink.stdout.readline)  # type: ignore[union-attr]
                    else:
                        agent_id = f"agent.sink.{target}"
                        # the messages are ready before the clock starts, as the floor's body is; encoding
                        # them is timed (the floor sends a body it encoded once)
                        batches = [
                            [
                                AgentMessage(
                                    sender_id="bench.sender",
                                    recipient_id=agent_id,
                                    intent="share_insights",
                                    payload=payload,
                                )
                                for _ in range(min(500, a.messages - start))
                            ]
                            for start in range(0, a.messages, 500)
                        ]
                        env = RECORD_ON if name == "record" else None
                        with server("ours-sink", self.url, agent_id, a.messages, env=env) as sink:
                            started = time.perf_counter()
                            for batch in batches:
                                await broker.publish_many(batch)
                            await asyncio.to_thread(sink.stdout.readline)  # type: ignore[union-attr]
                    samples[name].append(a.messages / (time.perf_counter() - started))
                    # keep the data set small: Redis's AOF rewrites (a forked child) cost time in proportion to it
                    if name == "floor":
                        self.sync.delete(stream)
                    else:
                        self.sync.delete(
                            *agentcomms.keys.inboxes(agent_id), agentcomms.keys.dedup(agent_id),
                            agentcomms.keys.record(agent_id),
                        )  # fmt: skip
                    self.progress.advance(task)
            await client.aclose()
        self.results["oneway"] = samples

    async def fanout(self) -> None:
        a = self.args
        sizes = [100, a.fanout]
        samples: dict[int, Samples] = {n: {"ms": [], "round_trips": []} for n in sizes}
        task = self.progress.add_task("fan-out", total=a.repeats * len(sizes))
        async with MessageSender(sender_id="bench.exec", settings=Settings(redis_url=self.url)) as sender:
            registry = AgentRegistry(sender.broker)
            for size in sizes:
                await asyncio.gather(
                    *(
                        registry.register_agent(
                            {
                                "agent_id": f"agent.fan{size}.{n:05d}",
                                "user_name": "u",
                                "role": "member",
                                "department": f"dept{size}",
                            },
                            heartbeat_interval=3600,
                        )
                        for n in range(size)
                    )
                )
            for repeat in range(a.repeats):
                for size in sizes if repeat % 2 == 0 else list(reversed(sizes)):
                    before = sender.broker.stats.round_trips
                    started = time.perf_counter()
                    results = await sender.broadcast_message(
                        "agent_status", {"message": "all hands"}, department=f"dept{size}"
                    )
                    samples[size]["ms"].append((time.perf_counter() - started) * 1000)
                    samples[size]["round_trips"].append(sender.broker.stats.round_trips - before)
                    assert len(results) == size and not any(isinstance(r, Exception) for r in results.values())
                    self.progress.advance(task)
        self.results["fanout"] = samples

    async def discovery(self) -> None:
        a = self.args
        task = self.progress.add_task("discovery", total=1)
        ns = argparse.Namespace(small=100, large=a.discovery, queries=a.queries, repeats=a.repeats)
        self.results["discovery"] = await discovery.measure(self.url, ns, quiet=True)
        self.progress.advance(task)

    async def replicas(self) -> None:
        a = self.args
        counts = [1, 2, 4]
        samples: Samples = {str(n): [] for n in counts}
        agent_id = "agent.bench.replicas"
        task = self.progress.add_task("replicas", total=a.repeats * len(counts))
        async with MessageBroker(settings=Settings(redis_url=self.url), client_name="bench") as broker:
            call = ours_request(broker, agent_id)
            for repeat in range(a.repeats):
                for n in counts if repeat % 2 == 0 else list(reversed(counts)):
                    with contextlib_exit_stack() as stack:
                        for _ in range(n):
                            stack.enter_context(server("ours-rr", self.url, agent_id))
                        await sequential(call, 20)
                        samples[str(n)].append(await in_flight(call, a.concurrent, a.in_flight))
                    self.progress.advance(task)
        self.results["replicas"] = samples

    async def memory(self) -> None:
        a = self.args
        task = self.progress.add_task("memory", total=2)
        agent_id = "agent.bench.memory"
        message = AgentMessage(
            sender_id="bench.sender", recipient_id=agent_id, intent="share_insights", payload=MessagePayload(data=BODY)
        )
        async with MessageBroker(settings=Settings(redis_url=self.url), client_name="bench") as broker:
            for start in range(0, a.inbox, 500):
                await broker.publish_many(
                    [
                        message.model_copy(update={"message_id": str(uuid.uuid4())})
                        for _ in range(min(500, a.inbox - start))
                    ]
                )
        inbox = int(self.sync.memory_usage(agentcomms.keys.inbox(agent_id), samples=0) or 0)
        dedup = int(self.sync.memory_usage(agentcomms.keys.dedup(agent_id), samples=0) or 0)
        self.progress.advance(task)
        body = message.model_dump_json()
        pipe = self.sync.pipeline(transaction=False)
        for _ in range(a.inbox):
            pipe.xadd("bench:memory:floor", {"m": body})
        pipe.execute()
        floor = int(self.sync.memory_usage("bench:memory:floor", samples=0) or 0)
        self.progress.advance(task)
        self.results["memory"] = {
            "messages": a.inbox,
            "agentcomms_inbox_bytes": inbox / a.inbox,
            "agentcomms_dedup_bytes": dedup / a.inbox,
            "floor_stream_bytes": floor / a.inbox,
            "message_json_bytes": len(body),
            "agentcomms_json_bytes": len(message.model_dump_json(exclude_none=True)),
        }


@contextmanager
def contextlib_exit_stack() -> Iterator[Any]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield stack


# -- the report ----------------------------------------------------------------------------


def figure(values: list[float], fmt: str = ",.0f") -> str:
    return f"{med(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})" if values else "-"


def _variants(rt: dict[str, Any]) -> tuple[list[str], list[tuple[str, bool, str]]]:
    """The round trip's variants against agentcomms' default: the record on, security on."""
    lines: list[str] = []
    goals: list[tuple[str, bool, str]] = []
    if "record" in rt and rt["record"]["rps"]:
        record_rps = med(rt["record"]["rps"]) / med(rt["agentcomms"]["rps"])
        record_floor = med(rt["record"]["rps"]) / med(rt["floor"]["rps"])
        record_p50 = med(rt["record"]["p50"]) / med(rt["agentcomms"]["p50"])
        paired_record = rt["record"].get("paired", [])
        lines += [
            f"The record on (`record`: `AGENTCOMMS_RECORD=true`, every handled request kept with its reply): "
            f"req/s record/agentcomms **{record_rps:.2f}x**, record/floor **{record_floor:.2f}x**; p50 "
            f"record/agentcomms {record_p50:.2f}x (paired by block: {figure(paired_record, ',.2f')}).",
            "",
        ]
        goals += [
            ("record on: req/s >= 0.9x record off", record_rps >= 0.9, f"{record_rps:.2f}x"),
            ("record on: req/s >= 1.25x the floor", record_floor >= 1.25, f"{record_floor:.2f}x"),
        ]
    if "secure" in rt and rt["secure"]["p50"]:
        secure_p50 = med(rt["secure"]["p50"]) / med(rt["agentcomms"]["p50"])
        secure_rps = med(rt["secure"]["rps"]) / med(rt["floor"]["rps"])
        paired_secure = rt["secure"].get("paired", [])
        lines += [
            f"Security on (`secure`: every request and reply authenticated, HMAC-SHA256 with X25519-agreed keys): "
            f"p50 secure/agentcomms **{secure_p50:.2f}x** (paired by block: {figure(paired_secure, ',.2f')}); "
            f"req/s secure/floor **{secure_rps:.2f}x**.",
            "",
        ]
        goals += [
            ("security on: round-trip p50 <= 1.15x security off", secure_p50 <= 1.15, f"{secure_p50:.2f}x"),
            ("security on: req/s >= 1.25x the floor", secure_rps >= 1.25, f"{secure_rps:.2f}x"),
        ]
    return lines, goals


def report(results: dict[str, Any], meta: dict[str, str]) -> tuple[str, list[tuple[str, bool, str]]]:
    """The results as a Markdown table and the goals as (goal, met, figure)."""
    lines = [
        f"Run: {meta['when']}, {meta['machine']}; redis-server {meta['redis']}, redis-py {meta['redis_py']}, "
        f"Python {meta['python']}{', uvloop' if meta['uvloop'] == 'yes' else ''}; {meta['repeats']} repeats, median (min-max).",
        "",
    ]
    goals: list[tuple[str, bool, str]] = []
    rt = results.get("roundtrip")
    if rt:
        lines += [
            "### Request/reply round trip (two processes, one agent answering)",
            "",
            "| | p50 µs | p99 µs | req/s, 100 in flight | client CPU µs/req | responder CPU µs/req | bytes on the wire/req |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, s in rt.items():
            lines.append(
                f"| {name} | {figure(s['p50'])} | {figure(s['p99'])} | {figure(s['rps'])} | {figure(s['cpu_client'])} | {figure(s['cpu_server'])} | {figure(s['bytes'])} |"
            )
        p50 = med(rt["agentcomms"]["p50"]) / med(rt["floor"]["p50"])
        rps = med(rt["agentcomms"]["rps"]) / med(rt["floor"]["rps"])
        vs_fs = med(rt["agentcomms"]["rps"]) / med(rt["faststream"]["rps"])
        paired = rt["agentcomms"].get("paired", [])
        lines += [
            "",
            f"Ratios: p50 agentcomms/floor **{p50:.2f}x**; req/s agentcomms/floor **{rps:.2f}x**; req/s agentcomms/FastStream **{vs_fs:.1f}x**.",
            "",
            f"p50 agentcomms/floor paired by block (each 100-request block against the floor's block next to it; "
            f"median of the blocks, per repeat): {figure(paired, ',.2f')}.",
            "",
        ]
        goals += [
            ("round-trip p50 <= 1.0x the floor", p50 <= 1.0, f"{p50:.2f}x"),
            ("req/s with 100 in flight >= 1.25x the floor", rps >= 1.25, f"{rps:.2f}x"),
            (">= 5x FastStream's req/s", vs_fs >= 5, f"{vs_fs:.1f}x"),
        ]
        more_lines, more_goals = _variants(rt)
        lines += more_lines
        goals += more_goals
    ow = results.get("oneway")
    if ow:
        ratio = med(ow["agentcomms"]) / med(ow["floor"])
        lines += [
            "### One-way throughput (one sender, one agent; delivered and acknowledged)",
            "",
            "| | messages/s |",
            "|---|---|",
            f"| floor (batched XADD, XREADGROUP + XACK) | {figure(ow['floor'])} |",
            f"| agentcomms (publish_many, subscription) | {figure(ow['agentcomms'])} |",
            *([f"| agentcomms, record on | {figure(ow['record'])} |"] if ow.get("record") else []),
            "",
            f"Ratio agentcomms/floor: **{ratio:.2f}x**.",
            "",
        ]
        if ow.get("record"):
            lines += [
                f"With the record on, every message is stored a second time (with its times) when it is "
                f"acknowledged: record/agentcomms **{med(ow['record']) / med(ow['agentcomms']):.2f}x**.",
                "",
            ]
        goals.append(("one-way throughput >= 0.8x the batched floor", ratio >= 0.8, f"{ratio:.2f}x"))
    fo = results.get("fanout")
    if fo:
        lines += [
            "### Fan-out: a department broadcast",
            "",
            "| recipients | ms until all are in their inboxes | round trips |",
            "|---|---|---|",
        ]
        for size, s in fo.items():
            lines.append(f"| {size} | {figure(s['ms'], ',.1f')} | {figure(s['round_trips'])} |")
        trips = {max(s["round_trips"]) for s in fo.values()}
        lines.append("")
        goals.append(
            (
                "fan-out in a bounded, constant number of round trips",
                len(trips) == 1,
                f"{trips.pop() if len(trips) == 1 else trips} at every size",
            )
        )
    dv = results.get("discovery")
    if dv:
        lines += ["### Discovery", "", "| query | agents | answer | p50 µs | p99 µs |", "|---|---|---|---|---|"]
        for row in dv["rows"]:
            lines.append(
                f"| {row['query']} | {row['agents']:,} | {row['answer']:,} | {row['p50']:,.0f} | {row['p99']:,.0f} |"
            )
        lines += [
            "",
            f"Narrow query p50 at {dv['large']:,} / at {dv['small']:,} agents: **{dv['narrow_ratio']:.2f}x**.",
            "",
        ]
    rp = results.get("replicas")
    if rp:
        lines += ["### Replicas of one agent id (100 in flight)", "", "| instances | req/s |", "|---|---|"]
        lines += [f"| {n} | {figure(v)} |" for n, v in rp.items()]
        lines += [
            "",
            f"This machine has {os.cpu_count()} cores shared by the caller, the instances and redis-server: "
            "beyond one instance the cores, not the protocol, cap the throughput.",
            "",
        ]
    mem = results.get("memory")
    if mem:
        lines += [
            "### Memory in Redis",
            "",
            f"An inbox holding {mem['messages']:,} messages (the floor stores the full {mem['message_json_bytes']}-byte JSON;"
            f" agentcomms leaves null fields out: {mem.get('agentcomms_json_bytes', 0)} bytes):",
            "",
            "| | bytes per message |",
            "|---|---|",
            f"| agentcomms inbox stream | {mem['agentcomms_inbox_bytes']:,.0f} |",
            f"| agentcomms dedup set (one member per message, for the dedup window) | {mem['agentcomms_dedup_bytes']:,.0f} |",
            f"| floor stream (same body, no dedup) | {mem['floor_stream_bytes']:,.0f} |",
            "",
        ]
    lines += ["### Goals", "", "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {'yes' if met else '**no**'} | {value} |" for goal, met, value in goals]
    return "\n".join(lines) + "\n", goals


async def run(url: str, args: argparse.Namespace, version: str) -> dict[str, Any]:
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        suite = Suite(url, args, progress)
        for step in args.only or ["roundtrip", "oneway", "fanout", "discovery", "replicas", "memory"]:
            await getattr(suite, step)()
            suite.sync.flushall()
    return suite.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true", help="run every process (ours and the references) on uvloop")
    parser.add_argument("--write-docs", action="store_true", help="replace the results section of docs/benchmarks.md")
    parser.add_argument(
        "--only", nargs="*", choices=["roundtrip", "oneway", "fanout", "discovery", "replicas", "memory"]
    )
    args = parser.parse_args()
    sizes = dict(
        sequential=2000,
        concurrent=5000,
        in_flight=100,
        messages=20_000,
        fanout=1000,
        discovery=10_000,
        queries=1000,
        inbox=10_000,
    )
    if args.quick:
        sizes = dict(
            sequential=30, concurrent=100, in_flight=20, messages=500, fanout=150, discovery=200, queries=20, inbox=500
        )
        args.repeats = min(args.repeats, 1)
    vars(args).update(sizes)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        os.environ["BENCH_UVLOOP"] = "1"
    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis(folder, transport="tcp") as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        meta = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "redis": str(client.info("server")["redis_version"]),
            "redis_py": redis.__version__,
            "python": platform.python_version(),
            "uvloop": "yes" if args.uvloop else "no",
            "repeats": str(args.repeats),
        }
        client.close()
        console.print(f"redis-server {meta['redis']} on {redis_server.url}; sizes {sizes}")
        results = asyncio.run(run(redis_server.url, args, meta["redis"]))
    markdown, goals = report(results, meta)
    sys.stdout.write(markdown)
    table = Table(title="goals")
    for column in ("goal", "met", "measured"):
        table.add_column(column)
    for goal, met, value in goals:
        table.add_row(goal, "[green]yes[/]" if met else "[red]no[/]", value)
    console.print(table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(
        json.dumps({"meta": meta, "sizes": sizes, "results": results}, indent=2, default=str)
    )
    if args.write_docs:
        docs = HERE.parent / "docs" / "benchmarks.md"
        text = docs.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        docs.write_text(f"{head}{start}\n{markdown}{end}{tail}")


if __name__ == "__main__":
    main()
