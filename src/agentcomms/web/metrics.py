"""Prometheus metrics of the whole network, as the dashboard sees it (``/metrics``).

Counters and the latency histogram come from the live feed (``ac:events``), which is
Pub/Sub: events published while the dashboard is not listening are not counted, so
these counters start at the dashboard's start and may miss events across a reconnection
(``agentcomms_feed_resubscriptions_total`` says how often). Gauges (online agents, inbox
depths, dead letters) are read from Redis at each scrape and are exact.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentcomms import keys
from agentcomms.broker import MessageBroker
from agentcomms.exceptions import AgentCommsError
from agentcomms.registry import AgentRegistry

__all__ = ["NetworkMetrics"]

logger = logging.getLogger(__name__)

_PENDING_LIMIT = 100_000
"""Sent messages remembered (by id) to time their handling; the oldest are forgotten first."""
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NetworkMetrics:
    """The registry of metrics ``/metrics`` serves, fed by :meth:`follow` and read fresh by :meth:`refresh`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "agentcomms_messages",
            "Messages seen on the feed, by event (sent, handled, dead_lettered), recipient agent and intent.",
            ["event", "agent", "intent"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "agentcomms_sent_to_handled_seconds",
            "From a message's send to its handling by the recipient (queueing and handler), by agent and intent.",
            ["agent", "intent"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.resubscriptions = Counter(
            "agentcomms_feed_resubscriptions", "Times the feed was lost and subscribed again.", registry=self.registry
        )
        self._sent: OrderedDict[str, float] = OrderedDict()
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    def observe(self, event: dict[str, Any]) -> None:
        """Count one feed event (and time a ``handled`` one against its ``sent``)."""
        kind = event.get("event")
        if kind == "resubscribed":
            self.resubscriptions.inc()
            return
        if kind not in {"sent", "handled", "dead_lettered"}:
            return
        agent = str(event.get("recipient_id") or "-")[:128]
        intent = str(event.get("intent") or "-")[:64]
        self.messages.labels(kind, agent, intent).inc()
        message_id, ts = event.get("message_id"), event.get("ts")
        if not isinstance(message_id, str) or not isinstance(ts, int | float):
            return
        if kind == "sent":
            self._sent[message_id] = float(ts)
            if len(self._sent) > _PENDING_LIMIT:
                self._sent.popitem(last=False)
        else:
            sent = self._sent.pop(message_id, None)
            if kind == "handled" and sent is not None and ts >= sent:
                self.latency.labels(agent, intent).observe(float(ts) - sent)

    async def follow(self, broker: MessageBroker) -> None:
        """Count the feed's events until cancelled (the feed's connection is closed then)."""
        feed = cast(AsyncGenerator[dict[str, Any], None], broker.events())  # an async generator: closable
        async with aclosing(feed):
            async for event in feed:
                self.observe(event)

    async def refresh(self, broker: MessageBroker, registry: AgentRegistry) -> None:
        """Read the gauges from Redis: online agents, inbox depth and dead letters per agent."""
        stats = await registry.get_registry_stats()
        agents = [a.agent_id for a in await registry.discover_agents()]
        depths: dict[str, int] = {}
        calls = [(agent, broker.pipeliner.call("XLEN", stream, replay=True)) for agent in agents
                 for stream in keys.inboxes(agent)]  # fmt: skip
        for agent, call in calls:
            try:
                depths[agent] = depths.get(agent, 0) + int(await call)
            except AgentCommsError:
                depths.setdefault(agent, 0)
        dead = {agent: await broker.count_dead_letters(agent) for agent in await broker.dead_letter_agents()}
        self._snapshot.update(stats.online_agents, stats.total_agents, depths, dead)


class _Snapshot(Collector):
    """The gauges of the last :meth:`NetworkMetrics.refresh`."""

    def __init__(self) -> None:
        self._online = self._total = 0
        self._depths: dict[str, int] = {}
        self._dead: dict[str, int] = {}

    def update(self, online: int, total: int, depths: dict[str, int], dead: dict[str, int]) -> None:
        self._online, self._total, self._depths, self._dead = online, total, depths, dead

    def collect(self) -> Iterator[GaugeMetricFamily]:
        online = GaugeMetricFamily("agentcomms_agents_online", "Registered agents online now.")
        online.add_metric([], self._online)
        yield online
        total = GaugeMetricFamily("agentcomms_agents_registered", "Registered agents, online or not.")
        total.add_metric([], self._total)
        yield total
        depth = GaugeMetricFamily("agentcomms_inbox_depth", "Messages in an agent's inboxes.", labels=["agent"])
        for agent, count in sorted(self._depths.items()):
            depth.add_metric([agent], count)
        yield depth
        dead = GaugeMetricFamily("agentcomms_dead_letters", "Dead letters of an agent.", labels=["agent"])
        for agent, count in sorted(self._dead.items()):
            dead.add_metric([agent], count)
        yield dead
