"""A redis-server that tests (and benchmarks/faults.py) can kill, restart, pause, fill and make load slowly.

Unlike the session's shared server, each one here is private to its test: on a fixed
loopback port, so that a restarted server is found at the same address, with AOF on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from agentcomms.embedded import find_redis_server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """Until 127.0.0.1:``port`` accepts connections, while ``process`` (the one that will listen) runs."""
    deadline = time.monotonic() + timeout
    while True:
        assert process is not None and process.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)  # a child process's port: nothing to wait on but the port itself


class RedisServer:
    """One redis-server process on 127.0.0.1:<port>, data (AOF) in ``directory``."""

    def __init__(self, directory: Path, *, port: int | None = None, binary: str | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.binary = find_redis_server(binary or os.environ.get("AGENTCOMMS_REDIS_SERVER"))
        self.process: subprocess.Popen[bytes] | None = None
        self.version = self._version()

    def _version(self) -> tuple[int, ...]:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=True).stdout
        text = out.split("v=", 1)[1].split()[0]
        return tuple(int(p) for p in text.split("."))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def listen_args(self) -> list[str]:
        """Where it listens (tlskit.TlsRedisServer: a TLS port instead)."""
        return ["--port", str(self.port)]

    def start(self, *, wait: bool = True, extra: Sequence[str] = ()) -> Self:
        """Start the server; with ``wait``, until it answers PING (its data loaded)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [self.binary, *self.listen_args(), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"]
        args += ["--logfile", str(self.directory / "redis.log"), *extra]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.wait_listening()
        if wait:
            self.wait_ready()
        return self

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Until the port accepts connections (the server may still be loading)."""
        wait_port(self.port, self.process, timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until PING answers PONG (not LOADING)."""
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.BusyLoadingError, redis.ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        finally:
            client.close()

    def slow_loading_args(self) -> list[str]:
        """Options that make a restart load slowly (each key ~60 µs) and answer LOADING meanwhile."""
        args = ["--key-load-delay", "1"]
        if self.version >= (7,):  # answer clients often while loading (6.2: every 2 MB of data)
            args += ["--loading-process-events-interval-bytes", "1024"]
        return args

    def loading(self) -> bool:
        """Whether the server is loading its data now (INFO answers while loading)."""
        client = self.client()
        try:
            return bool(client.info("persistence")["loading"])
        finally:
            client.close()

    def fill(self, keys: int, *, value_size: int = 16) -> None:
        """Write ``keys`` keys and rewrite the AOF, so that a restart loads them all."""
        client = self.client(timeout=120)
        try:
            client.eval(
                "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'fill:' .. i, ARGV[2]) end",
                0,
                keys,
                "x" * value_size,
            )
            client.config_set("rdbcompression", "no")  # the file's size is what paces loading
            client.bgrewriteaof()
            while True:  # the rewrite is the event: INFO reports its end
                info = client.info("persistence")
                if not info["aof_rewrite_in_progress"] and not info.get("aof_rewrite_scheduled"):
                    break
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """A clean shutdown: the AOF is flushed."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # redis-server flushes the AOF and exits on SIGTERM
        self.process.wait(30)

    def kill(self) -> None:
        """SIGKILL, as a crash (acknowledged writes of the last second may be lost: everysec)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the process is frozen, connections stay open (a stalled host)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.kill()
