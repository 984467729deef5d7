#!/usr/bin/env bash
# The first (and every) run on a GPU machine, in under 8 minutes: installs the prebuilt wheel from
# ./dist (--no-deps: the machine has torch and no internet), then, each step time-limited and
# logged under $OUT (default ./gpu-results):
#   env          GPU, driver, Python, torch and CUDA versions (nvidia-smi, torch)
#   install      pip install --no-deps --force-reinstall dist/<wheel>
#   doctor       python -m inplace_abn doctor (which libraries load, and why not)
#   tests        the GPU tests: tests/test_cuda.py, and the module tests on "cuda"
#   memcheck     compute-sanitizer --tool memcheck on a small case of every kernel path
#   racecheck    compute-sanitizer --tool racecheck on the same (shared-memory hazards)
#   benchmark    benchmarks/gpu_layer.py on a subset of shapes (JSON + table), ResNet-like peak memory
# A step that fails or runs out of time is recorded and the next one runs; summary.txt lists each
# step's status and seconds, and the exit status is that of the first failed step (0: all passed).
# Needs Python with torch (a CUDA build), pytest, numpy; compute-sanitizer is optional (PATH or
# $CUDA_HOME/bin). Run it from the repository root (tests/ and benchmarks/ are read from here).
#
#   bash scripts/gpu_check.sh                     # OUT=./gpu-results PYTHON=python3
#   OUT=/tmp/out PYTHON=.venv/bin/python bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-./gpu-results}
PYTHON=${PYTHON:-python3}
TOTAL_LIMIT=${GPU_CHECK_SECONDS:-470}  # all steps together: under 8 minutes
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
started=$SECONDS
status=0
: > "$OUT/summary.txt"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with at most LIMIT seconds (less if the total
# budget is nearly spent), output to $OUT/NAME.log and the terminal.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_LIMIT - (SECONDS - started)))
  if [ "$left" -lt 10 ]; then
    echo "$name: SKIPPED (time budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  printf '\n######## %s (limit %d s)\n' "$name" "$limit"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  rc=$?
  local result=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    result="TIMED OUT after $limit s"
  elif [ "$rc" -ne 0 ]; then
    result="FAILED (exit $rc)"
  fi
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  echo "$name: $result, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c "
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  '$PYTHON' -c '
import json, platform, sys, torch
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
info = {\"python\": sys.version.split()[0], \"platform\": platform.platform(), \"torch\": torch.__version__,
        \"cuda\": torch.version.cuda, \"gpu\": p.name if p else None,
        \"compute_capability\": f\"{p.major}.{p.minor}\" if p else None,
        \"multiprocessors\": p.multi_processor_count if p else None}
print(json.dumps(info, indent=1))
json.dump(info, open(\"$OUT/env.json\", \"w\"), indent=1)
'"

wheels=(dist/*.whl)
if [ ! -e "${wheels[0]}" ]; then
  echo "install: FAILED (no wheel in ./dist)" | tee -a "$OUT/summary.txt"
  status=1
else
  # Prefer a CUDA 13 wheel (torch 2.11+cu130), else the first one.
  wheel=${wheels[0]}
  for w in "${wheels[@]}"; do
    case $w in *cu13*) wheel=$w ;; esac
  done
  step install 60 "$PYTHON" -m pip install --no-deps --force-reinstall --no-index "$wheel"
fi

step doctor 30 "$PYTHON" -m inplace_abn doctor

step tests 110 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_correctness.py \
  tests/test_ops.py tests/test_api.py -k "cuda or test_cuda" --junitxml="$OUT/tests.xml"

# A small case of every kernel path: NCHW and channels_last, 7x7 planes, a misaligned view, a channel
# slice, 16-bit and float32, statistics split over several blocks, every operator.
cat > "$OUT/small_case.py" << 'EOF'
import torch

import inplace_abn  # noqa: F401  (loads the native libraries)

lib = torch.ops.inplace_abn
for dtype in (torch.float32, torch.bfloat16):
    for shape, layout in (((4, 8, 7, 7), "nchw"), ((2, 16, 33, 30), "channels_last"), ((3, 8, 100), "misaligned"),
                          ((2, 9, 12, 12), "slice"), ((2, 4, 64, 64), "nchw")):
        x = torch.randn(shape, device="cuda").to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "misaligned":
            x = torch.randn(x.numel() + 1, device="cuda").to(dtype)[1:].view(shape)
        elif layout == "slice":
            x = x[:, 1:]
        c = x.size(1)
        w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        mean, var = lib.statistics(x)
        lib.normalize_act_(x, mean, var, w, b, 1e-5, "leaky_relu", 0.01, None)
        y = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()
        dy = torch.randn_like(y)
        sums = lib.backward_reduce(y, dy, w, b, 1e-5, "leaky_relu", 0.01)
        lib.backward_input(y, dy, var, w, b, *sums, y.numel() // c, 1e-5, "leaky_relu", 0.01)
torch.cuda.synchronize()
print("small case: done")
EOF
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2> /dev/null || true)
if [ -n "$sanitizer" ]; then
  step memcheck 75 "$sanitizer" --tool memcheck --error-exitcode 3 "$PYTHON" "$OUT/small_case.py"
  step racecheck 75 "$sanitizer" --tool racecheck --error-exitcode 3 "$PYTHON" "$OUT/small_case.py"
else
  echo "memcheck, racecheck: SKIPPED (no compute-sanitizer on PATH or in \$CUDA_HOME/bin)" | tee -a "$OUT/summary.txt"
  step small-case 30 "$PYTHON" "$OUT/small_case.py"
fi

step benchmark 200 "$PYTHON" benchmarks/gpu_layer.py --json "$OUT/gpu_layer.json" --repeats 20 --warmup 3 \
  --shapes 32x256x56x56,32x64x112x112,256x2048x7x7 --dtypes float32,bfloat16 --budget-gib 4

echo "gpu_check.sh: $((SECONDS - started)) s, results in $OUT" | tee -a "$OUT/summary.txt"
exit "$status"
