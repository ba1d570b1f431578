#!/usr/bin/env bash
# Prepares everything the test suite needs beyond the Rust toolchain, idempotently:
#   .venv/   Python tools from scripts/requirements-test.txt (grpcio, grpcurl, ...)
#   .tools/  buf from npm (@bufbuild/buf), for `buf lint`
# Re-running is cheap: each part is rebuilt only when its pinned inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUF_VERSION=1.75.0

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

req_hash=$(sha256sum scripts/requirements-test.txt | cut -d' ' -f1)
if ! stamp_ok .venv/.lmx-stamp "$req_hash"; then
  echo "test-env: creating .venv" >&2
  rm -rf .venv
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
  echo "$req_hash" > .venv/.lmx-stamp
fi

if ! stamp_ok .tools/.lmx-stamp "$BUF_VERSION"; then
  echo "test-env: installing buf $BUF_VERSION into .tools" >&2
  rm -rf .tools
  mkdir -p .tools
  npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@$BUF_VERSION" >&2
  echo "$BUF_VERSION" > .tools/.lmx-stamp
fi
