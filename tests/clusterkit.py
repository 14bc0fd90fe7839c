"""A real Redis Cluster on loopback ports: 3 primaries and 3 replicas, made with ``redis-cli --cluster create``.

Used by the cluster pass of the suite (``AGENTCOMMS_TEST_CLUSTER=1``: the broker, registry,
agent, role and record tests run on it) and by ``benchmarks/scale.py``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from faultkit import RedisServer


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_ports(count: int) -> list[int]:
    """``count`` loopback ports that are free with their cluster bus ports (port + 10000), below the ephemeral range."""
    out: list[int] = []
    for port in random.sample(range(20000, 30000), 2000):
        if _free(port) and _free(port + 10000):
            out.append(port)
            if len(out) == count:
                return out
    raise RuntimeError("no free ports for a Redis Cluster")


class RedisClusterKit:
    """Six redis-servers with ``cluster-enabled yes`` joined into one cluster (3 primaries, 1 replica each)."""

    def __init__(self, directory: Path, *, primaries: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        ports = _cluster_ports(primaries * (replicas + 1))
        self.servers = [RedisServer(directory / f"node{n}", port=port) for n, port in enumerate(ports)]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A node's URL: agentcomms finds the others from it (``CLUSTER SLOTS``)."""
        return self.servers[0].url

    def start(self) -> Self:
        """Start the nodes, join them, and wait until every node says the cluster is ``ok``."""
        for server in self.servers:
            server.start(extra=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                                "--cluster-replica-validity-factor", "0",
                                "--cluster-config-file", str(server.directory / "nodes.conf")])  # fmt: skip
        cli = shutil.which("redis-cli") or str(Path(self.servers[0].binary).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every node reports ``cluster_state:ok`` and knows every node and replica (the join has spread)."""
        deadline = time.monotonic() + timeout
        for server in self.servers:
            client = server.client()
            try:
                while True:
                    info = client.cluster("info")
                    nodes = client.cluster("nodes")
                    replicas = sum("slave" in str(node.get("flags", "")) for node in nodes.values())
                    if (
                        info["cluster_state"] == "ok"
                        and int(info["cluster_known_nodes"]) == len(self.servers)
                        and replicas == len(self.servers) // (self.replicas + 1) * self.replicas
                    ):  # and every node knows which are replicas (a failover needs it)
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cluster not ok on port {server.port}: {info}")
                    time.sleep(0.05)  # the cluster bus's gossip: nothing to wait on but its state
            finally:
                client.close()

    def primaries(self) -> list[RedisServer]:
        """The servers that are primaries now."""
        out = []
        for server in self.servers:
            client = server.client()
            try:
                if client.info("replication")["role"] == "master":
                    out.append(server)
            finally:
                client.close()
        return out

    def flushall(self) -> None:
        """Empty every primary (replicas follow)."""
        for server in self.primaries():
            client = server.client()
            try:
                client.flushall()
            finally:
                client.close()

    def errorstats(self) -> dict[str, int]:
        """Error replies by code (``INFO errorstats``), summed over every node."""
        totals: dict[str, int] = {}
        for server in self.servers:
            client = server.client()
            try:
                for name, value in client.info("errorstats").items():
                    code = name.removeprefix("errorstat_")
                    totals[code] = totals.get(code, 0) + int(value["count"])
            finally:
                client.close()
        return totals

    def client(self) -> redis.RedisCluster:
        """A redis-py cluster client, for looking at what agentcomms wrote."""
        return redis.RedisCluster(host="127.0.0.1", port=self.servers[0].port)

    def stop(self) -> None:
        """Stop every node."""
        for server in self.servers:
            server.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
