#!/usr/bin/env bash
# The default test suite (no network, no GPU, no ../shared needed). Extra pytest args pass through,
# e.g. scripts/test.sh -m slow for the heavyweight suites.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest "$@"
