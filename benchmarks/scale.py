"""Scale on this machine: a role's throughput with 1, 2 and 4 agents (role routing), a broadcast to 10,000
agents, discovery among 100,000, and what one request costs in CPU (to project to a larger machine).

    python benchmarks/scale.py [--quick]

Starts its own redis-server on loopback. The role's agents are processes (benchmarks/servers.py
``ours-role``): each registers as a "worker" and reads the role's inbox beside its own, so a
request to the role (``request_role``) is taken by whichever is free. Two handlers: one that
answers at once (CPU-bound: the cores are the limit) and one that waits 10 ms (as a handler
waiting for an LLM or a database does; 8 at once per agent), where more agents mean more
requests in hand. The caller keeps 100 requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from agentcomms import AgentRegistry, EmbeddedRedis, MessageSender, Settings, keys
from agentcomms.transport import ClusterPipeliner

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import discovery  # noqa: E402 - a sibling module of this script
from suite import cpu_seconds, in_flight, server  # noqa: E402

from clusterkit import RedisClusterKit  # noqa: E402 - the tests' harness: a Redis Cluster on loopback ports
from faultkit import RedisServer  # noqa: E402 - the tests' harness: a redis-server on a loopback port


def redis_cpu(ports: list[int]) -> float:
    """CPU seconds the redis-servers on ``ports`` have used."""
    total = 0.0
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port) as client:
            info = client.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def flush(ports: list[int]) -> None:
    """Empty the servers on ``ports`` (a cluster's replicas refuse: they follow their primary)."""
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port) as client, contextlib.suppress(redis.ReadOnlyError):
            client.flushall()


async def role_throughput(url: str, ports: list[int], agents: int, delay_ms: int, requests: int) -> dict[str, float]:
    """req/s of ``request_role("worker")`` with ``agents`` workers, and CPU µs per request (all processes).

    ``ports``: the redis-servers (one, or every node of a cluster), emptied first, whose CPU is counted.
    """
    flush(ports)
    env = {"AGENTCOMMS_CONCURRENCY": "8"}
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(server("ours-role", url, f"agent.worker.{n}", delay_ms, env=env)) for n in range(agents)
        ]
        async with MessageSender(settings=Settings(redis_url=url), sender_id="bench.caller") as sender:

            def call() -> Any:
                return sender.request_role("worker", "request_knowledge", {"q": "status"})

            await in_flight(call, min(requests, 500), 100)  # warm up
            cpu0 = sum(cpu_seconds(p.pid) for p in procs) + time.process_time()
            redis0 = redis_cpu(ports)
            rps = await in_flight(call, requests, 100)
            in_redis = redis_cpu(ports) - redis0
            cpu1 = sum(cpu_seconds(p.pid) for p in procs) + time.process_time()
    return {"rps": rps, "cpu_us": (cpu1 - cpu0 + in_redis) / requests * 1e6, "redis_us": in_redis / requests * 1e6}


async def cluster_section(requests: int) -> None:
    """The same role on a 3-primary Redis Cluster, and direct requests to 12 agents whose inboxes spread over it."""
    with tempfile.TemporaryDirectory(prefix="agentcomms-cluster-") as folder, RedisClusterKit(Path(folder)) as kit:
        ports = [server.port for server in kit.servers]
        print("\nOn a Redis Cluster of 3 primaries and 3 replicas on this machine (all on the same 2 cores):\n")
        print("| agents of the role | req/s, handler answers at once | req/s, handler waits 10 ms | CPU µs/request |")
        print("|---|---|---|---|")
        for agents in (1, 2, 4):
            cpu = await role_throughput(kit.url, ports, agents, 0, requests)
            waiting = await role_throughput(kit.url, ports, agents, 10, requests)
            print(
                f"| {agents} | {cpu['rps']:,.0f} | {waiting['rps']:,.0f} | {cpu['cpu_us']:,.0f} (Redis {cpu['redis_us']:,.0f}) |",
                flush=True,
            )
        flush(ports)
        names = [f"agent.spread.{n}" for n in range(12)]
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(server("ours-role", kit.url, name, 0))
            async with MessageSender(settings=Settings(redis_url=kit.url), sender_id="bench.caller") as sender:
                pipeliner = sender.broker.pipeliner
                assert isinstance(pipeliner, ClusterPipeliner)
                shards = collections.Counter(pipeliner.spec_for_key(keys.inbox(name)).port for name in names)
                turn = iter(range(10**9))

                def call() -> Any:
                    return sender.request(names[next(turn) % len(names)], "request_knowledge", {"q": "status"})

                await in_flight(call, min(requests, 500), 100)
                rps = await in_flight(call, requests, 100)
        print(
            f"\nDirect requests to 12 agents whose inboxes spread over the primaries {sorted(shards.values())}: "
            f"{rps:,.0f} req/s, 100 in flight.",
            flush=True,
        )


async def durable_section(requests: int) -> None:
    """One-way sends with and without a durable send (WAIT for 1 replica), on a primary with one replica."""
    with tempfile.TemporaryDirectory(prefix="agentcomms-durable-") as folder:
        primary = RedisServer(Path(folder) / "primary").start()
        replica = RedisServer(Path(folder) / "replica").start(extra=["--replicaof", "127.0.0.1", str(primary.port)])
        with replica.client() as client:
            while client.info("replication").get("master_link_status") != "up":  # the replica's first sync
                time.sleep(0.02)
        try:
            print("\nDurable send (`AGENTCOMMS_DURABLE_REPLICAS=1`: WAIT for the replica), a primary and a replica:\n")
            print("| send | one at a time: p50 µs | 100 in flight: msg/s |")
            print("|---|---|---|")
            for label, replicas in (("to the primary", 0), ("durable (WAIT 1)", 1)):
                settings = Settings(redis_url=primary.url, durable_replicas=replicas)
                async with MessageSender(settings=settings, sender_id="bench.caller") as sender:

                    def call() -> Any:
                        return sender.send_message("agent.sink", "share_insights", {"n": 1}, allow_unregistered=True)

                    await in_flight(call, 200, 1)
                    times = []
                    for _ in range(min(requests, 2000)):
                        started = time.perf_counter()
                        await call()
                        times.append(time.perf_counter() - started)
                    times.sort()
                    rate = await in_flight(call, requests, 100)
                print(f"| {label} | {times[len(times) // 2] * 1e6:,.0f} | {rate:,.0f} |", flush=True)
        finally:
            replica.kill()
            primary.kill()


async def fanout(url: str, size: int) -> dict[str, float]:
    """ms until a broadcast is in ``size`` inboxes, and its round trips."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    async with MessageSender(settings=Settings(redis_url=url), sender_id="bench.caller") as sender:
        registry = AgentRegistry(sender.broker)
        for start in range(0, size, 500):
            await asyncio.gather(
                *(
                    registry.register_agent(
                        {"agent_id": f"agent.all.{n:05d}", "user_name": f"u{n}", "role": "staff", "department": "all"},
                        heartbeat_interval=3600,
                    )
                    for n in range(start, min(start + 500, size))
                )
            )
        before = sender.broker.stats.round_trips
        started = time.perf_counter()
        results = await sender.broadcast_message("agent_status", {"message": "all hands"}, department="all")
        ms = (time.perf_counter() - started) * 1000
        assert len(results) == size and not any(isinstance(r, Exception) for r in results.values())
        return {"ms": ms, "round_trips": sender.broker.stats.round_trips - before}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    requests, fan, large = (300, 1000, 2000) if args.quick else (5000, 10_000, 100_000)
    with EmbeddedRedis(Path(tempfile.mkdtemp(prefix="agentcomms-scale-")), transport="tcp") as embedded:
        url = embedded.url
        version = redis.Redis.from_url(url).info("server")["redis_version"]
        print(
            f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores; "
            f"redis-server {version}, Python {platform.python_version()}; {requests} requests, 100 in flight.\n"
        )
        print(
            "| agents of the role | req/s, handler answers at once | req/s, handler waits 10 ms | CPU µs/request (all processes) |"
        )
        print("|---|---|---|---|")
        first: dict[str, float] = {}
        ports = [int(url.rsplit(":", 1)[1].split("/")[0])]
        for agents in (1, 2, 4):
            cpu = await role_throughput(url, ports, agents, 0, requests)
            waiting = await role_throughput(url, ports, agents, 10, requests)
            first = first or cpu
            print(
                f"| {agents} | {cpu['rps']:,.0f} | {waiting['rps']:,.0f} | {cpu['cpu_us']:,.0f} (Redis {cpu['redis_us']:,.0f}) |",
                flush=True,
            )
        cores = os.cpu_count() or 1
        total, in_redis = first["cpu_us"], first["redis_us"]
        print(
            f"\nOne request costs {total:,.0f} µs of CPU in all (caller, agent, Redis), {in_redis:,.0f} µs of it in "
            f"Redis: {cores} cores do at most {cores / total * 1e6:,.0f} a second whatever the number of agents, so "
            f"beyond one agent the cores cap a handler that answers at once. On paper, with the same cost per request "
            f"and callers and agents spread over more cores, one Redis (one core for commands) caps at about "
            f"{1e6 / in_redis:,.0f} requests a second; past that, shard the inboxes (Redis Cluster).\n"
        )
        result = await fanout(url, fan)
        print(
            f"Broadcast to {fan:,} agents: {result['ms']:,.0f} ms until all are in their inboxes, {result['round_trips']:.0f} round trips.\n"
        )
        client = redis.Redis.from_url(url)
        client.flushall()
        client.close()
        measured = await discovery.measure(
            url, argparse.Namespace(small=100, large=large, queries=300, repeats=1), quiet=True
        )
        print(f"Discovery among 100 and {large:,} agents:\n")
        print("| query | agents | answer | p50 µs | p99 µs |")
        print("|---|---|---|---|---|")
        for row in measured["rows"]:
            print(f"| {row['query']} | {row['agents']:,} | {row['answer']:,} | {row['p50']:,.0f} | {row['p99']:,.0f} |")
        print(f"\nNarrow query p50 at {large:,} / at 100 agents: {measured['narrow_ratio']:.2f}x.")
    await cluster_section(requests)
    await durable_section(requests)


if __name__ == "__main__":
    asyncio.run(main())
