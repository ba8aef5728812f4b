#!/usr/bin/env bash
# Build Beam's Prism portable runner (Go) at the Beam version the project pins, into .cache/prism/.
# Needs Go >= 1.24 and the Go module proxy; used by the portable-runner tests (scripts/test_portable.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
version="$(sed -n 's/^apache-beam\[gcp\]==\(.*\)$/\1/p' requirements.txt)"
target=".cache/prism/prism-$version"
if [ ! -x "$target" ]; then
  mkdir -p .cache/prism
  GOBIN="$PWD/.cache/prism/bin" go install "github.com/apache/beam/sdks/v2/go/cmd/prism@v$version"
  mv .cache/prism/bin/prism "$target"
fi
echo "$PWD/$target"
