#!/usr/bin/env bash
# Builds, on a machine with no GPU and no CUDA toolkit, the lib's test binary and the GPU bench
# (benches/gpu.rs) with `--features cuda`, for a check on a machine with an NVIDIA GPU (CUDA 13 driver and runtime
# libraries there, no Rust toolchain needed). Idempotent; each part is redone only when needed:
#   .venv-cuda/        CUDA 13.0 nvcc, headers and the libraries to link against, from PyPI
#   .venv-cuda/cuda/   a CUDA_ROOT assembled from them, with a stub libcuda.so (the driver's
#                      library, linked by soname libcuda.so.1 and found on the GPU machine)
#   target-cuda/       the cargo target dir of the cuda build (release profile)
#   .gpu/              what travels to the GPU machine: lmx-tests.gz and gpu-bench.gz (the
#                      stripped binaries, ~75 MiB each, gzipped to ~20: candle's CUDA kernels
#                      are most of them) and run.sh
# Then prints the command to run there.
#
# CUDA 13.0 exactly: the GPU machine's driver (580) runs PTX of CUDA 13.0 at most, and candle
# loads its kernels as PTX. sm_90 (H100/H200): override with CUDA_COMPUTE_CAP.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

PYTHON=${PYTHON:-python3}
CUDA_WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
)
venv=$root/.venv-cuda
cuda=$venv/cuda
stamp="${CUDA_WHEELS[*]}"

if ! [ -f "$venv/.lmx-stamp" ] || [ "$(cat "$venv/.lmx-stamp")" != "$stamp" ]; then
  echo "gpu-check: installing the CUDA 13.0 toolkit wheels into .venv-cuda" >&2
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-compile \
    "${CUDA_WHEELS[@]}"
  echo "$stamp" > "$venv/.lmx-stamp"
fi

if ! [ -x "$cuda/bin/nvcc" ] || ! [ -f "$cuda/lib64/stubs/libcuda.so" ]; then
  echo "gpu-check: assembling .venv-cuda/cuda" >&2
  wheels=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
  rm -rf "$cuda"
  mkdir -p "$cuda/lib64/stubs"
  for d in bin include nvvm; do ln -s "$wheels/$d" "$cuda/$d"; done
  # Unversioned names for the linker (-lcublas, ...); the binary records the sonames.
  for lib in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
    ln -s "$wheels/lib/lib$lib" "$cuda/lib64/lib$lib"
    ln -s "$wheels/lib/lib$lib" "$cuda/lib64/lib${lib%.so.*}.so"
  done
  # The driver API is not on PyPI: a stub with every symbol cudarc's bindings declare.
  sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | head -1)
  if [ -z "$sys" ]; then
    cargo fetch --locked >&2
    sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | head -1)
  fi
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | sed 's/^pub unsafe fn //' | sort -u |
    awk '{print "int " $1 "(void) { return 100; /* CUDA_ERROR_NO_DEVICE */ }"}' > "$cuda/lib64/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib64/stubs/libcuda.so" \
    "$cuda/lib64/stubs/cuda_stub.c"
fi

export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export PATH=$cuda/bin:$PATH
export LD_LIBRARY_PATH=$cuda/lib64:$cuda/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CARGO_TARGET_DIR=$root/target-cuda

echo "gpu-check: cargo test --release --features cuda --lib --bench gpu --no-run" >&2
built=$(cargo test --locked --release --features cuda --lib --bench gpu --no-run --message-format=json |
  "$PYTHON" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = m["target"]["kind"]
        if "lib" in kind and m["profile"]["test"]:
            print("lib", m["executable"])
        elif "bench" in kind and m["target"]["name"] == "gpu":
            print("bench", m["executable"])
')
exe=$(awk '$1 == "lib" {print $2}' <<<"$built")
bench=$(awk '$1 == "bench" {print $2}' <<<"$built")
[ -n "$exe" ] && [ -n "$bench" ] || { echo "gpu-check: the test or bench executable was not built" >&2; exit 1; }

mkdir -p .gpu
rm -f .gpu/lmx-tests .gpu/lmx-tests.gz .gpu/gpu-bench.gz
strip -o target-cuda/lmx-tests "$exe"
gzip -6 -c target-cuda/lmx-tests > .gpu/lmx-tests.gz
strip -o target-cuda/gpu-bench "$bench"
gzip -6 -c target-cuda/gpu-bench > .gpu/gpu-bench.gz
cat > .gpu/run.sh <<'EOF'
#!/usr/bin/env bash
# On the GPU machine: puts the CUDA 13 libraries lmx-tests links (wherever that machine's
# PyTorch wheels or toolkit keep them) on LD_LIBRARY_PATH, then runs it with the GPU required.
#   run.sh tests [libtest args]   the lib's tests (the cuda_ ones on the GPU)
#   run.sh bench                  benches/gpu.rs (env GPU_BENCH_*), from the repo root
here=$(cd "$(dirname "$0")" && pwd)
what=${1:-tests}; shift || true
case $what in
  tests) exe=/tmp/lmx-tests; gz=$here/lmx-tests.gz ;;
  bench) exe=/tmp/gpu-bench; gz=$here/gpu-bench.gz ;;
  *) echo "run.sh: tests or bench, not $what" >&2; exit 2 ;;
esac
gzip -dc "$gz" > "$exe" && chmod +x "$exe" || exit 1
dirs=
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libcuda.so.1; do
  if ldconfig -p 2>/dev/null | grep -q "$lib "; then continue; fi
  found=$(find /usr/local/cuda* /usr/local/nvidia /opt /usr/lib /usr/local/lib -name "$lib" 2>/dev/null | head -1)
  if [ -n "$found" ]; then dirs=$dirs:$(dirname "$found"); else echo "run.sh: $lib not found" >&2; fi
done
dirs=${dirs#:}
export LD_LIBRARY_PATH=$dirs${dirs:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}
echo "run.sh: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
if ldd "$exe" | grep 'not found' >&2; then exit 127; fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
if [ "$what" = bench ]; then exec "$exe"; fi
LMX_REQUIRE_CUDA=1 exec "$exe" "$@"
EOF
chmod +x .gpu/run.sh

size=$(($(stat -c %s .gpu/lmx-tests.gz) + $(stat -c %s .gpu/gpu-bench.gz)))
echo "gpu-check: .gpu/lmx-tests.gz and gpu-bench.gz are $((size / 1024 / 1024)) MiB together (from $exe and $bench)" >&2
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo "gpu-check: over 60 MiB; it will not travel" >&2
  exit 1
fi
cat <<'EOF'
On the GPU machine (device tool `run`, carry [".gpu"], timeout_s 300), from the repo root:
  bash .gpu/run.sh tests --test-threads 1 --nocapture cuda
  bash .gpu/run.sh bench
The first runs every cuda_ test of the lib (on the GPU; LMX_REQUIRE_CUDA=1 turns their skips
into failures when the GPU cannot be used); the second, benches/gpu.rs against PyTorch +
transformers (scripts/gpu_peer.py, with the machine's python3).
EOF
