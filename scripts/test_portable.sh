#!/usr/bin/env bash
# The portable-runner suite: the same job on Beam's Prism runner (built from Go) vs the DirectRunner.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PETSCORE_PRISM="$(scripts/build_prism.sh)"
export PETSCORE_PRISM TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -m slow tests/pipeline/test_portable.py "$@"
