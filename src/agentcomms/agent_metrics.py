"""Prometheus metrics of the agents in one process, on a port of their own (``run-agent --metrics-port``).

prometheus_client is imported only by :func:`serve_agent_metrics`: a process that serves no
metrics neither loads it nor opens a port. Counters are read from the agents' subscription
stats and their brokers' stats at each scrape (nothing is added to the message path); only the
handler latency histogram needs a call per message, through ``BaseAgent.handler_observer``,
which is set only while metrics are served. See docs/metrics.md.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from agentcomms.agent import BaseAgent, HandlerObserver
from agentcomms.broker import BrokerStats, MessageBroker
from agentcomms.exceptions import ConfigError
from agentcomms.subscription import SubscriptionStats

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.metrics_core import Metric

__all__ = ["AgentMetricsServer", "MetricsUnavailableError", "require_prometheus", "serve_agent_metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Buckets of the handler latency histogram, in seconds (handlers calling an LLM take seconds)."""
MAX_INTENTS = 100
"""Intent labels per agent at the most: intents beyond these are timed as ``other`` (senders choose intents)."""


class MetricsUnavailableError(ConfigError):
    """Raised when serving metrics without prometheus-client installed (``pip install 'agentcomms[web]'``)."""


def require_prometheus() -> None:
    """Check that prometheus-client can be imported.

    Raises:
        MetricsUnavailableError: it is not installed.
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailableError(
            f"serving metrics needs prometheus-client: pip install 'agentcomms[web]' ({exc.name} is missing)"
        ) from None


class _StatsCollector:
    """Reads the agents' and brokers' counters at each scrape (in the HTTP server's thread)."""

    def __init__(self, agents: list[BaseAgent]) -> None:
        self._agents = agents
        self._lock = threading.Lock()
        # every subscription's stats seen per agent id: a restarted agent's counters keep counting up
        self._seen: dict[str, list[SubscriptionStats]] = {agent.agent_id: [] for agent in agents}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        messages = CounterMetricFamily(
            "agentcomms_agent_messages",
            "Messages of an agent in this process, by event (the fields of SubscriptionStats).",
            labels=["agent", "event"],
        )
        in_flight = GaugeMetricFamily("agentcomms_agent_in_flight", "Messages read and not yet done.", labels=["agent"])
        running = GaugeMetricFamily("agentcomms_agent_running", "1 if the agent is taking messages.", labels=["agent"])
        fields = [f.name for f in dataclasses.fields(SubscriptionStats)]
        with self._lock:
            holding: dict[str, int] = dict.fromkeys(self._seen, 0)
            up: dict[str, int] = dict.fromkeys(self._seen, 0)
            for agent in self._agents:
                subscription = agent.subscription
                if subscription is None:
                    continue
                seen = self._seen[agent.agent_id]
                if not any(stats is subscription.stats for stats in seen):
                    seen.append(subscription.stats)
                holding[agent.agent_id] += subscription.in_flight
                up[agent.agent_id] |= subscription.running
            for agent_id, seen in self._seen.items():
                for field in fields:
                    messages.add_metric([agent_id, field], sum(getattr(stats, field) for stats in seen))
                in_flight.add_metric([agent_id], holding[agent_id])
                running.add_metric([agent_id], up[agent_id])
        yield messages
        yield in_flight
        yield running
        brokers = list({id(agent.broker): agent.broker for agent in self._agents}.values())
        yield from _broker_counters(brokers)


_BROKER_HELP = {
    "sent": "Messages put into inboxes",
    "duplicates": "Sends dropped as duplicates (a message_id seen within the dedup window)",
    "rejected": "Messages refused before or while sending (too large, inbox full)",
    "requests": "Requests sent",
    "replies_received": "Replies to this broker's requests",
    "replies_unmatched": "Replies no request waited for (late, after a timeout)",
    "replies_refused": "Replies dropped as not authenticated (security on)",
    "timeouts": "Requests that got no reply in time",
    "round_trips": "Writes to Redis (batches of pipelined commands)",
    "reconnects": "Reconnections to Redis",
}


def _broker_counters(brokers: list[MessageBroker]) -> Iterator[Metric]:
    """One counter per field of BrokerStats (``agentcomms_broker_sent_total`` ...), by broker id."""
    from prometheus_client.core import CounterMetricFamily

    snapshots = [(broker.client_id, dataclasses.asdict(broker.stats)) for broker in brokers]
    for field in dataclasses.fields(BrokerStats):
        about = _BROKER_HELP.get(field.name, f"BrokerStats.{field.name}")
        counter = CounterMetricFamily(f"agentcomms_broker_{field.name}", about + ", by broker.", labels=["broker"])
        for broker_id, stats in snapshots:
            counter.add_metric([broker_id], stats[field.name])
        yield counter


def _observer(histogram: Histogram, agent_id: str) -> HandlerObserver:
    """Times one agent's messages into ``histogram``, by intent (at most :data:`MAX_INTENTS`) and outcome."""
    children: dict[tuple[str, str], Histogram] = {}
    intents: set[str] = set()

    def observe(intent: str, seconds: float, outcome: str) -> None:
        child = children.get((intent, outcome))
        if child is None:
            if intent not in intents and len(intents) >= MAX_INTENTS:
                intent = "other"
            intents.add(intent)
            child = children[(intent, outcome)] = histogram.labels(agent_id, intent, outcome)
        child.observe(seconds)

    return observe


class AgentMetricsServer:
    """Prometheus metrics of some agents, served over HTTP by prometheus_client's server (a thread) until closed."""

    def __init__(
        self,
        httpd: WSGIServer,
        thread: threading.Thread,
        registry: CollectorRegistry,
        host: str,
        observers: list[tuple[BaseAgent, HandlerObserver]],
    ) -> None:
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        """The metrics served: add your own to it."""
        self.host = host
        self.port: int = httpd.server_port
        """The port it listens on (the one picked when asked for port 0)."""
        self._observers = observers
        self._closed = False

    @property
    def url(self) -> str:
        """Where to scrape: ``http://host:port/metrics``."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and timing handlers; safe to call twice. Blocks up to half a second (the server's poll)."""
        if self._closed:
            return
        self._closed = True
        for agent, observer in self._observers:
            if agent.handler_observer is observer:
                agent.handler_observer = None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def serve_agent_metrics(agents: Iterable[BaseAgent], *, port: int = 0, host: str = "127.0.0.1") -> AgentMetricsServer:
    """Serve Prometheus metrics of ``agents`` on ``http://host:port/metrics`` until the result is closed.

    Counters are read at each scrape, so agents may be started before or after; handler
    latency is timed from this call on. Serves process metrics (``process_*``) too.

    Args:
        agents: the agents to report (they may share a broker or not).
        port: the port (0: any free one; see ``.port`` / ``.url``).
        host: the address to listen on; anything but loopback lets anyone who reaches it read the metrics.

    Raises:
        MetricsUnavailableError: prometheus-client is not installed.
        OSError: the address cannot be listened on (the port is taken ...).
    """
    require_prometheus()
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        Histogram,
        PlatformCollector,
        ProcessCollector,
        start_http_server,
    )

    agents = list(dict.fromkeys(agents))
    registry = CollectorRegistry()
    histogram = Histogram(
        "agentcomms_agent_handler_seconds",
        "Time an agent took to handle a message, by agent, intent and outcome (ok, error reply, raised).",
        ["agent", "intent", "outcome"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    registry.register(_StatsCollector(agents))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    observers = [(agent, _observer(histogram, agent.agent_id)) for agent in agents]
    for agent, observer in observers:
        agent.handler_observer = observer
    return AgentMetricsServer(httpd, thread, registry, host, observers)
