#!/usr/bin/env bash
# README's test command: prepares what the tests need, then runs every check CI runs.
#   formatting, clippy (-D warnings), buf lint, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-env.sh

export LMX_TEST_VENV="$PWD/.venv"
# Tests that drive external tools fail instead of skipping when those are missing.
export LMX_REQUIRE_TOOLS=1

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --locked --all-targets -- -D warnings
echo "== buf lint" >&2
.tools/node_modules/.bin/buf lint
echo "== deploy/ (kustomize render, Kubernetes schemas, hadolint)" >&2
scripts/validate-deploy.sh
echo "== cargo test" >&2
cargo test --locked "$@"
