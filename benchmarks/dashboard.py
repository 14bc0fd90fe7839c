"""The dashboard's live feed: from a message's send to its event at a client of ``/api/events``, and in a browser.

    python benchmarks/dashboard.py [--messages 500] [--quick] [--no-browser]

Starts its own redis-server on loopback, the dashboard app under uvicorn in another
process (``agentcomms dashboard``), and an agent in this process. A sender sends one
message at a time. Two parts, one after the other, on the same Redis, dashboard and agent:

1. A Server-Sent Events client (httpx, streaming) reads ``/api/events``. For each message:
   the time from the send call to its ``sent`` event and to its ``handled`` event at the
   client. All in this process's clock (``time.perf_counter``), so the figures include the
   event's way through Redis Pub/Sub, the dashboard and its HTTP stream. The next message is
   sent once this one's ``handled`` event came.

2. The dashboard's own page in headless chromium (Debian's, driven by Playwright as the
   page's tests do; skipped with ``--no-browser``, or with a line saying why when Playwright
   or chromium is missing). Before the page's script runs, a probe is installed in it
   (``PAGE_PROBE``) that takes these times, as ``performance.timeOrigin + performance.now()``
   (or + a paint's ``renderTime``):

   - *parsed*: the page's feed reader decodes the event's JSON (the probe wraps
     ``JSON.parse``: the page reads the feed with ``fetch``, not ``EventSource``);
   - *row*: the row for that message id and kind (``data-message-id`` and ``data-kind`` on a
     flow row) is in the message-flow list, seen by a ``MutationObserver``. The page renders
     the flow at the next animation frame, so this includes waiting for that frame;
   - *painted*: a task queued at that moment runs, i.e. the frame that added the row is
     through style, layout and paint on the page's main thread;
   - *shown*: the ``renderTime`` Element Timing reports for the row's first cell, the time the
     frame with it was presented (chromium coarsens it to 4 ms). The page adds new rows at
     each frame and keeps the others, so every row's paint is reported.

   The sender's time is ``time.time()`` just before the send call. Both are wall-clock time
   (epoch ms) on this one machine: Python's ``time.time()`` reads CLOCK_REALTIME, and
   chromium's ``performance.timeOrigin`` is the wall-clock time the page started, to which
   ``performance.now()`` adds a monotonic clock's reading. So the two agree to well under a
   millisecond unless the system clock is stepped or slewed during the run; the program
   checks this before and after the run (``page.evaluate`` of chromium's clock between two
   readings of Python's) and prints the difference. Chromium rounds ``performance.now()``
   to 0.1 ms (the page is not cross-origin isolated). A few warm-up messages go first and
   are not counted; the next message is sent once this one's ``handled`` row is shown (or
   1 s after it is in the page, if its paint is not reported). The httpx client is closed by
   then: the page is the feed's only client.

What it does not measure (yet): the screen's part of showing a frame (headless: no display),
and recording (the durable record of issue 12 is not built).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from agentcomms import BaseAgent, EmbeddedRedis, MessageSender, Settings, create_agent_config
from agentcomms.schemas import AgentMessage

if TYPE_CHECKING:
    from playwright.async_api import Page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WARMUP = 5  # messages the browser part sends before the counted ones
STAGES = ("parsed", "row", "painted", "shown")
STAGE_LABELS = {
    "parsed": "chromium, parsed by the page",
    "row": "chromium, its row in the page",
    "painted": "chromium, that frame painted",
    "shown": "chromium, that frame shown",
}
BROWSER_ROWS = [("sent", stage) for stage in STAGES[:-1]] + [("handled", stage) for stage in STAGES]

# Installed before the page's own script (add_init_script). Times are epoch ms: timeOrigin + a performance time.
PAGE_PROBE = r"""
(() => {
  const epoch = (t) => performance.timeOrigin + t;
  const bench = (window.__bench = { parsed: [], row: [], painted: [], shown: [] });
  const parse = JSON.parse;
  JSON.parse = function (text, reviver) {
    const value = parse.call(this, text, reviver);
    if (value !== null && typeof value === "object" && typeof value.event === "string" && typeof value.message_id === "string") {
      bench.parsed.push([value.event, value.message_id, epoch(performance.now())]);
    }
    return value;
  };
  new PerformanceObserver((entries) => {
    for (const entry of entries.getEntries()) {
      const [kind, id] = entry.identifier.split(" ");
      if (!id) continue;
      bench.shown.push([kind, id, epoch(entry.renderTime || entry.startTime)]);
      window.benchSeen("shown", kind, id);
    }
  }).observe({ type: "element" });
  const seen = new Set();
  const watch = () => {
    const body = document.getElementById("flow-table").tBodies[0];
    new MutationObserver(() => {
      const at = epoch(performance.now());
      const fresh = [];
      for (const row of body.rows) {  // newest first: stop at the first row seen before
        const id = row.dataset.messageId;
        if (!id) continue;
        const key = `${row.dataset.kind} ${id}`;
        if (seen.has(key)) break;
        seen.add(key);
        fresh.push([row.dataset.kind, id]);
        bench.row.push([row.dataset.kind, id, at]);
        window.benchSeen("row", row.dataset.kind, id);
        // set before this frame paints, so its paint is reported (the page keeps rows it drew before)
        row.cells[0].setAttribute("elementtiming", key);
      }
      if (!fresh.length) return;
      const channel = new MessageChannel();  // its message runs once this frame's main-thread work is done
      channel.port1.onmessage = () => {
        const done = epoch(performance.now());
        for (const [kind, id] of fresh) bench.painted.push([kind, id, done]);
      };
      channel.port2.postMessage(null);
    }).observe(body, { childList: true });
  };
  document.addEventListener("DOMContentLoaded", watch);
})();
"""


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


async def measure(sender: MessageSender, base: str, messages: int) -> tuple[list[float], list[float]]:
    """Part 1: seconds from the send call to each ``sent`` and ``handled`` event at an httpx client."""
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

    listener = asyncio.create_task(listen())
    try:
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
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return to_sent, to_handled


@dataclass
class BrowserResult:
    """Part 2: ms from the send call, by stage (``STAGES``) and kind; or why it was skipped."""

    skipped: str = ""
    version: str = ""
    ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    clock_offsets: list[tuple[float, float]] = field(default_factory=list)  # (chromium − Python, ± half round trip)
    errors: list[str] = field(default_factory=list)


async def clock_offset(page: Page) -> tuple[float, float]:
    """Chromium's wall clock minus Python's, in ms, from the sample with the shortest round trip; and ± half that trip."""
    samples = []
    for _ in range(20):
        before = time.time() * 1000
        theirs = await page.evaluate("performance.timeOrigin + performance.now()")
        after = time.time() * 1000
        samples.append((after - before, float(theirs) - (before + after) / 2))
    trip, offset = min(samples)
    return offset, trip / 2


class PageSender:
    """Sends one message at a time, the next once the page has shown the last one's ``handled`` row."""

    def __init__(self, sender: MessageSender) -> None:
        self.sender = sender
        self.sent_at: dict[str, float] = {}  # epoch ms, just before the send call
        self.seen: dict[tuple[str, str], asyncio.Event] = {}  # (stage, message id) of a handled row

    def on_seen(self, stage: str, kind: str, message_id: str) -> None:
        """Called by the page's probe (``window.benchSeen``)."""
        if kind == "handled" and (stage, message_id) in self.seen:
            self.seen[stage, message_id].set()

    async def send(self, n: int) -> str:
        message = self.sender.build_message("agent.sink", "inform", {"n": n})
        key = message.message_id
        self.seen["row", key], self.seen["shown", key] = asyncio.Event(), asyncio.Event()
        self.sent_at[key] = time.time() * 1000  # before the send: its event may come first
        await self.sender.publish_message(message)
        try:
            async with asyncio.timeout(10):
                await self.seen["row", key].wait()
        except TimeoutError:
            raise RuntimeError(
                f"no handled row for message {n} in the page within 10 s (do its flow rows carry data-message-id?)"
            ) from None
        with contextlib.suppress(TimeoutError):  # and, as a rule, that the frame with it was shown
            async with asyncio.timeout(1):
                await self.seen["shown", key].wait()
        return key


def latencies(
    probe: dict[str, list[list[Any]]], sent_at: dict[str, float], counted: set[str]
) -> dict[tuple[str, str], list[float]]:
    """ms from the send call to each (stage, kind) the probe recorded for a counted message (its first time)."""
    ms: dict[tuple[str, str], list[float]] = {(stage, kind): [] for stage in STAGES for kind in ("sent", "handled")}
    for stage in STAGES:
        first: set[tuple[str, str]] = set()
        for kind, message_id, at in probe[stage]:
            if message_id in counted and (kind, message_id) not in first and (stage, kind) in ms:
                first.add((kind, message_id))
                ms[stage, kind].append(float(at) - sent_at[message_id])
    return ms


async def measure_browser(sender: MessageSender, base: str, messages: int) -> BrowserResult:
    """Part 2: the dashboard's page in headless chromium (see the module's docstring)."""
    try:
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import async_playwright
    except ImportError:
        return BrowserResult(skipped="Playwright is not installed (it comes with the [dev] extra)")
    if not os.access(CHROMIUM, os.X_OK):
        return BrowserResult(skipped=f"no chromium at {CHROMIUM} (Debian package chromium)")
    result = BrowserResult()
    sending = PageSender(sender)
    async with async_playwright() as playwright:
        try:
            chromium = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        except PlaywrightError as exc:
            return BrowserResult(skipped=f"chromium ({CHROMIUM}) did not start: {exc.message.splitlines()[0]}")
        try:
            result.version = chromium.version
            context = await chromium.new_context(viewport={"width": 1366, "height": 768})
            page = await context.new_page()
            page.on("console", lambda m: result.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: result.errors.append(f"{error.name}: {error.message}"))
            await page.expose_function("benchSeen", sending.on_seen)
            await page.add_init_script(PAGE_PROBE)
            await page.goto(base)
            await page.wait_for_selector("#connection[data-state=live]", timeout=30_000)  # the feed is subscribed
            await page.locator("#flow-table").scroll_into_view_if_needed()  # a paint is reported only if in view
            result.clock_offsets.append(await clock_offset(page))
            for n in range(WARMUP):
                await sending.send(n)
            counted = {await sending.send(n) for n in range(WARMUP, WARMUP + messages)}
            await asyncio.sleep(0.2)  # the last paints' reports
            result.clock_offsets.append(await clock_offset(page))
            probe = await page.evaluate("window.__bench")
        except (RuntimeError, PlaywrightError) as exc:  # main prints part 1's figures, then says so
            raise RuntimeError(f"{str(exc).splitlines()[0]} (the page's errors: {result.errors})") from None
        finally:
            await chromium.close()  # first: the page's event stream ends
    result.ms = latencies(probe, sending.sent_at, counted)
    return result


def row(label: str, ms: list[float]) -> str:
    if not ms:
        return f"| {label} | n/a | n/a | n/a |"
    return f"| {label} | {statistics.median(ms):.2f} | {percentile(ms, 0.99):.2f} | {max(ms):.2f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="20 messages: a smoke run")
    parser.add_argument("--no-browser", action="store_true", help="skip part 2, the page in headless chromium")
    args = parser.parse_args()
    messages = 20 if args.quick else args.messages
    browser = BrowserResult(skipped="--no-browser")
    failed = False
    with tempfile.TemporaryDirectory(prefix="agentcomms-bench-") as folder:
        server = EmbeddedRedis(Path(folder) / "redis")
        server.start()
        dashboard = None
        try:
            dashboard, base = await start_dashboard(server.url, Path(folder) / "home")
            settings = Settings(redis_url=server.url)
            config = create_agent_config("agent.sink", "sink", "sink", "bench")
            async with (
                Sink(config, settings=settings),
                MessageSender(sender_id="bench.sender", settings=settings) as sender,
            ):
                to_sent, to_handled = await measure(sender, base, messages)
                if not args.no_browser:
                    try:
                        browser = await measure_browser(sender, base, messages)
                    except RuntimeError as exc:  # part 1's figures are still worth printing
                        browser, failed = BrowserResult(skipped=str(exc)), True
        finally:
            if dashboard is not None:
                dashboard.terminate()
                await dashboard.wait()
            server.stop()
    print(
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {messages} messages, one at a time."
    )
    if browser.skipped:
        print(f"Browser part {'failed' if failed else 'skipped'}: {browser.skipped}.")
    else:
        offsets = "; ".join(f"{offset:+.2f} ms (± {error:.2f})" for offset, error in browser.clock_offsets)
        print(
            f"Browser: headless chromium {browser.version} on the dashboard's page, {WARMUP} warm-up messages first; "
            f"chromium's clock minus Python's, before and after: {offsets}."
        )
        if browser.errors:
            print(f"The page reported errors: {browser.errors}")
    print()
    print("| from the send call to the event at an /api/events client | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for kind, values in (("sent", to_sent), ("handled", to_handled)):
        print(row(f"`{kind}` ({len(values)} events): httpx", [v * 1000 for v in values]))
    if not browser.skipped:
        for kind, stage in BROWSER_ROWS:
            ms = browser.ms[stage, kind]
            print(row(f"`{kind}` ({len(ms)} events): {STAGE_LABELS[stage]}", ms))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
