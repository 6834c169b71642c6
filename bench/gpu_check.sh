#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (H100/H200, torch 2.11+cu130, triton 3.6, no network).
# Builds the CUDA extension, runs the GPU tests, then the step benchmark on GPT-2 124M and TinyLlama-1.1B
# shapes at full size, fp32 and bf16: came_kernels.CAME backend=cuda / triton / torch against
# torch.optim.AdamW(fused=True), torch.optim.Adafactor and came-pytorch. The short table comes LAST.
# Target: < 8 minutes. Copy the table, with card/date/commit/command (printed under it), into bench/RESULTS.md.
#
#   bash bench/gpu_check.sh                  # everything
#   SKIP_BUILD=1 SKIP_TESTS=1 bash bench/gpu_check.sh   # benchmark only (machine still warm)
# Knobs: PYTHON (default python3: the bare `pip` there belongs to another Python), TESTS_K (pytest -k
# expression for the GPU tests), TEST_TIMEOUT / BENCH_TIMEOUT (seconds), BENCH_ARGS (extra args for step).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
OUT=bench/out/gpu
mkdir -p "$OUT"
t0=$SECONDS
status=0

echo "== $(date -Is) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== build (pip install --no-build-isolation --no-deps -e .: builds came_kernels._C)"
  if ! "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1; then
    echo "BUILD FAILED: last lines of $OUT/build.log"; tail -n 40 "$OUT/build.log"; status=1
  fi
  grep -a "came_kernels setup:" "$OUT/build.log" || true
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== optional wheels from .whl/ (e.g. came-pytorch)"
    "$PY" -m pip install --no-deps --no-index .whl/*.whl 2>&1 | tail -n 2
  fi
  echo "   build: $((SECONDS - t0)) s"
fi

"$PY" - <<'PY'
import torch, came_kernels
print("torch", torch.__version__, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for name, why in came_kernels.available_backends("cuda").items():
    print(f"   backend {name:6s}: {'available' if why is None else 'UNAVAILABLE: ' + why}")
try:
    import came_pytorch  # noqa: F401
    print("   came-pytorch: installed")
except ImportError:
    print("   came-pytorch: NOT installed (put its wheel in .whl/)")
PY

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests (pytest -k '${TESTS_K:-cuda or triton or gpu}')"
  t1=$SECONDS
  timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest tests -q -x -ra -k "${TESTS_K:-cuda or triton or gpu}" \
    >"$OUT/tests.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/tests.log"
  case $rc in
    0) echo "   tests passed ($((SECONDS - t1)) s)";;
    5) echo "   no test matched -k; set TESTS_K";;
    124) echo "   TESTS TIMED OUT after ${TEST_TIMEOUT:-200} s (full log: $OUT/tests.log)"; status=1;;
    *) echo "   TESTS FAILED (rc=$rc; full log: $OUT/tests.log)"; status=1;;
  esac
fi

echo "== step benchmark, full-size shapes, fp32 and bf16"
t1=$SECONDS
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m bench step --device cuda --sets gpt2,tinyllama --scale 1 \
  --dtype fp32,bf16 --optim 'came[cuda],came[triton],came[torch],adamw[fused],adafactor,came-pytorch' \
  --out "$OUT" ${BENCH_ARGS:-} >"$OUT/step.log" 2>&1
rc=$?
grep -a "^#" "$OUT/step.log" | head -n 12
[ $rc -eq 0 ] || { echo "BENCHMARK FAILED (rc=$rc):"; tail -n 30 "$OUT/step.log"; status=1; }
echo "   benchmark: $((SECONDS - t1)) s; total $((SECONDS - t0)) s"

echo
echo "== RESULT (bench/RESULTS.md: card, date, commit, command, table)"
if [ -f "$OUT/step.json" ]; then
  "$PY" -m bench step --show "$OUT/step.json"
fi
exit $status
