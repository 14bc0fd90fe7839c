"""Discovery latency at 100 and at 10,000 registered agents.

Two registries live in two databases of one redis-server (started here on loopback):
one with --small agents, one with --large, spread over 10 departments and 50
capabilities, with two CSOs in sales at both sizes. Queries against the two are
interleaved and repeated. The narrow query (role=cso, department=sales, online) has
the same answer at both sizes and should cost about the same; the broad one (one
department, online) returns a tenth of the agents and grows with its answer. Usage:

    python benchmarks/discovery.py [--small 100] [--large 10000] [--queries 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from agentcomms import AgentRegistry, EmbeddedRedis, Settings

DEPARTMENTS = ["sales", "marketing", "engineering", "finance", "legal", "support", "product", "ops", "hr", "data"]
CAPABILITIES = [f"capability_{n:02d}" for n in range(50)]


def agents(count: int) -> list[dict[str, Any]]:
    rng = random.Random(count)
    team = []
    for n in range(count):
        executive = n < 2
        team.append(
            {
                "agent_id": f"agent.{n:05d}",
                "user_name": f"user{n}",
                "role": "cso" if executive else f"specialist_{n % 7}",
                "department": "sales" if executive else DEPARTMENTS[n % 10],
                "capabilities": rng.sample(CAPABILITIES, 3),
                "supported_intents": ["request_knowledge"],
            }
        )
    return team


async def populate(registry: AgentRegistry, count: int) -> None:
    team = agents(count)
    for start in range(0, count, 500):  # 500 registrations per pipelined batch
        await asyncio.gather(*(registry.register_agent(a, heartbeat_interval=3600) for a in team[start : start + 500]))


async def timed(query: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await query()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, args: argparse.Namespace, *, quiet: bool = False) -> dict[str, Any]:
    sizes = (args.small, args.large)
    registries = {size: AgentRegistry(redis_url=f"{url}/{db}", settings=Settings()) for db, size in enumerate(sizes)}
    for size, registry in registries.items():
        await registry.initialize()
        await registry.broker.pipeliner.call("FLUSHDB", replay=True)
        started = time.perf_counter()
        await populate(registry, size)
        if not quiet:
            print(f"registered {size:,} agents in {time.perf_counter() - started:.1f}s", flush=True)
    queries: dict[str, Callable[[AgentRegistry], Awaitable[object]]] = {
        "narrow": lambda r: r.discover_agents(role="cso", department="sales", online_only=True),
        "broad": lambda r: r.discover_agents(department="marketing", online_only=True),
    }
    results: dict[tuple[str, int], dict[str, list[float]]] = {
        (name, size): {"p50": [], "p99": []} for name in queries for size in sizes
    }
    answers = {}
    for name, query in queries.items():
        for size, registry in registries.items():
            answers[(name, size)] = len(cast(list[Any], await query(registry)))
            await timed(functools.partial(query, registry), 100)  # warm up
    for repeat in range(args.repeats):
        order = list(registries.items()) if repeat % 2 == 0 else list(reversed(registries.items()))
        for name, query in queries.items():
            for size, registry in order:
                samples = await timed(functools.partial(query, registry), args.queries)
                results[(name, size)]["p50"].append(percentile(samples, 0.5))
                results[(name, size)]["p99"].append(percentile(samples, 0.99))
    for registry in registries.values():
        await registry.broker.pipeliner.call("FLUSHDB", replay=True)
        await registry.close()
    rows = [
        {
            "query": name,
            "agents": size,
            "answer": answers[(name, size)],
            "p50": statistics.median(values["p50"]),
            "p99": statistics.median(values["p99"]),
        }
        for (name, size), values in results.items()
    ]
    narrow_small, narrow_large = (statistics.median(results[("narrow", s)]["p50"]) for s in sizes)
    summary = {"rows": rows, "small": args.small, "large": args.large, "narrow_ratio": narrow_large / narrow_small}
    if not quiet:
        print(f"\ndiscovery, {args.repeats} repeats of {args.queries} queries (median of repeats)")
        print(f"{'query':8} {'agents':>8} {'answer':>7} {'p50 µs':>9} {'p99 µs':>9}")
        for row in rows:
            print(f"{row['query']:8} {row['agents']:>8,} {row['answer']:>7,} {row['p50']:>9,.0f} {row['p99']:>9,.0f}")
        for name in queries:
            small, large = (statistics.median(results[(name, s)]["p50"]) for s in sizes)
            print(f"{name}: p50 at {args.large:,} / at {args.small:,} agents = {large / small:.2f}x")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis(folder, transport="tcp") as server:
        print(f"redis-server on {server.url}, python {sys.version.split()[0]}")
        asyncio.run(measure(server.url, args))


if __name__ == "__main__":
    main()
