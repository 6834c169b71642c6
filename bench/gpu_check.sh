#!/usr/bin/env bash
# The one prepared script for a GPU machine (H100/H200, torch 2.11+cu130, triton 3.6, no network needed).
# 1. builds the CUDA extension (sm_90 by default: CAME_KERNELS_CUDA_ARCH),
# 2. runs the GPU tests in eight separate processes (an illegal address or a crash in one must not hide the
#    others' results) and the fused steps under compute-sanitizer (memcheck, racecheck),
# 3. the step benchmark on GPT-2 124M and TinyLlama-1.1B shapes at full size, fp32 and bf16: came_kernels.CAME
#    backend=cuda / triton / torch against torch.optim.AdamW(fused=True), torch.optim.Adafactor and came-pytorch;
#    then ResNet-50 (packed conv weights) and TinyLlama bf16 with the opt-in bf16 / int8 momentum,
# 4. the host time of step() with real launches (`bench host --device cuda`),
# 5. the per-phase kernel profile (achieved GB/s per phase against the copy bandwidth),
# 6. with SWEEP=1, the Triton tuning sweep (bench/triton_sweep.py; about a minute).
# The short tables come LAST. Copy them, with card/date/commit/command (printed under them), into
# bench/RESULTS.md.
#
#   bash bench/gpu_check.sh                              # everything, ~9 minutes on a fresh H200
#   SKIP_BENCH=1 bash bench/gpu_check.sh                 # build and tests only (~2 + 5 minutes)
#   SKIP_BUILD=1 SKIP_TESTS=1 bash bench/gpu_check.sh    # benchmarks only, on a machine that built (~2.5 minutes)
# Knobs: PYTHON (default python3: a bare `pip` may belong to another Python), LOG (log folder; default
# bench/out/gpu; with $OUT set, the folder is also archived into $OUT/gpu_check_logs.tgz at exit),
# TEST_TIMEOUT / BENCH_TIMEOUT / PHASES_TIMEOUT (seconds), BENCH_ARGS (extra args for `bench step`),
# EXTRA_TIMEOUT (ResNet-50 and low-precision momentum steps), SWEEP_TIMEOUT, HOST_TIMEOUT, SKIP_SANITIZER,
# SKIP_BENCH (every benchmark), SKIP_EXTRA, SKIP_HOST, SKIP_PHASES, SWEEP=1, PHASES_REF (an earlier
# phases.json: its times beside these when it comes from the same device; default the latest H200 run in
# bench/reference/). came-pytorch: installed from .whl/ if its wheel is there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
LOG="${LOG:-bench/out/gpu}"
mkdir -p "$LOG"
t0=$SECONDS
status=0
# With $OUT set (a folder that is collected after the run), every log and JSON goes there
# as one archive, also when the run is stopped at a time limit.
# After every stage too: a run killed at a time limit (SIGKILL runs no trap) still leaves the stages before.
pack() {  # (through a temporary name: a kill during tar leaves the previous archive whole)
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check_logs.part" -C "$(dirname "$LOG")" "$(basename "$LOG")" 2>/dev/null \
    && mv -f "$OUT/gpu_check_logs.part" "$OUT/gpu_check_logs.tgz"
}
trap pack EXIT
trap 'exit 124' INT TERM

echo "== $(date -Is) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== build (pip install --no-build-isolation --no-deps -e .: builds came_kernels._C and _host)"
  if ! CAME_KERNELS_CUDA_ARCH="${CAME_KERNELS_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
       "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$LOG/build.log" 2>&1; then
    echo "BUILD FAILED: last lines of $LOG/build.log"; tail -n 40 "$LOG/build.log"; status=1
  fi
  grep -a "came_kernels setup:" "$LOG/build.log" || true
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -n 2
  fi
  echo "   build: $((SECONDS - t0)) s"; pack
fi

"$PY" - <<'PY'
import torch, came_kernels
print("torch", torch.__version__, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for name, why in came_kernels.available_backends("cuda").items():
    print(f"   backend {name:6s}: {'available' if why is None else 'UNAVAILABLE: ' + why}")
from came_kernels import _fastpath
print(f"   per-step checks: {'C++ (came_kernels._host)' if _fastpath.native() else 'Python (_host NOT built)'}")
try:
    import came_pytorch  # noqa: F401
    print("   came-pytorch: installed")
except ImportError:
    print("   came-pytorch: NOT installed (put its wheel in .whl/)")
PY

if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== GPU tests (eight processes) and compute-sanitizer, in parallel"
  t1=$SECONDS
  TT="${TEST_TIMEOUT:-300}"
  # SIGINT at the time limit, so that pytest still prints which tests failed (a killed pytest loses its
  # buffered report); faulthandler dumps the stack of a test that hangs. Groups small enough to finish
  # within the limit on a fresh machine, where every Triton kernel variant compiles first.
  # Two CPU threads each: nine processes share the machine's cores, and torch's CPU work there (the float64
  # oracle, the grads' generator) would otherwise start as many threads as cores in every one of them.
  PT=(env OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 timeout -s INT -k 15 "$TT" "$PY" -u -m pytest -q -rfE --tb=short
      -p no:cacheprovider --durations=5 -o faulthandler_timeout=120)
  "${PT[@]}" tests/test_fused_backends.py -k triton >"$LOG/t_triton.log" 2>&1 & p1=$!
  # The extension's error paths in a process of their own: a crash there (as an H200 machine once showed)
  # must not take the other CUDA tests with it.
  ERR="checked_before_any_launch or never_crash or needs_the_sq_stats or is_named or freed_plan_is_refused"
  "${PT[@]}" tests/test_fused_backends.py tests/test_cuda_backend.py tests/test_compile.py -k "cuda and not ($ERR)" \
    >"$LOG/t_cuda.log" 2>&1 & p2=$!
  "${PT[@]}" tests/test_cuda_backend.py -k "$ERR" >"$LOG/t_cuda_errors.log" 2>&1 & p8=$!
  "${PT[@]}" tests/test_triton_backend.py tests/test_torch_backend.py tests/test_optimizer.py tests/test_distributed.py \
    tests/test_bench.py -k "cuda or triton or gpu or sweep" >"$LOG/t_other.log" 2>&1 & p3=$!
  "${PT[@]}" tests/test_capturable.py tests/test_compile.py -k "not cuda" >"$LOG/t_compile.log" 2>&1 & p4=$!
  "${PT[@]}" tests/test_bias_correction.py >"$LOG/t_bias.log" 2>&1 & p5=$!
  "${PT[@]}" tests/test_low_precision.py >"$LOG/t_lowbit.log" 2>&1 & p6=$!
  "${PT[@]}" tests/test_factor_conv.py tests/test_amp.py tests/test_host_fast_path.py tests/test_fastpath_native.py \
    >"$LOG/t_conv_amp.log" 2>&1 & p7=$!
  pids=("$p1" "$p2" "$p3" "$p4" "$p5" "$p6" "$p7" "$p8")
  names=(triton cuda other compile bias lowbit conv_amp cuda_errors)
  if [ -z "${SKIP_SANITIZER:-}" ] && command -v compute-sanitizer >/dev/null; then
    ( for tool in memcheck racecheck; do for b in cuda triton; do
        [ "$tool" = racecheck ] && [ "$b" = triton ] && continue  # racecheck: shared memory of our CUDA kernels
        echo "-- $tool $b"
        timeout "$TT" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" tests/gpu_sanitize.py "$b" 2>&1 \
          | grep -av "^========= *$" | tail -n 15
        echo "   rc=${PIPESTATUS[0]}"
      done; done ) >"$LOG/t_sanitizer.log" 2>&1 & pids+=($!); names+=(sanitizer)
  fi
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    f="$LOG/t_${names[$i]}.log"
    echo "-- ${names[$i]} (rc=$rc)"
    if [ "${names[$i]}" = sanitizer ]; then
      cat "$f"; grep -q "rc=[1-9]" "$f" && { echo "   SANITIZER FOUND ERRORS"; status=1; }
    else
      grep -aE "^(FAILED|ERROR)|passed|failed|error|Timeout" "$f" | tail -n 20
      case $rc in 0|5) ;; 124|130|137) echo "   TIMED OUT after $TT s"; status=1;; *) echo "   FAILED"; status=1;; esac
    fi
  done
  for f in "$LOG"/t_*.log; do echo "===== $(basename "$f")"; cat "$f"; echo; done >"$LOG/tests.log"
  rm -f "$LOG"/t_*.log  # fewer files to carry back
  echo "   tests: $((SECONDS - t1)) s (logs: $LOG/tests.log)"; pack
fi

if [ -n "${SKIP_BENCH:-}" ]; then
  SKIP_STEP=1 SKIP_EXTRA=1 SKIP_HOST=1 SKIP_PHASES=1 SWEEP=
fi

if [ -z "${SKIP_STEP:-}" ]; then
  echo "== step benchmark, full-size shapes, fp32 and bf16"
  t1=$SECONDS
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-240}" "$PY" -m bench step --device cuda --sets gpt2,tinyllama --scale 1 \
    --dtype fp32,bf16 --optim 'came[cuda],came[triton],came[torch],adamw[fused],adafactor,came-pytorch' \
    --out "$LOG" --no-plot ${BENCH_ARGS:-} >"$LOG/step.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { echo "BENCHMARK FAILED (rc=$rc):"; tail -n 30 "$LOG/step.log"; status=1; }
  echo "   step benchmark: $((SECONDS - t1)) s"; pack
fi

if [ -z "${SKIP_EXTRA:-}" ]; then
  echo "== step benchmark: ResNet-50 (packed conv weights, fp32) and the low-precision momentum (TinyLlama, bf16)"
  t1=$SECONDS
  timeout "${EXTRA_TIMEOUT:-90}" "$PY" -m bench step --device cuda --sets resnet50 --scale 1 --dtype fp32 \
    --optim 'came[cuda],came[triton],adamw[fused]' --out "$LOG/resnet50" --no-plot >"$LOG/step_resnet50.log" 2>&1 \
    || { echo "RESNET-50 BENCHMARK FAILED:"; tail -n 20 "$LOG/step_resnet50.log"; status=1; }
  timeout "${EXTRA_TIMEOUT:-90}" "$PY" -m bench step --device cuda --sets tinyllama --scale 1 --dtype bf16 \
    --optim 'came[cuda],came-bf16m[cuda],came-int8m[cuda],came-bf16m[triton],came-int8m[triton],adamw[fused]' \
    --out "$LOG/lowbit" --no-plot >"$LOG/step_lowbit.log" 2>&1 \
    || { echo "LOW-PRECISION BENCHMARK FAILED:"; tail -n 20 "$LOG/step_lowbit.log"; status=1; }
  echo "   extra steps: $((SECONDS - t1)) s"; pack
fi

if [ -z "${SKIP_HOST:-}" ]; then
  echo "== host time of step() with real launches (GPU synchronized before each timed step)"
  t1=$SECONDS
  timeout "${HOST_TIMEOUT:-100}" "$PY" -m bench host --device cuda --sets gpt2,tinyllama --iters 100 --warmup 10 \
    --out "$LOG" >"$LOG/host.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { echo "HOST BENCHMARK FAILED (rc=$rc):"; tail -n 20 "$LOG/host.log"; status=1; }
  echo "   host: $((SECONDS - t1)) s"; pack
fi

if [ -z "${SKIP_PHASES:-}" ]; then
  echo "== per-phase kernel profile"
  t1=$SECONDS
  timeout "${PHASES_TIMEOUT:-120}" "$PY" -m bench phases --out "$LOG" >"$LOG/phases.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { echo "PHASE PROFILE FAILED (rc=$rc):"; tail -n 20 "$LOG/phases.log"; status=1; }
  # The opt-in low-precision momentum, phase by phase, beside the fp32 one (TinyLlama, bf16 params)
  timeout "${PHASES_TIMEOUT:-120}" "$PY" -m bench phases --sets tinyllama --dtype bf16 \
    --optim 'came[cuda],came-bf16m[cuda],came-int8m[cuda],came-bf16m[triton],came-int8m[triton]' \
    --out "$LOG/lowbit" >"$LOG/phases_lowbit.log" 2>&1 \
    || { echo "LOW-PRECISION PHASE PROFILE FAILED:"; tail -n 20 "$LOG/phases_lowbit.log"; }
  echo "   phases: $((SECONDS - t1)) s"; pack
fi

if [ -n "${SWEEP:-}" ]; then
  echo "== Triton tuning sweep (pipeline depth, 2-byte read tile, slab, finalize tile) and its checks"
  t1=$SECONDS
  timeout "${SWEEP_TIMEOUT:-120}" "$PY" -m bench.triton_sweep >"$LOG/sweep.log" 2>&1
  rc=$?
  tail -n 40 "$LOG/sweep.log"
  [ $rc -eq 0 ] || { echo "SWEEP FAILED OR TIMED OUT (rc=$rc)"; }
  echo "   sweep: $((SECONDS - t1)) s"; pack
fi

echo
echo "== RESULT (total $((SECONDS - t0)) s; bench/RESULTS.md: card, date, commit, command, tables)"
[ -f "$LOG/phases.json" ] && "$PY" -m bench phases --show "$LOG/phases.json" \
  --compare "${PHASES_REF:-bench/reference/phases_h200_07530bb.json}"
[ -f "$LOG/lowbit/phases.json" ] && "$PY" -m bench phases --show "$LOG/lowbit/phases.json" | grep -a "^|"
[ -f "$LOG/host.log" ] && grep -a "^|" "$LOG/host.log"
[ -f "$LOG/step.json" ] && "$PY" -m bench step --show "$LOG/step.json"
for extra in resnet50 lowbit; do
  [ -f "$LOG/$extra/step.json" ] && "$PY" -m bench step --show "$LOG/$extra/step.json" | grep -a "^|"
done
exit $status
