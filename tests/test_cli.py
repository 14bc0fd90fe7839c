"""The command line, run as a user would: a real subprocess on a fresh folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agentcomms", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_starts_embedded_redis_and_round_trips(tmp_path: Path) -> None:
    result = run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout and "True" in result.stdout and "$2.4M" in result.stdout
    assert (tmp_path / ".agentcomms" / "appendonlydir").is_dir()  # AOF in the local folder
    assert not (tmp_path / ".agentcomms" / "redis.sock").exists()  # the server was stopped


def test_demo_with_unreachable_redis_fails_clearly(tmp_path: Path) -> None:
    result = run_cli("demo", cwd=tmp_path, env={"REDIS_URL": "redis://127.0.0.1:1"})
    assert result.returncode == 1
    assert "error:" in result.stderr and "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["schema"]])
def test_schema_prints_json(tmp_path: Path, command: list[str]) -> None:
    result = run_cli(*command, cwd=tmp_path)
    assert result.returncode == 0
    assert "AgentMessage" in json.loads(result.stdout)
