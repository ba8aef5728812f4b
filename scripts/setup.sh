#!/usr/bin/env bash
# Create .venv and install petscore with every dependency pinned (requirements + constraints).
# Needs only Python 3.11-3.12 with venv and the PyPI registry; idempotent and quiet when done before.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
  echo "petscore needs Python 3.11 or 3.12 ($PYTHON is $("$PYTHON" -V 2>&1)): run with PYTHON=python3.11 or python3.12" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.petscore-installed
wanted=$(cat requirements.txt requirements-dev.txt requirements-jax.txt constraints.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r requirements.txt -r requirements-dev.txt -r requirements-jax.txt -c constraints.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$wanted" > "$stamp"
fi
