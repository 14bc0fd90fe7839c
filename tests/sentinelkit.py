"""A real Sentinel setup on loopback ports: a primary, a replica and three sentinels watching them.

Used by tests/test_sentinel.py (kill -9 of the primary while requests flow) and
benchmarks/durable.py (the cost of a durable send, ``WAIT`` for the replica).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import redis

from faultkit import RedisServer, free_port, wait_port

SERVICE = "agentcomms"
"""The name the sentinels know the primary by."""


class Sentinel:
    """One ``redis-server --sentinel`` process on 127.0.0.1:<port>."""

    def __init__(self, directory: Path, binary: str, primary_port: int, *, quorum: int = 2) -> None:
        self.directory = directory
        self.port = free_port()
        self.binary = binary
        self.primary_port = primary_port
        self.quorum = quorum
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"  # a sentinel rewrites its own file: one each
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel", "--logfile", str(self.directory / "sentinel.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process)

    def primary(self) -> tuple[str, int] | None:
        """Where this sentinel says the primary is."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            found = cast(tuple[bytes | str, int] | None, client.sentinel_get_master_addr_by_name(SERVICE))
        finally:
            client.close()
        return (found[0].decode() if isinstance(found[0], bytes) else str(found[0]), int(found[1])) if found else None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class SentinelKit:
    """A primary, one replica, three sentinels (quorum 2, primary taken for down after 1 s)."""

    def __init__(self, directory: Path) -> None:
        self.primary = RedisServer(directory / "primary")
        self.replica = RedisServer(directory / "replica")
        self.sentinels = [
            Sentinel(directory / f"sentinel{n}", self.primary.binary, self.primary.port) for n in range(3)
        ]

    @property
    def url(self) -> str:
        """The URL agentcomms is given: the sentinels and the service name."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> Self:
        self.primary.start()
        self.replica.start(extra=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.wait_replicated()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_watching()
        return self

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Until the replica's link to the primary is up."""
        deadline = time.monotonic() + timeout
        client = self.replica.client()
        try:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not connect to the primary")
                time.sleep(0.02)  # replication's own state: nothing to wait on but INFO
        finally:
            client.close()

    def wait_watching(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the replica and the other sentinels (so that a failover can happen)."""
        deadline = time.monotonic() + timeout
        for sentinel in self.sentinels:
            client = redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=5)
            try:
                while True:
                    fields = cast(dict[str, Any], client.sentinel_master(SERVICE))
                    if int(fields["num-slaves"]) >= 1 and int(fields["num-other-sentinels"]) >= 2:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"sentinel on {sentinel.port} is not ready: {fields}")
                    time.sleep(0.05)  # the sentinels' gossip: nothing to wait on but their state
            finally:
                client.close()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.kill()
        self.primary.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
