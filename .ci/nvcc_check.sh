#!/usr/bin/env bash
# Compile check of the CUDA kernels; needs nvcc, not a GPU.
#  1. csrc/cuda/nvcc_check.cu (every .cuh, every launcher instantiated for fp32/fp16/bf16) for sm_80 and
#     sm_90a, with the defines torch's cpp_extension passes to nvcc.
#  2. With SPECEE_NVCC_CHECK_BINDINGS=1 (off by default: it doubles the ~40 CPU-seconds of step 1), in
#     parallel, when torch's headers include c10/cuda (CPU wheels ship them too): the torch bindings
#     csrc/cuda/ops_cuda.cu, to PTX for compute_90a. A CPU wheel lacks the CMake-generated
#     c10/cuda/impl/cuda_cmake_macros.h; a one-line stub stands in for it.
# Prints one line per step on success; on failure prints the compiler output and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -x "$c" ]; then NVCC=$c; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "nvcc_check: FAILED: nvcc not found on PATH or in /usr/local/cuda*/bin" >&2
  exit 1
fi

tmp=$(mktemp -d /tmp/specee_nvcc_check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
# The defines torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS).
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

bindings_pid=""
if [ "${SPECEE_NVCC_CHECK_BINDINGS:-0}" = "1" ]; then
  TI=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
  if [ -n "$TI" ] && [ -f "$TI/c10/cuda/CUDAGuard.h" ]; then
    mkdir -p "$tmp/shim/c10/cuda/impl"
    if [ ! -f "$TI/c10/cuda/impl/cuda_cmake_macros.h" ]; then
      printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
    fi
    "$NVCC" -std=c++17 -O3 -DSPECEE_WITH_CUDA=1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      "${TORCH_NVCC_DEFINES[@]}" -Xcompiler -fPIC -Icsrc -I"$TI" -I"$TI/torch/csrc/api/include" -I"$tmp/shim" \
      -gencode arch=compute_90a,code=compute_90a -c csrc/cuda/ops_cuda.cu -o "$tmp/ops_cuda.o" \
      > "$tmp/bindings.log" 2>&1 &
    bindings_pid=$!
  else
    echo "nvcc_check: torch headers with c10/cuda not found: csrc/cuda/ops_cuda.cu not compile-checked"
  fi
fi

kernels_ok=1
"$NVCC" -std=c++17 -O3 --threads 2 "${TORCH_NVCC_DEFINES[@]}" \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
  -c csrc/cuda/nvcc_check.cu -o "$tmp/nvcc_check.o" > "$tmp/kernels.log" 2>&1 || kernels_ok=0

bindings_ok=1
if [ -n "$bindings_pid" ]; then wait "$bindings_pid" || bindings_ok=0; fi

if [ "$kernels_ok" = 0 ]; then
  cat "$tmp/kernels.log" >&2
  echo "nvcc_check: FAILED: csrc/cuda/nvcc_check.cu does not compile ($NVCC)" >&2
fi
if [ "$bindings_ok" = 0 ]; then
  cat "$tmp/bindings.log" >&2
  echo "nvcc_check: FAILED: csrc/cuda/ops_cuda.cu does not compile against $TI" >&2
fi
[ "$kernels_ok" = 1 ] && [ "$bindings_ok" = 1 ] || exit 1

if grep -qi "warning" "$tmp/kernels.log"; then cat "$tmp/kernels.log"; fi
took=$(( $(date +%s) - start ))
echo "nvcc_check: OK: CUDA kernels compile for sm_80 and sm_90a ($("$NVCC" --version | tail -1)), ${took} s"
if [ -n "$bindings_pid" ]; then echo "nvcc_check: OK: csrc/cuda/ops_cuda.cu compiles against the torch headers in $TI"; fi
