#!/usr/bin/env bash
# Run the demo on the embedded Redis (or on REDIS_URL if set). Installs into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec "$venv/bin/agentcomms" demo "$@"
