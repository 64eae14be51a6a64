#!/usr/bin/env bash
# Every GPU check of the open issues in one run on a lent CUDA machine (at most 500 s of steps):
# tests/test_cuda.py, then each benchmark's cuda figure. Each step's log and a summary of exit
# codes go to $OUT (the device tool brings them back).
#
# Here, once (the machine has torch + CUDA but no PyAV, no platformdirs and no internet):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl av==18.1.0 platformdirs==4.14.9
# Then with the device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".whl"],
# timeout_s=570). GPU_RUN_DEVICE=cpu runs the same steps here (a dry run of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-run}"
dev="${GPU_RUN_DEVICE:-cuda}"
mkdir -p "$out"
site=/tmp/i3d-site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || exit 1
fi
# i3d itself, for its entry points (the backends); no index, no build isolation: offline
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . || exit 1
rm -rf build  # the wheel's staging (ignored by git, but not needed again)
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 I3D_CUDA_TESTS_ON="$dev"

summary="$out/summary.txt"
: > "$summary"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
  grep -m1 'model name' /proc/cpuinfo; nproc; } > "$out/machine.txt" 2>&1

step test_cuda 140 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py
step flow 75 python3 benchmarks/flow.py --pairs 8 --batch 8
step fvd 45 python3 benchmarks/fvd.py --device "$dev" --videos 32 --batch-size 16
step sharded_predict 50 python3 benchmarks/sharded_predict.py --videos 24 --device "$dev"
step snippet_features 90 python3 benchmarks/snippet_features.py --seconds 120 --short 30 \
  --device "$dev" --batch-size 32 --threads 8
step train_throughput 55 python3 benchmarks/train_throughput.py --device "$dev" --amp \
  --steps 10 --warmup 3
step overlap 45 python3 benchmarks/overlap.py --device "$dev" --videos 4 --seconds 6
cat "$summary"
