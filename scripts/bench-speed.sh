#!/usr/bin/env bash
# lmx against llama.cpp and transformers on the same weights, in one run:
#   scripts/bench-speed.sh
# Prepares, idempotently:
#   .cache/models/   SmolLM2-135M-Instruct Q4_1 GGUF (scripts/test-env.sh, when it is missing)
#   .venv-bench/     llama-cpp-python built from source for this CPU's SIMD flags, gguf, numpy,
#                    torch and transformers (pins below; first run: ~10 min of compiling and
#                    ~3 GB of wheels, torch from PyPI brings CUDA libraries it does not use here)
# then runs `cargo bench --bench speed`, which prints the machine, the figures of every engine and
# a markdown table. Environment:
#   LMX_BENCH_RUNS (3), LMX_BENCH_NEW_TOKENS (128): measured runs per engine, tokens per run.
#   LMX_BENCH_RETRIES (1): measure an engine again when other processes took >10% of the CPU.
#   LMX_BENCH_SKIP_VENV=1: use an existing LMX_BENCH_PYTHON instead of preparing .venv-bench.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON=0.3.36
PINS="gguf==0.19.0 numpy==2.4.6 torch==2.15.0 transformers==5.24.0"

# llama.cpp's CPU flags from /proc/cpuinfo: GGML_NATIVE=OFF (-march=native crashed on Q4_1 on an
# AMX machine), every SIMD extension this CPU has switched on by name. AMX stays off: untested.
cmake_args() {
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  local args="-DGGML_NATIVE=OFF"
  local pair
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if [[ $flags == *" ${pair%%:*} "* ]]; then
      args+=" -DGGML_${pair##*:}=ON"
    fi
  done
  echo "$args -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
}

if [ ! -f .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  scripts/test-env.sh
fi

if [ "${LMX_BENCH_SKIP_VENV:-}" != 1 ]; then
  CMAKE_ARGS=$(cmake_args)
  stamp="llama-cpp-python==$LLAMA_CPP_PYTHON $PINS; $CMAKE_ARGS"
  if [ ! -f .venv-bench/.lmx-stamp ] || [ "$(cat .venv-bench/.lmx-stamp)" != "$stamp" ]; then
    echo "bench-speed: preparing .venv-bench (llama.cpp compiles for a few minutes)" >&2
    echo "bench-speed: CMAKE_ARGS=$CMAKE_ARGS" >&2
    rm -rf .venv-bench
    "$PYTHON" -m venv .venv-bench
    .venv-bench/bin/pip install --quiet --disable-pip-version-check $PINS
    # --no-cache-dir: a wheel built earlier with other flags must not be reused.
    CMAKE_ARGS=$CMAKE_ARGS FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      .venv-bench/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
    echo "$stamp" > .venv-bench/.lmx-stamp
  fi
  export LMX_BENCH_PYTHON=$PWD/.venv-bench/bin/python
fi

exec cargo bench --bench speed
