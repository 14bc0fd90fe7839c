"""Each benchmark program runs at a tiny size, so that it cannot rot. No timing is asserted."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_benchmark(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_suite_runs_every_benchmark() -> None:
    output = run_benchmark("suite.py", "--quick")
    for section in ("Request/reply round trip", "One-way throughput", "Fan-out", "Discovery", "Replicas", "Memory"):
        assert section in output
    assert "floor" in output and "faststream" in output and "pubsub" in output


def test_discovery_benchmark_runs() -> None:
    output = run_benchmark("discovery.py", "--small", "10", "--large", "50", "--queries", "10", "--repeats", "1")
    assert "narrow: p50 at 50 / at 10 agents" in output


def test_faults_benchmark_quick_run(tmp_path: Path) -> None:
    if not glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") and not os.environ.get("CI"):
        pytest.skip("needs libfaketime (Debian package faketime) to step the agents' clock")
    output = run_benchmark("faults.py", "--quick", "--results", str(tmp_path))
    summary = json.loads((tmp_path / "faults.json").read_text())
    faults = summary["faults"]
    assert [f["fault"] for f in faults] == ["agent_kill", "redis_restart", "client_pause", "redis_down", "clock_step"]
    assert all(f["requests"]["misrouted"] == 0 for f in faults)
    assert all(f["requests"]["answered"] > 0 for f in faults)  # requests flowed through every fault
    assert faults[-1]["notes"]["agents' clock ahead by s (median)"] > 100  # the step really happened
    assert "goal" in output and (tmp_path / "faults-logs" / "requests.csv").exists()


def test_knowledge_benchmark_quick_run() -> None:
    output = run_benchmark("knowledge.py", "--quick")
    for section in ("recall@3", "documents/s", "over the bus", "Results outside the role's domains: 0."):
        assert section in output


def test_dashboard_benchmark_quick_run() -> None:
    output = run_benchmark("dashboard.py", "--quick")
    assert "| `sent` (20 events)" in output and "| `handled` (20 events)" in output


def test_scale_benchmark_quick_run() -> None:
    output = run_benchmark("scale.py", "--quick")
    for section in (
        "| 1 |", "| 2 |", "| 4 |", "Broadcast to 1,000 agents", "Narrow query p50 at 2,000 / at 100",
        "On a Redis Cluster of 3 primaries", "spread over the primaries", "| durable (WAIT 1) |",
    ):  # fmt: skip
        assert section in output
