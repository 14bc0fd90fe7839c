"""An agent program written the plain way: ``asyncio.run(main())``, no signal code, perhaps no shutdown.

    python plain_agent.py MODE REDIS_URL AGENT_ID

MODE ``wait`` runs until a signal; ``return`` returns right after starting (never calling
shutdown); ``mixin`` is the seed's mixin example, which returns without shutting down too.
Prints ``READY`` once registered and answering; a request with ``{"hold": s}`` takes s seconds.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from agentcomms import BaseAgent, Settings, create_agent_config
from agentcomms.examples import AgentCommunicationMixin
from agentcomms.schemas import AgentMessage


class Plain(BaseAgent):
    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        hold = float(message.payload.data.get("hold", 0))
        if hold:
            print("HOLDING", flush=True)
            await asyncio.sleep(hold)  # a handler that takes a while: the work in hand at SIGTERM
        return {"held": hold}


class MixinTwin(AgentCommunicationMixin):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


async def main(mode: str, url: str, agent_id: str) -> None:
    settings = Settings(redis_url=url, heartbeat_interval=30, claim_idle=30)
    if mode == "mixin":
        twin = MixinTwin("Plain Person")
        await twin.initialize_communication(agent_id=agent_id, role="plain", department="lab", settings=settings)
        print("READY", flush=True)
        return
    agent = Plain(create_agent_config(agent_id, "p", "plain", "lab"), settings=settings)
    await agent.initialize()
    print("READY", flush=True)
    if mode == "wait":
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
