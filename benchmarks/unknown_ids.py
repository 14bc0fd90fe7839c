"""Keys left behind by sends to agent ids nobody registered: 10,000 random ids, three ways.

    python benchmarks/unknown_ids.py [--count 10000]

Starts its own redis-server on loopback. For each way of sending it prints how many keys
the sends left and how many of them never expire:

* ``MessageSender`` (what agents, the CLI and dashboards use): the registry has never seen
  the id, so the send fails at once with ``AgentNotFoundError``: no key at all;
* ``MessageSender(..., allow_unregistered=True)``: an inbox and a dedup set per id, both
  expiring (``AGENTCOMMS_UNREGISTERED_INBOX_TTL``, the dedup window);
* ``MessageBroker.publish_message``, the delivery primitive that does not consult the
  registry: an inbox per id that never expires, and a dedup set that does.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from typing import Any

from redis.asyncio import Redis

from agentcomms import (
    AgentMessage,
    AgentNotFoundError,
    EmbeddedRedis,
    MessageBroker,
    MessageIntent,
    MessageSender,
    Settings,
)


async def keys_left(url: str) -> tuple[int, int]:
    """All keys, and those without a TTL (the registry has none here)."""
    client = Redis.from_url(url)
    try:
        total = forever = 0
        async for key in client.scan_iter(count=1000):
            total += 1
            forever += await client.ttl(key) == -1
        return total, forever
    finally:
        await client.aclose()


async def run(url: str, count: int) -> list[dict[str, Any]]:
    settings = Settings(redis_url=url, message_timeout=5)
    rows: list[dict[str, Any]] = []
    client = Redis.from_url(url)
    for way in ("sender", "sender, allow_unregistered=True", "broker.publish_message"):
        await client.flushall()
        ids = [f"agent.typo.{uuid.uuid4().hex[:12]}" for _ in range(count)]
        refused = 0
        async with MessageSender(settings=settings) as sender:
            for chunk in range(0, count, 500):
                batch = ids[chunk : chunk + 500]
                if way == "broker.publish_message":
                    broker: MessageBroker = sender.broker
                    sends: list[Any] = [
                        broker.publish_message(
                            AgentMessage(sender_id="bench", recipient_id=i, intent=MessageIntent.SHARE_INSIGHTS)
                        )
                        for i in batch
                    ]
                else:
                    optin = way != "sender"
                    sends = [
                        sender.send_message(i, MessageIntent.SHARE_INSIGHTS, {"x": 1}, allow_unregistered=optin)
                        for i in batch
                    ]
                results = await asyncio.gather(*sends, return_exceptions=True)
                refused += sum(isinstance(r, AgentNotFoundError) for r in results)
        total, forever = await keys_left(url)
        rows.append({"way": way, "sends": count, "refused": refused, "keys": total, "keys_without_ttl": forever})
    await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis(folder, transport="tcp") as server:
        rows = asyncio.run(run(server.url, args.count))
    print(f"{args.count:,} one-way sends to random ids nobody registered:\n")
    print("| way of sending | refused (AgentNotFoundError) | keys left | of them without a TTL |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| `{row['way']}` | {row['refused']:,} | {row['keys']:,} | {row['keys_without_ttl']:,} |")


if __name__ == "__main__":
    main()
