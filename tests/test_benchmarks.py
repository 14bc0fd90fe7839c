"""Each benchmark program runs at a tiny size, so that it cannot rot. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
