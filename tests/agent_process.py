"""A small agent run as its own process by the cross-process and crash tests.

Modes:
  echo  answers every request with {"echo": <data>, "pid": <pid>}
  hold  prints "HOLD <message_id>" for each message and never finishes handling it

Prints "READY" once its subscription is reading, and "DONE" after a clean stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from agentcomms import AgentMessage, MessageBroker, Settings


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--mode", choices=["echo", "hold"], default="echo")
    parser.add_argument("--claim-idle", type=float, default=0.3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def echo(message: AgentMessage) -> dict[str, Any]:
        return {"echo": message.payload.data, "pid": os.getpid()}

    async def hold(message: AgentMessage) -> None:
        print(f"HOLD {message.message_id}", flush=True)
        await asyncio.Event().wait()

    settings = Settings(redis_url=args.url, claim_idle=args.claim_idle)
    async with MessageBroker(settings=settings, client_name=f"proc{os.getpid()}") as broker:
        handler = echo if args.mode == "echo" else hold
        await broker.subscribe_to_agent(args.agent_id, handler, concurrency=args.concurrency)
        print("READY", flush=True)
        await stop.wait()
    print("DONE", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
