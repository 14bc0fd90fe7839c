#!/usr/bin/env bash
# Lint, type-check and run the whole test suite. Installs into .venv on first use.
# Extra arguments go to pytest (e.g. scripts/test.sh -k broker -x).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
echo "== ruff"; "$venv/bin/ruff" check src tests benchmarks
"$venv/bin/ruff" format --check src tests benchmarks
echo "== mypy"; "$venv/bin/mypy"
echo "== pytest"; exec "$venv/bin/pytest" "$@"
