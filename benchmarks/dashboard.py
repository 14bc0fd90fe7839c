"""The dashboard's live feed: from a message's send to its event at a client of ``/api/events``.

    python benchmarks/dashboard.py [--messages 500] [--quick]

Starts its own redis-server on loopback, the dashboard app under uvicorn in another
process (``agentcomms dashboard``), and an agent in this process. A sender sends one
message at a time; a Server-Sent Events client (httpx, streaming) reads ``/api/events``.
For each message: the time from the send call to its ``sent`` event and to its
``handled`` event at the client. All in this process's clock, so the figures include the
event's way through Redis Pub/Sub, the dashboard and its HTTP stream.

What it does not measure (yet): a browser's parsing and rendering after the bytes arrive,
and recording (the durable record of issue 12 is not built).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from agentcomms import BaseAgent, EmbeddedRedis, MessageSender, Settings, create_agent_config
from agentcomms.schemas import AgentMessage


class Sink(BaseAgent):
    """Handles each message at once."""

    async def handle_inform(self, message: AgentMessage) -> None:
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def start_dashboard(url: str, home: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "REDIS_URL": url, "AGENTCOMMS_DATA_DIR": str(home), "AGENTCOMMS_DASHBOARD_TOKEN": ""}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentcomms", "dashboard", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(60):
        line = (await process.stdout.readline()).decode()
    if not line.startswith("READY "):
        raise RuntimeError(f"the dashboard did not start: {line!r}")
    return process, line.split()[1]


async def measure(url: str, base: str, messages: int) -> tuple[list[float], list[float]]:
    settings = Settings(redis_url=url)
    sent_at: dict[str, float] = {}
    to_sent: list[float] = []
    to_handled: list[float] = []
    done = asyncio.Event()
    subscribed = asyncio.Event()
    handled = asyncio.Event()

    async def listen() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=None) as client:
            async with client.stream("GET", "/api/events") as response:
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        kind = line.partition(":")[2].strip()
                    elif line.startswith("data:"):
                        now = time.perf_counter()
                        event = json.loads(line.partition(":")[2])
                        if kind == "subscribed":
                            subscribed.set()
                        started = sent_at.get(str(event.get("message_id")))
                        if started is None:
                            continue
                        (to_sent if kind == "sent" else to_handled if kind == "handled" else []).append(now - started)
                        if kind == "handled":
                            handled.set()
                        if len(to_handled) >= messages:
                            done.set()
                            return

    config = create_agent_config("agent.sink", "sink", "sink", "bench")
    async with Sink(config, settings=settings), MessageSender(sender_id="bench.sender", settings=settings) as sender:
        listener = asyncio.create_task(listen())
        async with asyncio.timeout(30):
            await subscribed.wait()
        for n in range(messages):
            handled.clear()
            message = sender.build_message("agent.sink", "inform", {"n": n})
            sent_at[message.message_id] = time.perf_counter()  # before the send: its event may come first
            await sender.publish_message(message)
            async with asyncio.timeout(10):
                await handled.wait()  # one at a time: the next is sent once this one's handled event came
        async with asyncio.timeout(30):
            await done.wait()
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return to_sent, to_handled


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="20 messages: a smoke run")
    args = parser.parse_args()
    messages = 20 if args.quick else args.messages
    with tempfile.TemporaryDirectory(prefix="agentcomms-bench-") as folder:
        server = EmbeddedRedis(Path(folder) / "redis")
        server.start()
        dashboard = None
        try:
            dashboard, base = await start_dashboard(server.url, Path(folder) / "home")
            to_sent, to_handled = await measure(server.url, base, messages)
        finally:
            if dashboard is not None:
                dashboard.terminate()
                await dashboard.wait()
            server.stop()
    print(
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {messages} messages, one at a time.\n"
    )
    print("| from the send call to the event at an /api/events client | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for label, values in (("`sent`", to_sent), ("`handled`", to_handled)):
        ms = [v * 1000 for v in values]
        p50, p99 = statistics.median(ms), percentile(ms, 0.99)
        print(f"| {label} ({len(ms)} events) | {p50:.2f} | {p99:.2f} | {max(ms):.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
