"""One redis-server per data folder, shared by every process that uses it, run by a supervisor (see the package)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agentcomms.embedded._files import (
    _READY_GRACE,
    _SERVER_LOCK,
    _START_LOCK,
    _SUPERVISOR_LOCK,
    _SUPERVISOR_LOG,
    _USERS_LOCK,
    _answers,
    _flock,
    _lock_is_free,
    _locked,
    _open_lock,
    _process_runs,
    _read_state,
    _remove_stale_files,
    _try_flock,
)
from agentcomms.embedded.server import _tail, find_redis_server
from agentcomms.exceptions import EmbeddedRedisError

__all__ = ["EmbeddedLease", "EmbeddedStatus", "acquire_embedded", "embedded_status", "stop_embedded"]

logger = logging.getLogger("agentcomms.embedded")

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
    command = [sys.executable, "-m", "agentcomms.embedded.supervisor", str(folder), "--timeout", f"{timeout:.3f}"]
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
        if supervisor_pid is not None and _process_runs(supervisor_pid, "agentcomms.embedded.supervisor"):
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
    if not _process_runs(state.get("supervisor_pid"), "agentcomms.embedded.supervisor"):
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
                if _process_runs(pid, "agentcomms.embedded.supervisor"):
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
