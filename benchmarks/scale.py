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
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from agentcomms import AgentRegistry, EmbeddedRedis, MessageSender, Settings

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import discovery  # noqa: E402 - a sibling module of this script
from suite import cpu_seconds, in_flight, server  # noqa: E402


async def role_throughput(url: str, agents: int, delay_ms: int, requests: int) -> dict[str, float]:
    """req/s of ``request_role("worker")`` with ``agents`` workers, and CPU µs per request (all processes)."""
    client = redis.Redis.from_url(url)
    client.flushall()
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
            info0 = client.info("cpu")
            rps = await in_flight(call, requests, 100)
            info1 = client.info("cpu")
            cpu1 = sum(cpu_seconds(p.pid) for p in procs) + time.process_time()
    redis_cpu = sum(float(info1[k]) - float(info0[k]) for k in ("used_cpu_user", "used_cpu_sys"))
    client.close()
    return {"rps": rps, "cpu_us": (cpu1 - cpu0 + redis_cpu) / requests * 1e6, "redis_us": redis_cpu / requests * 1e6}


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
        for agents in (1, 2, 4):
            cpu = await role_throughput(url, agents, 0, requests)
            waiting = await role_throughput(url, agents, 10, requests)
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


if __name__ == "__main__":
    asyncio.run(main())
