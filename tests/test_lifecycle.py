"""No ghosts: programs that end without calling shutdown, or are stopped by a signal, leave the registry."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from agentcomms import AgentRegistry, AgentStatus, MessageSender, Settings
from agentcomms.examples import DashboardInterface
from conftest import TESTS, AgentProcess

PLAIN = TESTS / "plain_agent.py"


async def run_plain(mode: str, url: str, agent_id: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PLAIN), mode, url, agent_id, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        assert (await process.stdout.readline()).strip() == b"READY"
    return process


async def status(settings: Settings, agent_id: str) -> AgentStatus:
    async with AgentRegistry(settings=settings) as registry:
        return (await registry.get_agent(agent_id)).status


@pytest.mark.parametrize(("mode", "sig", "code"), [("wait", signal.SIGTERM, 143), ("wait", signal.SIGINT, None)])
async def test_a_signalled_program_leaves_the_registry_before_it_exits(
    settings: Settings, mode: str, sig: signal.Signals, code: int | None
) -> None:
    # heartbeats every 30 s: only a clean leave can make it offline right at exit (expiry takes 90 s)
    process = await run_plain(mode, settings.redis_url or "", "agent.plain.signalled")
    assert await status(settings, "agent.plain.signalled") is AgentStatus.ONLINE
    process.send_signal(sig)
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    if code is not None:
        assert process.returncode == code  # SIGTERM still ends the program, as it would without agentcomms
        assert b"Traceback" not in err and b"never retrieved" not in err, err.decode()
    assert await status(settings, "agent.plain.signalled") is AgentStatus.OFFLINE


@pytest.mark.parametrize("mode", ["return", "mixin"])
async def test_a_program_that_returns_without_shutdown_leaves_the_registry(settings: Settings, mode: str) -> None:
    agent_id = f"agent.plain.{mode}"
    process = await run_plain(mode, settings.redis_url or "", agent_id)
    async with asyncio.timeout(30):
        assert await process.wait() == 0
    assert await status(settings, agent_id) is AgentStatus.OFFLINE


async def test_sigterm_lets_the_work_in_hand_finish(settings: Settings) -> None:
    process = await run_plain("wait", settings.redis_url or "", "agent.plain.busy")
    assert process.stdout is not None
    async with MessageSender(settings=settings) as sender:
        asking = asyncio.create_task(sender.request("agent.plain.busy", "request_knowledge", {"hold": 0.5}, timeout=30))
        async with asyncio.timeout(30):
            assert (await process.stdout.readline()).strip() == b"HOLDING"
        process.send_signal(signal.SIGTERM)
        reply = await asyncio.wait_for(asking, 30)
        assert await process.wait() == 143
    assert reply.success and reply.data == {"held": 0.5}  # answered before the process exited
    assert await status(settings, "agent.plain.busy") is AgentStatus.OFFLINE


async def test_department_status_marks_a_dead_member_silent_instead_of_waiting(settings: Settings) -> None:
    live = await AgentProcess.start(settings.redis_url or "", "agent.ops.live", "--register", "ops:operations")
    dead = await AgentProcess.start(settings.redis_url or "", "agent.ops.dead", "--register", "ops:operations")
    await dead.kill()  # killed without leaving: the registry still shows it online
    try:
        async with DashboardInterface(settings=settings) as dashboard:
            report = await dashboard.exec_request_department_status("operations", timeout=1)
    finally:
        await live.terminate()
    states = {a["agent_id"]: a["state"] for a in report["agents"]}
    assert states == {"agent.ops.live": "answered", "agent.ops.dead": "silent"}
    assert report["answered"] == 1 and report["silent"] == 1


def _libfaketime() -> str | None:
    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    return found[0] if found else None


async def test_a_clock_step_on_the_agents_host_does_not_expire_requests(
    settings: Settings, tmp_path: Path, raw: Redis
) -> None:
    library = _libfaketime()
    if library is None:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is missing: .ci/run installs Debian's faketime package")
        pytest.skip("needs libfaketime (Debian package faketime) to step the agent's clock")
    stamp = tmp_path / "faketime"
    stamp.write_text("+0\n")
    env = {
        "LD_PRELOAD": library,
        "FAKETIME_TIMESTAMP_FILE": str(stamp),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # a wall-clock step does not move the monotonic clock
    }
    agent = await AgentProcess.start(settings.redis_url or "", "agent.stepped", "--claim-idle", "3", env=env)
    try:
        async with MessageSender(settings=settings) as sender:
            await sender.registry.register_agent(
                {"agent_id": "agent.stepped", "user_name": "s", "role": "r", "department": "d"}
            )
            first = await sender.request("agent.stepped", "ping", {"n": 1}, timeout=10)
            stamp.write_text("+120s\n")  # the host's clock jumps two minutes ahead
            replies = [await sender.request("agent.stepped", "ping", {"n": n}, timeout=10) for n in range(2, 12)]
            seconds, _ = await raw.time()
    finally:
        await agent.terminate()
    assert first.data["wall"] < seconds + 60
    assert all(r.success for r in replies)
    assert replies[-1].data["wall"] > seconds + 100  # the agent's clock really was ahead
    assert await raw.xlen("ac:{agent.stepped}:dead") == 0  # nothing dead-lettered as expired
