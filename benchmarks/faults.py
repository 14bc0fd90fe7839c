"""The fault benchmark: requests with 100 in flight to agent processes while Redis and the agents are hurt.

    python benchmarks/faults.py [--quick] [--keys 1000000] [--instances 3]

Starts its own redis-server on a loopback port (tests/faultkit.py's RedisServer: AOF on,
restartable at the same address), fills it with ``--keys`` keys, and starts ``--instances``
processes of one agent id (benchmarks/fault_agent.py, a BaseAgent; the instances share the
id's consumer group), all under libfaketime. A MessageSender in this process keeps 100
requests in flight, each with a unique sequence number and a nonce whose answer it checks,
and sends one numbered one-way message along with each request. Meanwhile it injects, in turn:

  1. kill -9 of one agent instance (the others take over its pending messages after claim_idle)
  2. a clean Redis restart that loads the keys again (clients see LOADING until it is done)
  3. CLIENT PAUSE from a separate plain client
  4. Redis killed for longer than reconnect_timeout, then started again
  5. a +120 s wall-clock step on the agents' host (libfaketime)

Nothing is restarted by hand but Redis itself. After the last fault the load stops, the
one-way messages are given time to arrive, and every request and message is accounted for.
Each belongs to the phase in which its call returned (the last fault while it was in flight):

  lost            a request whose call never returned (or raised an untyped error), a one-way
                  send that never returned, or an accepted one-way message no instance handled
                  and that is not in the dead letters
  timed out       RequestTimeoutError; errors: any other typed error, by class (failed, reported)
  answered twice  a request whose caller got two replies (must be 0); handled twice: a request or
                  message the handlers ran on twice (at-least-once after a crash or a long stall)
  misrouted       a reply whose sequence number or answer is not its request's (must be 0)
  recovery        from Redis answering PING again (the fault itself for the kill and the clock
                  step) to the first success followed by --streak successes in a row; every
                  instance: until each live instance answered again; longest gap: the longest
                  time without any success between this fault and the next

Prints the tables and the goals and writes
benchmarks/results/faults.json (``--results`` moves it); the processes' logs, and every
request and message as CSV, are kept next to it in faults-logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import glob
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from agentcomms import (
    AgentCommsError,
    AgentResponse,
    MessageBroker,
    MessageSender,
    RequestTimeoutError,
    Settings,
    keys,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from fault_agent import ROLE, answer  # noqa: E402 - a sibling module of this script

from faultkit import RedisServer  # noqa: E402 - the tests' harness: a restartable redis-server on loopback

console = Console(width=None if sys.stdout.isatty() else 180)
log = logging.getLogger("faults")
AGENT_ID = "agent.faults.twin"
FAILURE_PAUSE = 0.1
"""Seconds a caller waits after a failed request before its next one (as a real caller would back off)."""
CLOCK_STEP = 120
STORED = ("accepted", "duplicate")
"""Outcomes of a one-way send that say the message is in the inbox (a duplicate: it was, from an earlier try)."""


@dataclass(slots=True)
class Request:
    """One request, issued in ``phase``; ``outcome`` is empty until the call returned (still empty at the end: lost).

    ``skew``: the answering agent's wall clock minus this process's, when the reply came.
    """

    seq: int
    phase: int
    issued: float
    done: float = 0.0
    outcome: str = ""
    answers: int = 0
    pid: int = 0
    skew: float = 0.0


@dataclass(slots=True)
class OneWay:
    """One one-way message: ``accepted`` (the send returned), ``duplicate``, an error class, or empty (never returned)."""

    seq: int
    phase: int
    done: float = 0.0
    outcome: str = ""


@dataclass(slots=True)
class Phase:
    """A fault, from its injection to the next one; ``reference`` is what recovery is measured from."""

    name: str
    label: str
    injected: float
    reference: float
    reference_is: str
    notes: dict[str, Any] = field(default_factory=dict)
    unmatched_at_start: int = 0


# -- the agents ----------------------------------------------------------------------------


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        raise SystemExit("libfaketime is missing: install Debian's faketime package (it steps the agents' clock)")
    return found[0]


class Agents:
    """The agent instances, each a process of benchmarks/fault_agent.py under libfaketime (one shared clock file)."""

    def __init__(self, url: str, folder: Path, work_ms: float) -> None:
        self.url, self.folder, self.work_ms = url, folder, work_ms
        self.clock = folder / "faketime"
        self.clock.write_text("+0\n")
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LD_PRELOAD": libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self.clock),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # a wall-clock step does not move the monotonic clock
        }
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self, count: int) -> None:
        self.processes = list(await asyncio.gather(*(self._spawn(n) for n in range(count))))

    async def _spawn(self, n: int) -> asyncio.subprocess.Process:
        with open(self.folder / f"agent-{n}.log", "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "fault_agent.py"), self.url, AGENT_ID, str(self.folder / f"agent-{n}.handled"),
                str(self.work_ms),
                stdout=asyncio.subprocess.PIPE, stderr=stderr, env=self.env,
            )  # fmt: skip
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        if line.strip() != b"READY":
            raise RuntimeError(f"agent {n} did not start (see {self.folder / f'agent-{n}.log'})")
        return process

    async def kill(self, n: int) -> int:
        process = self.processes[n]
        process.kill()
        await process.wait()
        return process.pid

    def step_clock(self, seconds: int) -> None:
        self.clock.write_text(f"+{seconds}s\n")

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    def handled(self) -> tuple[collections.Counter[int], collections.Counter[int]]:
        """How many times each request and each one-way message was handled, from every instance's log."""
        requests: collections.Counter[int] = collections.Counter()
        oneways: collections.Counter[int] = collections.Counter()
        for path in self.folder.glob("agent-*.handled"):
            for line in path.read_bytes().splitlines():
                kind, _, seq = line.partition(b" ")
                (requests if kind == b"R" else oneways)[int(seq)] += 1
        return requests, oneways


# -- the load ------------------------------------------------------------------------------


class Load:
    """``in_flight`` callers, each sending a request (and a one-way message with it) as soon as the last ended."""

    def __init__(self, sender: MessageSender, *, in_flight: int, timeout: float) -> None:
        self.sender, self.in_flight, self.timeout = sender, in_flight, timeout
        self.requests: list[Request] = []
        self.oneways: list[OneWay] = []
        self.completions: list[tuple[float, bool]] = []  # (when a request returned, whether it succeeded), in order
        self.phase = 0
        self.stopping = False
        self.streak = 0
        self.streak_since = 0.0
        self.workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.workers = [asyncio.create_task(self._worker()) for _ in range(self.in_flight)]

    async def stop(self, grace: float) -> int:
        """Let every caller finish its call (they all end by their timeout); the ones still waiting are cancelled."""
        self.stopping = True
        _, hung = await asyncio.wait(self.workers, timeout=grace)
        for task in hung:
            task.cancel()
        await asyncio.gather(*hung, return_exceptions=True)
        return len(hung)

    async def _worker(self) -> None:
        while not self.stopping:
            request = Request(len(self.requests), self.phase, time.monotonic())
            self.requests.append(request)
            oneway = OneWay(request.seq, self.phase)
            self.oneways.append(oneway)
            await asyncio.gather(self._ask(request), self._tell(oneway))
            if request.outcome != "ok":
                await asyncio.sleep(FAILURE_PAUSE)

    async def _ask(self, request: Request) -> None:
        nonce = random.getrandbits(32)
        data = {"seq": request.seq, "nonce": nonce}
        try:
            reply = await self.sender.request(AGENT_ID, "compute", data, timeout=self.timeout)
        except RequestTimeoutError:
            outcome = "timeout"
        except AgentCommsError as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # not a typed error: a caller could not act on it (counted as lost)
            log.exception("request %d raised an untyped error", request.seq)
            outcome = f"untyped {type(exc).__name__}"
        else:
            request.answers += 1
            outcome = self._check(request, reply, nonce)
        request.done, request.outcome = time.monotonic(), outcome
        ok = outcome == "ok"
        self.completions.append((request.done, ok))
        if not ok:
            self.streak = 0
        else:
            if not self.streak:
                self.streak_since = request.done
            self.streak += 1

    @staticmethod
    def _check(request: Request, reply: AgentResponse, nonce: int) -> str:
        if not reply.success:
            return f"error reply {reply.error.code if reply.error else '?'}"
        data = reply.data if isinstance(reply.data, dict) else {}
        if data.get("seq") != request.seq or data.get("answer") != answer(request.seq, nonce):
            log.error("misrouted reply to request %d: %r", request.seq, reply.data)
            return "misrouted"
        request.pid, request.skew = int(data.get("pid", 0)), float(data.get("wall", 0.0)) - time.time()
        return "ok"

    async def _tell(self, oneway: OneWay) -> None:
        try:
            result = await self.sender.send_message(AGENT_ID, "record", {"seq": oneway.seq})
        except AgentCommsError as exc:
            oneway.outcome = type(exc).__name__
        except Exception as exc:  # not a typed error (counted as lost)
            log.exception("one-way message %d raised an untyped error", oneway.seq)
            oneway.outcome = f"untyped {type(exc).__name__}"
        else:
            oneway.outcome = "duplicate" if result.duplicate else "accepted"
        oneway.done = time.monotonic()

    async def recovered(self, since: float, count: int, limit: float) -> bool:
        """Until ``count`` requests in a row succeeded, the first of them after ``since`` (or ``limit`` s passed)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.streak >= count and (self.streak_since >= since or self.completions[-count][0] >= since):
                return True
            await asyncio.sleep(0.05)
        return False


# -- the faults ----------------------------------------------------------------------------


class Faults:
    """Each fault: inject it, and say when recovery is measured from (the fault, or Redis answering again)."""

    def __init__(self, server: RedisServer, agents: Agents, args: argparse.Namespace) -> None:
        self.server, self.agents, self.args = server, agents, args

    async def _answering(self) -> float:
        """Until PING answers PONG (not LOADING, not paused): the moment Redis answers again."""
        await asyncio.to_thread(self.server.wait_ready)
        return time.monotonic()

    async def agent_kill(self, notes: dict[str, Any]) -> tuple[float, float]:
        injected = time.monotonic()
        notes["killed pid"] = await self.agents.kill(0)
        return injected, injected

    async def redis_restart(self, notes: dict[str, Any]) -> tuple[float, float]:
        injected = time.monotonic()
        await asyncio.to_thread(self.server.stop)
        notes["stopped after s"] = round(time.monotonic() - injected, 3)
        extra = self.server.slow_loading_args() if self.args.slow_loading else []
        await asyncio.to_thread(self.server.start, wait=False, extra=extra)
        with contextlib.suppress(redis.RedisError):
            notes["loading seen"] = await asyncio.to_thread(self.server.loading)
        answering = await self._answering()
        notes["loaded after s"] = round(answering - injected, 3)
        return injected, answering

    async def client_pause(self, notes: dict[str, Any]) -> tuple[float, float]:
        client = self.server.client()
        try:
            await asyncio.to_thread(client.execute_command, "CLIENT", "PAUSE", self.args.pause_ms)
        finally:
            client.close()
        injected = time.monotonic()
        answering = await self._answering()
        notes["paused for s"] = round(answering - injected, 3)
        return injected, answering

    async def redis_down(self, notes: dict[str, Any]) -> tuple[float, float]:
        injected = time.monotonic()
        await asyncio.to_thread(self.server.kill)
        await asyncio.sleep(self.args.down)
        await asyncio.to_thread(self.server.start, wait=False)
        answering = await self._answering()
        notes["down for s"] = round(answering - injected, 3)
        return injected, answering

    async def clock_step(self, notes: dict[str, Any]) -> tuple[float, float]:
        self.agents.step_clock(CLOCK_STEP)
        injected = time.monotonic()
        return injected, injected


FAULTS: list[tuple[str, str, str]] = [
    ("agent_kill", "kill -9 of an agent instance", "the fault"),
    ("redis_restart", "Redis restart, {keys:,} keys loading", "Redis answering"),
    ("client_pause", "CLIENT PAUSE {pause_ms}", "Redis answering"),
    ("redis_down", "Redis killed for {down:g} s (reconnect_timeout {reconnect:g} s)", "Redis answering"),
    ("clock_step", f"wall clock +{CLOCK_STEP} s on the agents' host", "the fault"),
]


# -- the run -------------------------------------------------------------------------------


async def online_instances(sender: MessageSender) -> int | str:
    """The agent's live instances as the registry sees them when asked by role (0: not found online)."""
    try:
        found = await sender.discover_agents(role=ROLE, online_only=True)
    except AgentCommsError as exc:
        return type(exc).__name__
    return next((info.instance_count for info in found if info.agent_id == AGENT_ID), 0)


async def read_dead_letters(broker: MessageBroker) -> list[dict[str, Any]]:
    """Every dead letter of the agent id: kind (R: request, O: one-way), sequence number, reason."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = await broker.dead_letters(AGENT_ID, count=500, after=after)
        for letter in page:
            message = letter.message
            data = message.payload.data if message else {}
            kind = "R" if message is not None and str(message.intent) == "compute" else "O"
            found.append({"kind": kind, "seq": data.get("seq"), "reason": letter.reason})
        if len(page) < 500:
            return found
        after = page[-1].entry_id


async def wait_for_oneways(agents: Agents, load: Load, limit: float) -> float:
    """Until every accepted one-way message was handled (or ``limit`` s): seconds waited."""
    accepted = {m.seq for m in load.oneways if m.outcome in STORED}
    started = time.monotonic()
    while time.monotonic() - started < limit:
        _, handled = agents.handled()
        if accepted <= handled.keys():
            break
        await asyncio.sleep(0.25)
    return time.monotonic() - started


def inbox_state(server: RedisServer) -> dict[str, int]:
    client = server.client()
    try:
        streams = keys.inboxes(AGENT_ID)
        pending = sum(int(client.xpending(s, keys.GROUP)["pending"]) for s in streams if client.exists(s))
        return {"inbox entries": sum(int(client.xlen(s)) for s in streams), "pending": pending}
    finally:
        client.close()


async def run(args: argparse.Namespace, server: RedisServer, logs: Path) -> dict[str, Any]:
    agents = Agents(server.url, logs, args.work_ms)
    await agents.start(args.instances)
    faults = Faults(server, agents, args)
    phases: list[Phase] = []
    try:
        async with MessageSender(sender_id="bench.faults", settings=Settings(redis_url=server.url)) as sender:
            load = Load(sender, in_flight=args.in_flight, timeout=args.timeout)
            load.start()
            origin = time.monotonic()
            phases.append(Phase("baseline", "none (baseline)", origin, origin, "-"))
            await asyncio.sleep(args.baseline)
            for name, label, reference_is in FAULTS:
                phase = Phase(name, label.format(**vars(args)), 0.0, 0.0, reference_is)
                phase.unmatched_at_start = sender.broker.stats.replies_unmatched
                load.phase = len(phases)
                log.warning("FAULT %d: %s", load.phase, phase.label)
                console.print(f"[bold]fault {load.phase}[/]: {phase.label}")
                inject: Callable[[dict[str, Any]], Awaitable[tuple[float, float]]] = getattr(faults, name)
                phase.injected, phase.reference = await inject(phase.notes)
                phases.append(phase)
                phase.notes["recovered"] = await load.recovered(phase.reference, args.streak, args.phase_limit)
                await asyncio.sleep(args.settle)
                phase.notes["instances online by role"] = await online_instances(sender)
            hung = await load.stop(grace=args.timeout + 10)
            end = time.monotonic()
            waited = await wait_for_oneways(agents, load, args.drain)
            dead = await read_dead_letters(sender.broker)
            unmatched = sender.broker.stats.replies_unmatched
            live = [p.pid for p in agents.processes if p.returncode is None]
    finally:
        await agents.stop()
    handled_requests, handled_oneways = agents.handled()
    return {
        "phases": phases,
        "load": load,
        "origin": origin,
        "end": end,
        "hung callers": hung,
        "live pids": live,
        "one-way drain s": round(waited, 2),
        "dead": dead,
        "unmatched": unmatched,
        "handled": (handled_requests, handled_oneways),
        "after run": inbox_state(server),
    }


# -- the figures ---------------------------------------------------------------------------


def recovery(completions: list[tuple[float, bool]], since: float, count: int) -> float | None:
    """Seconds from ``since`` to the first success after which ``count`` requests in a row succeeded."""
    streak, start = 0, 0.0
    for when, ok in completions:
        if when < since:
            continue
        if not ok:
            streak = 0
            continue
        if not streak:
            start = when
        streak += 1
        if streak >= count:
            return start - since
    return None


def every_instance(requests: list[Request], pids: list[int], since: float) -> float | None:
    """Seconds from ``since`` until every live instance had answered a request again (None: one never did)."""
    first: dict[int, float] = {}
    for request in requests:
        if request.outcome == "ok" and request.done >= since and request.pid not in first:
            first[request.pid] = request.done
    if not all(pid in first for pid in pids):
        return None
    return max(first[pid] for pid in pids) - since


def longest_gap(completions: list[tuple[float, bool]], start: float, end: float) -> float:
    """The longest time without any successful request between ``start`` and ``end``."""
    points = [start, *(when for when, ok in completions if ok and start <= when <= end), end]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def summarize(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per phase: what happened to the requests and one-way messages that ended in it, and how fast it recovered.

    A request or message belongs to the phase in which its call returned (the last fault that
    happened while it was in flight), or, if it never returned, to the phase it was sent in.
    """
    phases: list[Phase] = result["phases"]
    load: Load = result["load"]
    handled_requests, handled_oneways = result["handled"]
    dead: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for letter in result["dead"]:
        dead[(letter["kind"], letter["seq"])].append(letter["reason"])
    starts = [phase.injected for phase in phases]
    requests: dict[int, list[Request]] = collections.defaultdict(list)
    for request in load.requests:
        requests[bisect.bisect_right(starts, request.done) - 1 if request.done else request.phase].append(request)
    oneways: dict[int, list[OneWay]] = collections.defaultdict(list)
    for oneway in load.oneways:
        oneways[bisect.bisect_right(starts, oneway.done) - 1 if oneway.done else oneway.phase].append(oneway)
    rows = []
    for index, phase in enumerate(phases):
        last = index + 1 == len(phases)
        end = result["end"] if last else phases[index + 1].injected
        unmatched = (result["unmatched"] if last else phases[index + 1].unmatched_at_start) - phase.unmatched_at_start
        row = {
            "fault": phase.name,
            "label": phase.label,
            "injected at s": round(phase.injected - result["origin"], 3),
            "recovery from": phase.reference_is,
            "outage s": round(phase.reference - phase.injected, 3),
            "notes": phase.notes,
            "requests": request_figures(requests[index], handled_requests, dead, end - phase.injected),
            "one-way": oneway_figures(oneways[index], handled_oneways, dead),
            "late or duplicate replies dropped by the caller": unmatched,
        }
        if index:
            rec = recovery(load.completions, phase.reference, args.streak)
            row["recovery s"] = None if rec is None else round(rec, 3)
            row["longest gap s"] = round(longest_gap(load.completions, phase.injected, end), 3)
            every = every_instance(requests[index], result["live pids"], phase.reference)
            row["every instance answering s"] = None if every is None else round(every, 3)
        skews = sorted(r.skew for r in requests[index] if r.outcome == "ok")
        if skews:
            phase.notes["agents' clock ahead by s (median)"] = round(skews[len(skews) // 2], 1)
        rows.append(row)
    return rows


def request_figures(
    requests: list[Request],
    handled: collections.Counter[int],
    dead: dict[tuple[str, int], list[str]],
    seconds: float,
) -> dict[str, Any]:
    outcomes = collections.Counter(r.outcome for r in requests)
    errors = {k: v for k, v in outcomes.items() if k not in ("ok", "timeout", "misrouted", "") and "untyped" not in k}
    latencies = sorted(r.done - r.issued for r in requests if r.outcome == "ok")
    unseen = [r for r in requests if r.outcome == "timeout" and not handled[r.seq] and ("R", r.seq) not in dead]
    return {
        "issued": len(requests),
        "answered": outcomes["ok"],
        "timed out": outcomes["timeout"],
        "errors": errors,
        "lost": outcomes[""] + sum(v for k, v in outcomes.items() if k.startswith("untyped")),  # never returned
        "answered twice": sum(1 for r in requests if r.answers > 1),
        "handled twice": sum(1 for r in requests if handled[r.seq] > 1),
        "misrouted": outcomes["misrouted"],
        "dead-lettered": sum(1 for r in requests if ("R", r.seq) in dead),
        "timed out, never seen by an agent": len(unseen),
        "answered per s": round(outcomes["ok"] / seconds, 1) if seconds > 0 else 0.0,
        "p50 latency s": round(latencies[len(latencies) // 2], 4) if latencies else None,
        "max latency s": round(latencies[-1], 3) if latencies else None,
        "answered by pid": dict(collections.Counter(str(r.pid) for r in requests if r.outcome == "ok")),
    }


def oneway_figures(
    oneways: list[OneWay], handled: collections.Counter[int], dead: dict[tuple[str, int], list[str]]
) -> dict[str, Any]:
    outcomes = collections.Counter(m.outcome for m in oneways)
    accepted = [m for m in oneways if m.outcome in STORED]
    refused = [m for m in oneways if m.outcome not in ("accepted", "duplicate", "") and "untyped" not in m.outcome]
    missing = [m.seq for m in accepted if not handled[m.seq] and ("O", m.seq) not in dead]
    return {
        "sent": len(oneways),
        "accepted": len(accepted),
        "duplicate": outcomes["duplicate"],
        "refused": {k: v for k, v in outcomes.items() if k not in ("accepted", "duplicate", "") and "untyped" not in k},
        "never returned": outcomes[""] + sum(v for k, v in outcomes.items() if k.startswith("untyped")),
        "handled": sum(1 for m in accepted if handled[m.seq]),
        "missing": len(missing),
        "missing seqs": missing[:50],
        "handled twice": sum(1 for m in oneways if handled[m.seq] > 1),
        "dead-lettered": sum(1 for m in accepted if ("O", m.seq) in dead),
        "refused but handled": sum(1 for m in refused if handled[m.seq]),
    }


def dump(result: dict[str, Any], logs: Path) -> None:
    """Every request and one-way message as CSV (times in s from the start of the load), for a closer look."""
    origin, load = result["origin"], result["load"]
    handled_requests, handled_oneways = result["handled"]
    with open(logs / "requests.csv", "w") as out:
        out.write("seq,phase sent,sent s,returned s,outcome,answered by pid,handled\n")
        for r in load.requests:
            done = f"{r.done - origin:.4f}" if r.done else ""
            out.write(
                f"{r.seq},{r.phase},{r.issued - origin:.4f},{done},{r.outcome},{r.pid},{handled_requests[r.seq]}\n"
            )
    with open(logs / "oneways.csv", "w") as out:
        out.write("seq,phase sent,returned s,outcome,handled\n")
        for m in load.oneways:
            done = f"{m.done - origin:.4f}" if m.done else ""
            out.write(f"{m.seq},{m.phase},{done},{m.outcome},{handled_oneways[m.seq]}\n")


def lost(row: dict[str, Any]) -> int:
    return int(row["requests"]["lost"]) + int(row["one-way"]["missing"]) + int(row["one-way"]["never returned"])


def goals(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    total_lost = sum(lost(r) for r in rows)
    misrouted = sum(r["requests"]["misrouted"] for r in rows)
    twice = sum(r["requests"]["answered twice"] for r in rows)
    found = [
        ("0 lost (requests and accepted one-way messages)", total_lost == 0, f"{total_lost}"),
        ("0 misrouted replies", misrouted == 0, f"{misrouted}"),
        ("0 replies delivered twice to a caller", twice == 0, f"{twice}"),
    ]
    for row in rows[1:]:
        rec = row.get("recovery s")
        found.append(
            (
                f"recovery <= {args.goal:g} s after {row['recovery from'].lower()}: {row['label']}",
                rec is not None and rec <= args.goal,
                "never" if rec is None else f"{rec:.2f} s",
            )
        )
    return found


# -- the report ----------------------------------------------------------------------------


def errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(errors.items())) or "-"


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def request_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = []
    for row in rows:
        r = row["requests"]
        table.append(
            [
                row["label"], f"{r['issued']:,}", f"{r['answered']:,}", f"{r['timed out']:,}", errors_text(r["errors"]),
                f"{r['lost']}", f"{r['answered twice']}", f"{r['handled twice']}", f"{r['misrouted']}",
                seconds(row.get("recovery s")) if "recovery s" in row else "-",
                seconds(row.get("every instance answering s")) if "recovery s" in row else "-",
                seconds(row.get("longest gap s")) if "longest gap s" in row else "-",
                seconds(r["max latency s"]),
            ]
        )  # fmt: skip
    return table


def oneway_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = []
    for row in rows:
        m = row["one-way"]
        table.append(
            [
                row["label"], f"{m['sent']:,}", f"{m['accepted']:,}", errors_text(m["refused"]), f"{m['never returned']}",
                f"{m['handled']:,}", f"{m['missing']}", f"{m['handled twice']}", f"{m['dead-lettered']}",
            ]
        )  # fmt: skip
    return table


REQUEST_COLUMNS = [
    "fault", "requests", "answered", "timed out", "errors", "lost", "answered twice", "handled twice",
    "misrouted", "recovery s", "every instance s", "longest gap s", "max latency s",
]  # fmt: skip
ONEWAY_COLUMNS = [
    "fault", "sent", "accepted", "refused", "never returned", "handled", "missing", "handled twice", "dead-lettered"
]  # fmt: skip


def markdown(columns: list[str], table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in table]


def report(summary: dict[str, Any]) -> str:
    """The results as Markdown (for docs/benchmarks.md)."""
    meta, rows, settings = summary["meta"], summary["faults"], summary["settings"]
    lines = [
        f"Run: {meta['when']}, {meta['machine']}; redis-server {meta['redis']}, Python {meta['python']}; "
        f"{settings['instances']} instances of one agent id, {settings['in_flight']} requests in flight, "
        f"request timeout {settings['request timeout s']:g} s, claim_idle {settings['AGENTCOMMS_CLAIM_IDLE']} s, "
        f"reconnect_timeout {settings['AGENTCOMMS_RECONNECT_TIMEOUT']} s; recovery = first success followed by "
        f"{settings['streak']} in a row.",
        "",
        "Requests (each in the phase in which its call returned):",
        "",
        *markdown(REQUEST_COLUMNS, request_rows(rows)),
        "",
        "One-way messages (one per request):",
        "",
        *markdown(ONEWAY_COLUMNS, oneway_rows(rows)),
        "",
        "| goal | met | measured |",
        "|---|---|---|",
        *[f"| {goal} | {'yes' if met else '**no**'} | {value} |" for goal, met, value in summary["goals"]],
    ]
    return "\n".join(lines) + "\n"


def print_tables(summary: dict[str, Any]) -> None:
    for title, columns, table in (
        ("requests (each in the phase in which its call returned)", REQUEST_COLUMNS, request_rows(summary["faults"])),
        ("one-way messages (one per request)", ONEWAY_COLUMNS, oneway_rows(summary["faults"])),
    ):
        out = Table(title=title)
        for column in columns:
            out.add_column(column, overflow="fold")
        for row in table:
            out.add_row(*row)
        console.print(out)
    notes = Table(title="faults")
    for column in ("fault", "injected at s", "outage s", "notes"):
        notes.add_column(column, overflow="fold")
    for row in summary["faults"][1:]:
        text = ", ".join(f"{k} {v}" for k, v in row["notes"].items())
        notes.add_row(row["label"], f"{row['injected at s']:.2f}", f"{row['outage s']:.2f}", text)
    console.print(notes)
    goal_table = Table(title="goals")
    for column in ("goal", "met", "measured"):
        goal_table.add_column(column)
    for goal, met, value in summary["goals"]:
        goal_table.add_row(goal, "[green]yes[/]" if met else "[red]no[/]", value)
    console.print(goal_table)


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer keys, shorter phases: a smoke run")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys Redis loads at the restart")
    parser.add_argument("--instances", type=int, default=3, help="agent processes sharing one agent id")
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--work-ms", type=float, default=2.0, help="time each request spends in its handler")
    parser.add_argument("--timeout", type=float, default=10.0, help="each request's timeout, s")
    parser.add_argument("--claim-idle", type=float, default=1.0, help="AGENTCOMMS_CLAIM_IDLE of every process, s")
    parser.add_argument("--reconnect", type=float, default=2.0, help="AGENTCOMMS_RECONNECT_TIMEOUT, s")
    parser.add_argument("--pause-ms", type=int, default=3000, help="CLIENT PAUSE duration")
    parser.add_argument("--down", type=float, default=4.0, help="seconds Redis stays killed (> --reconnect)")
    parser.add_argument(
        "--slow-loading", action="store_true", help="the restart loads each key slowly (~60 µs): LOADING for longer"
    )
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds of load before the first fault")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds of load after recovery, before the next fault"
    )
    parser.add_argument("--streak", type=int, default=200, help="successes in a row that make a recovery")
    parser.add_argument("--phase-limit", type=float, default=30.0, help="seconds to wait for a recovery at most")
    parser.add_argument("--drain", type=float, default=20.0, help="seconds to wait for one-way messages at the end")
    parser.add_argument("--goal", type=float, default=5.0, help="recovery goal, s")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where faults.json and the logs go")
    args = parser.parse_args()
    if args.quick:
        args.keys, args.pause_ms, args.down, args.baseline = 50_000, 1500, 3.0, 1.5
        args.settle, args.streak, args.drain = 1.5, 50, 10.0
    if args.down <= args.reconnect:
        parser.error("--down must be longer than --reconnect")
    return args


def configure(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """The environment every process reads its settings from, and the caller's log file."""
    os.environ["AGENTCOMMS_CLAIM_IDLE"] = f"{args.claim_idle:g}"
    os.environ["AGENTCOMMS_RECONNECT_TIMEOUT"] = f"{args.reconnect:g}"
    os.environ["HEARTBEAT_INTERVAL"] = "2"
    for name in ("REDIS_URL", "REDIS_PASSWORD", "REDIS_DB"):
        os.environ.pop(name, None)
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    logging.basicConfig(
        level=logging.INFO, filename=logs / "caller.log",
        format="%(asctime)s.%(msecs)03d %(process)d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )  # fmt: skip
    return {
        "AGENTCOMMS_CLAIM_IDLE": os.environ["AGENTCOMMS_CLAIM_IDLE"],
        "AGENTCOMMS_RECONNECT_TIMEOUT": os.environ["AGENTCOMMS_RECONNECT_TIMEOUT"],
        "HEARTBEAT_INTERVAL": os.environ["HEARTBEAT_INTERVAL"],
        "request timeout s": args.timeout,
        "in_flight": args.in_flight,
        "handler work ms": args.work_ms,
        "instances": args.instances,
        "keys": args.keys,
        "pause ms": args.pause_ms,
        "down s": args.down,
        "streak": args.streak,
        "failure pause s": FAILURE_PAUSE,
        "quick": args.quick,
    }


def main() -> None:
    args = parse_args()
    results: Path = args.results
    logs = results / "faults-logs"
    settings = configure(args, logs)
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder) / "redis") as server:
        version = ".".join(map(str, server.version))
        console.print(f"redis-server {version} on {server.url}; filling {args.keys:,} keys")
        started = time.monotonic()
        server.fill(args.keys)
        settings["fill s"] = round(time.monotonic() - started, 2)
        try:
            result = asyncio.run(run(args, server, logs))
        finally:
            with contextlib.suppress(OSError):
                shutil.copy(Path(folder) / "redis" / "redis.log", logs / "redis.log")
    rows = summarize(result, args)
    dump(result, logs)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "redis": version,
        "redis_py": redis.__version__,
        "python": platform.python_version(),
    }
    summary: dict[str, Any] = {
        "meta": meta,
        "settings": settings,
        "faults": rows[1:],
        "baseline": rows[0],
        "after run": {
            "hung callers": result["hung callers"],
            "one-way drain s": result["one-way drain s"],
            "dead letters": len(result["dead"]),
            **result["after run"],
        },
        "goals": goals(rows, args),
    }
    print_tables({**summary, "faults": rows})
    console.print(f"after the run: {summary['after run']}")
    sys.stdout.write(report({**summary, "faults": rows}))
    results.mkdir(parents=True, exist_ok=True)
    (results / "faults.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {results / 'faults.json'}; logs in {logs}")


if __name__ == "__main__":
    main()
