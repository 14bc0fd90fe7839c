"""A small agent run as its own process by the cross-process and crash tests.

Modes:
  echo  answers every request with {"echo": <data>, "pid": <pid>}
  hold  prints "HOLD <message_id>" for each message and never finishes handling it

Prints "READY" once its subscription is reading, and "DONE" after a clean stop on SIGTERM.
With --register ROLE:DEPARTMENT it also registers and keeps beating every --heartbeat seconds (and with
--routed it reads the role's inbox too: role routing); --delay makes each echo take that long;
--clock-skew shifts this process's wall clock (time.time), as a badly set machine would be.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import Any

from agentcomms import AgentMessage, AgentRegistry, MessageBroker, Settings, keys


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--mode", choices=["echo", "hold"], default="echo")
    parser.add_argument("--claim-idle", type=float, default=0.3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--register", help="ROLE:DEPARTMENT")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--clock-skew", type=float, default=0.0)
    parser.add_argument("--routed", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.clock_skew:
        real_time = time.time
        time.time = lambda: real_time() + args.clock_skew

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def echo(message: AgentMessage) -> dict[str, Any]:
        if args.delay:
            await asyncio.sleep(args.delay)  # the work a handler does (an LLM, a database)
        return {"echo": message.payload.data, "pid": os.getpid(), "wall": time.time()}

    async def hold(message: AgentMessage) -> None:
        print(f"HOLD {message.message_id}", flush=True)
        await asyncio.Event().wait()

    settings = Settings(redis_url=args.url, claim_idle=args.claim_idle)
    async with MessageBroker(settings=settings, client_name=f"proc{os.getpid()}") as broker:
        handler = echo if args.mode == "echo" else hold
        addresses = [keys.role_address(args.register.split(":")[0])] if args.routed and args.register else []
        await broker.subscribe_to_agent(args.agent_id, handler, concurrency=args.concurrency, addresses=addresses)
        presence = None
        if args.register:
            role, department = args.register.split(":")
            registry = AgentRegistry(broker)
            info = {"agent_id": args.agent_id, "user_name": "proc", "role": role, "department": department}
            presence = await registry.keep_alive(info, heartbeat_interval=args.heartbeat)
        print("READY", flush=True)
        await stop.wait()
        if presence is not None:
            await presence.stop()
    print("DONE", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
