#!/usr/bin/env bash
# Compile-check every csrc/*.cu, csrc/*.cpp and csrc/host/*.cpp with nvcc for sm_80 and sm_90, against the
# headers of the torch that PYTHON (first argument, else $PYTHON, else python3) imports. Works with a
# CPU-only torch wheel: the one generated header such a wheel lacks (c10/cuda/impl/cuda_cmake_macros.h)
# comes from a stand-in under tests/cuda_host/include, which is on the include path only here.
#
# Fails on any compiler error or warning in our code: nvcc `-Werror all-warnings` (device-side and nvcc's own
# warnings) and host `-Wall -Wextra -Werror`. torch's and Python's headers are -isystem, so their own warnings
# are not ours to fix. C++20 as torch's cpp_extension uses (torch 2.14's headers need it). Same defines as torch's CUDAExtension (COMMON_NVCC_FLAGS, the C++ ABI flag), no
# --use_fast_math. Every kernel (ptxas entry function, each arch and instantiation) must also be free of
# register spills: ptxas -v's report is parsed (the toolkit's own non-inlined helpers, such as the slow path
# of IEEE division, are not ours and not counted; a stack frame without spills, a local array, is allowed). Objects go to a temp dir and are thrown away: this is a compile check, not a build (a
# CPU torch cannot link a CUDA extension; setup.py builds the real one on a GPU machine).
#
# nvcc absent: says so loudly and exits 0 (CI machines without a toolkit cannot check; that is reported, not
# hidden). nvcc present and anything fails: exits 1. Jobs run in parallel ($JOBS, default 2: CI has 2 cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-${PYTHON:-python3}}"
JOBS="${JOBS:-2}"
ARCHS="${CAME_CHECK_ARCHS:-80 90}"  # CAME_CHECK_SOURCES="ops.cpp sq_stats.cu": only those files

if [[ -z "${CUDA_HOME:-}" ]]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [[ -x "$d/bin/nvcc" ]]; then CUDA_HOME="$d"; break; fi
  done
fi
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/nvcc}"
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "################################################################################"
  echo "# check_cuda.sh: NO nvcc FOUND (not at \$CUDA_HOME/bin/nvcc, /usr/local/cuda-13.0 or /usr/local/cuda)."
  echo "# The CUDA sources in csrc/ were NOT compile-checked."
  echo "################################################################################"
  exit 0
fi

# torch's include paths, Python's, the ABI flag and torch's nvcc defines, from the python under test.
mapfile -t PYINFO < <("$PY" - <<'EOF'
import sysconfig, torch
from torch.utils import cpp_extension as c
print(" ".join("-isystem " + p for p in c.include_paths() + [sysconfig.get_paths()["include"]]))
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(" ".join(c.COMMON_NVCC_FLAGS))
print(torch.__version__)
EOF
)
INCLUDES="${PYINFO[0]}"
ABI="${PYINFO[1]}"
TORCH_NVCC_FLAGS="${PYINFO[2]}"
GENCODE=""
for a in $ARCHS; do GENCODE+=" -gencode=arch=compute_$a,code=sm_$a"; done

# The stand-in header's dir goes after torch's, so a CUDA build of torch uses its own generated header.
COMMON="-std=c++20 -O3 -I$ROOT/csrc $INCLUDES -isystem $ROOT/tests/cuda_host/include -isystem $CUDA_HOME/include \
  $ABI -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C"
HOST_WARN="-Wall,-Wextra,-Werror"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

echo "check_cuda.sh: $("$NVCC" --version | tail -1); torch ${PYINFO[3]} headers; sm: $ARCHS; $JOBS jobs"
compile_one() {
  local src="$1" name log t0 rc
  name="$(basename "$src")"
  log="$OUT/$name.log"
  t0=$(date +%s)
  rc=0
  if [[ "$src" == *.cu ]]; then
    # shellcheck disable=SC2086
    "$NVCC" -c "$src" -o "$OUT/$name.o" $COMMON $TORCH_NVCC_FLAGS $GENCODE -lineinfo -Xptxas -v \
      -Werror all-warnings -Xcompiler "$HOST_WARN" >"$log.ptxas" 2>&1 || rc=$?
    # ptxas info lines out of the log; a kernel with spills goes in, as a failure
    awk '
      /^ptxas info *: Compiling entry function/ { split($0, q, "'"'"'"); entry[q[2]] = 1; next }
      /^ptxas info *: Function properties for / { fn = $0; sub(/.*Function properties for /, "", fn); next }
      /bytes stack frame/ {
        if ((fn in entry) && ($5 != 0 || $9 != 0)) print "register spills in kernel " fn ":" $0
        fn = ""; next
      }
      /^ptxas info/ { next }
      { print }' "$log.ptxas" >"$log"
  else
    # .cpp: the host compiler through nvcc (same include handling as the .cu files)
    # shellcheck disable=SC2086
    "$NVCC" -x c++ -c "$src" -o "$OUT/$name.o" $COMMON -Xcompiler "$HOST_WARN,-fPIC" >"$log" 2>&1 || rc=$?
  fi
  if [[ $rc -ne 0 || -s "$log" ]]; then
    # one write, so parallel jobs do not interleave their logs
    printf 'FAIL %s (%s s):\n%s\n' "$name" "$(( $(date +%s) - t0 ))" "$(cat "$log")"
    return 1
  fi
  echo "ok   $name ($(( $(date +%s) - t0 )) s)"
}
export -f compile_one
export NVCC COMMON TORCH_NVCC_FLAGS GENCODE HOST_WARN OUT

T0=$(date +%s)
shopt -s nullglob
SOURCES="$(printf '%s\n' "$ROOT"/csrc/*.cu "$ROOT"/csrc/*.cpp "$ROOT"/csrc/host/*.cpp)"
if [[ -n "${CAME_CHECK_SOURCES:-}" ]]; then  # a quicker check of some files while working on them (names in csrc/)
  SOURCES="$(for f in $CAME_CHECK_SOURCES; do printf '%s\n' "$ROOT/csrc/$f"; done)"
fi
if [[ -z "$SOURCES" ]]; then echo "check_cuda.sh: FAILED: no sources in $ROOT/csrc"; exit 1; fi
# Longest first would be nicer; alphabetical is deterministic and the files are of similar size.
if ! printf '%s\n' $SOURCES | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}; then
  echo "check_cuda.sh: FAILED: csrc/ does not compile cleanly with nvcc (see above)."
  exit 1
fi
echo "check_cuda.sh: all $(printf '%s\n' $SOURCES | wc -l) sources compile cleanly ($(( $(date +%s) - T0 )) s)."
