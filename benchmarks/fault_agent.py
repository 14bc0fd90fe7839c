"""One instance of the fault benchmark's agent, run as its own process: ``python fault_agent.py URL AGENT_ID LOG WORK_MS``.

A :class:`BaseAgent` (registered, heart-beating) with two intents:

  compute  a request ``{"seq": n, "nonce": x}``, answered after WORK_MS ms (an await, as a real twin's call) with ``{"seq": n, "answer": answer(n, x), "pid": pid, "wall": time.time()}``
  record   a one-way message ``{"seq": n}``, only noted

Every message the handler runs on is appended to LOG as one line, ``R <seq>`` or ``O <seq>``,
by a single ``write`` on a file opened with O_APPEND, before the handler returns (so before
the message is acknowledged): a kill -9 keeps what was written, and a message handled twice
(redelivered after a crash) shows up twice. Settings come from the environment
(``AGENTCOMMS_CLAIM_IDLE``, ``AGENTCOMMS_RECONNECT_TIMEOUT`` ...), as for any agent.

Prints READY once registered and reading. SIGTERM stops it cleanly (BaseAgent's own handling).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from agentcomms import AgentMessage, BaseAgent, Settings, create_agent_config

ROLE, DEPARTMENT = "twin", "bench"


def answer(seq: int, nonce: int) -> int:
    """What the caller expects back for request ``seq`` with ``nonce`` (checked for misrouted replies)."""
    return (seq * 2_654_435_761 + nonce) % 4_294_967_311


class Twin(BaseAgent):
    """The agent: answers ``compute``, notes ``record``; each run of a handler is one line of the log."""

    def __init__(self, log_fd: int, work: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_fd, self.work = log_fd, work
        self.pid = os.getpid()

    async def handle_compute(self, message: AgentMessage) -> dict[str, Any]:
        data = message.payload.data
        seq, nonce = int(data["seq"]), int(data["nonce"])
        os.write(self.log_fd, b"R %d\n" % seq)
        if self.work:
            await asyncio.sleep(self.work)  # messages are in hand for a while: a kill -9 catches some
        return {"seq": seq, "answer": answer(seq, nonce), "pid": self.pid, "wall": time.time()}

    async def handle_record(self, message: AgentMessage) -> None:
        os.write(self.log_fd, b"O %d\n" % int(message.payload.data["seq"]))


async def main(url: str, agent_id: str, log: str, work_ms: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    config = create_agent_config(agent_id, "bench", ROLE, DEPARTMENT, ["fault_benchmark"])
    settings = Settings(redis_url=url)
    async with Twin(fd, float(work_ms) / 1000, config=config, settings=settings) as agent:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        while agent.running:  # SIGTERM: BaseAgent leaves the registry and exits the process
            await asyncio.sleep(1)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s.%(msecs)03d %(process)d %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )  # fmt: skip
    asyncio.run(main(*sys.argv[1:5]))
