#!/usr/bin/env bash
# Build and link the whole CUDA extension came_kernels._C without a GPU, then load it and check its ops.
#
# A CPU torch cannot link a CUDA extension, so this uses a second venv with a CUDA 13.0 build of torch
# (torch==2.14.1, ~5.4 GB, ~75 s to install from a local wheel cache), kept OUTSIDE the
# checkout and reused between runs ($CAME_CUDA_VENV, default ~/.cache/came_kernels/cuda-venv). The build
# itself goes to a temp dir (~2 min on 2 cores). This catches what a compile-only check cannot: link errors,
# the C++ standard torch's headers demand, op registration at import.
#
# nvcc absent: says so loudly and exits 0 (nothing to build with). nvcc present and anything fails: exits 1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CAME_CUDA_VENV:-$HOME/.cache/came_kernels/cuda-venv}"
TORCH_PIN="torch==2.14.1"

if [[ -z "${CUDA_HOME:-}" ]]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [[ -x "$d/bin/nvcc" && -f "$d/include/cuda_runtime.h" ]]; then export CUDA_HOME="$d"; break; fi
  done
fi
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "################################################################################"
  echo "# build_cuda.sh: NO CUDA toolkit found: the extension was NOT built or linked."
  echo "################################################################################"
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_PIN#torch==}')" 2>/dev/null; then
  echo "build_cuda.sh: creating $VENV with $TORCH_PIN (CUDA build; once, then reused)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_PIN" setuptools wheel ninja
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
t0=$(date +%s)
echo "build_cuda.sh: building came_kernels._C with $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'), CUDA_HOME=$CUDA_HOME"
cd "$ROOT"
if ! CAME_KERNELS_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext \
      --build-lib "$OUT/lib" --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1; then
  cat "$OUT/build.log"
  echo "build_cuda.sh: BUILD FAILED" >&2
  exit 1
fi
rm -rf "$ROOT/build"  # setup.py may leave an egg-info/build dir behind; keep the checkout clean
so="$(ls "$OUT"/lib/came_kernels/_C*.so)"
"$VENV/bin/python" - "$so" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
ops = ["came_step", "came_step_lowbit", "came_plan_create", "came_plan_create_lowbit", "came_plan_step",
       "came_plan_free", "sq_stats", "clip_stats", "momentum_res", "param_step"]
missing = [n for n in ops if not hasattr(torch.ops.came_kernels, n)]
assert not missing, f"ops not registered: {missing}"
print(f"build_cuda.sh: linked and loaded {sys.argv[1].rsplit('/', 1)[-1]}; ops: {', '.join(ops)}")
PY
echo "build_cuda.sh: ok in $(( $(date +%s) - t0 )) s"
