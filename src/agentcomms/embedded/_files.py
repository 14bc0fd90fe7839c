"""Locks, state file, socket paths and process checks shared by the owned server, the leases and the supervisor."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentcomms.exceptions import EmbeddedRedisError

_MAX_UNIX_PATH = 100  # sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS); keep a margin
_STATE = "server.json"
_START_LOCK = "start.lock"
_USERS_LOCK = "users.lock"
_SUPERVISOR_LOCK = "supervisor.lock"
_SERVER_LOCK = "server.lock"
_SUPERVISOR_LOG = "supervisor.log"
_READY_GRACE = 5.0  # the supervisor gives up on its own after `timeout`; wait that much longer for its word


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
