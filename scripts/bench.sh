#!/usr/bin/env bash
# The benchmark suite (see docs/benchmarks.md). Installs into .venv on first use.
# Arguments go to benchmarks/suite.py, e.g. --quick, --repeats 7, --uvloop, --write-docs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec "$venv/bin/python" benchmarks/suite.py "$@"
