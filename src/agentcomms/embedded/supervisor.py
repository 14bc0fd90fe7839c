"""Supervisor of a shared embedded redis-server: ``python -m agentcomms.embedded.supervisor DATA_DIR``.

Started by :func:`agentcomms.embedded.acquire_embedded` (see that module's docstring for
the files, the locks and the races). It forks once at start so that it is not the
starter's child (the starter reaps the first process at once, the supervisor is
reparented), then:

1. takes ``supervisor.lock`` (``LOCK_EX``, for its whole life);
2. starts redis-server as its own child (an :class:`EmbeddedRedis`, which holds
   ``server.lock`` and passes it on to the server), records ``server.json`` and reports
   ``READY <state>`` on stdout (``PID <pid>`` first, ``ERROR <message>`` on failure), then
   sends its stdout to /dev/null;
3. waits for the first of: ``users.lock`` ``LOCK_EX`` (no lease left), the redis-server
   exiting, SIGTERM or SIGINT;
4. shuts Redis down cleanly, removes ``server.json`` and the socket, releases
   ``supervisor.lock``, and exits (dropping ``users.lock`` last, if it had it).

Its stderr is ``<data_dir>/supervisor.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agentcomms.embedded._files import (
    _SUPERVISOR_LOCK,
    _USERS_LOCK,
    _flock,
    _open_lock,
    _remove_stale_files,
    _write_state,
)
from agentcomms.embedded.server import EmbeddedRedis, find_redis_server

logger = logging.getLogger("agentcomms.supervisor")

_NO_USERS = b"u"
_REDIS_EXITED = b"r"


def _report(line: str) -> None:
    """One line to the starter; it may have gone (then nobody listens, and that is fine)."""
    with contextlib.suppress(OSError):
        os.write(1, (line + "\n").encode())


def _stop_reporting() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Nothing to do here: the wakeup fd tells the main loop."""


def _watch_users(users_lock: int, wake: int) -> None:
    fcntl.flock(users_lock, fcntl.LOCK_EX)  # granted when no lease is left; kept until exit
    os.write(wake, _NO_USERS)


def _watch_process(server: EmbeddedRedis, wake: int) -> None:
    process = server._process
    if process is not None:
        process.wait()
    os.write(wake, _REDIS_EXITED)


def _wait_for_the_end(server: EmbeddedRedis, users_lock: int, wake_read: int, wake_write: int) -> str:
    threading.Thread(target=_watch_users, args=(users_lock, wake_write), daemon=True).start()
    pid = server.pid
    if pid is None:
        return "redis-server exited"
    watched = [wake_read]
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(pid)
        watched.append(pidfd)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): a thread waits for the process
        threading.Thread(target=_watch_process, args=(server, wake_write), daemon=True).start()
    try:
        while True:
            readable, _, _ = select.select(watched, [], [])
            if pidfd is not None and pidfd in readable:
                return "redis-server exited"
            for byte in os.read(wake_read, 64):
                if byte == _NO_USERS[0]:
                    return "no users left"
                if byte == _REDIS_EXITED[0]:
                    return "redis-server exited"
                if byte in (signal.SIGTERM, signal.SIGINT):
                    return f"received {signal.Signals(byte).name}"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _version(server: EmbeddedRedis) -> str | None:
    client = server._client()
    try:
        return str(client.info("server")["redis_version"])
    except Exception:  # only informative
        return None
    finally:
        client.close()


def supervise(folder: Path, binary: str | None, timeout: float) -> int:
    """Run the shared server of ``folder`` until it is no longer needed (see the module docstring)."""
    deadline = time.monotonic() + timeout
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    supervisor_lock = _open_lock(folder / _SUPERVISOR_LOCK)
    # the starter checked that no supervisor runs; a status probe may hold LOCK_SH for an instant
    _flock(supervisor_lock, fcntl.LOCK_EX, deadline, f"another supervisor of {folder} to exit")
    users_lock = _open_lock(folder / _USERS_LOCK)
    binary = find_redis_server(binary)
    state: dict[str, Any] = {"supervisor_pid": os.getpid(), "data_dir": str(folder), "binary": binary, "ready": False}
    _write_state(folder, state)
    server = EmbeddedRedis(folder, binary=binary)
    try:
        server.start(timeout=max(deadline - time.monotonic(), 0.1))
    except BaseException:
        _remove_stale_files(folder, None)
        raise
    state.update(url=server.url, redis_pid=server.pid, version=_version(server), ready=True)
    _write_state(folder, state)
    logger.info("redis-server %s (pid %s) ready at %s", state["version"], server.pid, server.url)
    _report("READY " + json.dumps(state))
    _stop_reporting()

    reason = _wait_for_the_end(server, users_lock, wake_read, wake_write)
    logger.info("stopping redis-server: %s", reason)
    server.stop(timeout=timeout)
    _remove_stale_files(folder, state)  # before supervisor.lock goes: nobody else may have started a server
    os.close(supervisor_lock)
    logger.info("stopped")
    return 0  # users.lock, if we hold it, goes when the process exits: newcomers find a clean folder


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, fork away from the starter, supervise."""
    parser = argparse.ArgumentParser(prog="python -m agentcomms.embedded.supervisor")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--binary")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    if os.fork():
        os._exit(0)  # the starter reaps this one at once; the supervisor is no child of the starter
    _report(f"PID {os.getpid()}")
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s"
    )
    folder: Path = args.data_dir
    try:
        return supervise(folder, args.binary, args.timeout)
    except Exception as exc:
        logger.exception("failed")
        _report("ERROR " + json.dumps(str(exc)))
        return 1


if __name__ == "__main__":
    sys.exit(main())
