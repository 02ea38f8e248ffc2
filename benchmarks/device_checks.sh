#!/usr/bin/env bash
# The GPU checks of issues 7 and 8 in one call of the device tool (fits its 10-minute limit).
#
# Prepare once, here (both folders are git-ignored):
#   mkdir -p .devdata && cp -r ../shared/data/mnist .devdata/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl tomli-w==1.2.0
# Then: run(command="GIT_COMMIT=<git rev-parse HEAD here> bash benchmarks/device_checks.sh",
#           carry=[".devdata", ".whl"], timeout_s=600)
# Everything it measures lands in $OUT (8 files at most come back): the GPU, the CUDA tests'
# log, train_overhead and certify_overhead JSONs, and the recorded mnist-2c2f-gloro run.
# TRAIN_SECONDS (default 240) caps the training: at the cap the trainer checkpoints (SIGINT)
# and the run is evaluated as it stands; `gloro train --resume` continues it later.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
MNIST=${MNIST:-.devdata/mnist}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:$PWD:/tmp/site" PYTHONUNBUFFERED=1
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi | tee "$OUT/gpu.txt"

echo "== CUDA tests"
python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.log" | tail -3

echo "== overhead benchmarks"
timeout 150 python3 -m benchmarks.train_overhead --device cuda --out-dir "$OUT"
timeout 90 python3 -m benchmarks.certify_overhead --device cuda --out-dir "$OUT"

echo "== mnist-2c2f-gloro on $gpu (at most $TRAIN_SECONDS s of training)"
train=(python3 -m torchgloro.cli train mnist-2c2f-gloro --device cuda --data-dir "$MNIST"
       --out runs --no-progress)
timeout -s INT "$TRAIN_SECONDS" "${train[@]}" 2>&1 | tee "$OUT/train.log" | tail -5
run=$(ls -d runs/mnist-2c2f-gloro-* 2>/dev/null | tail -1)
[ -n "$run" ] || { echo "no run folder: training did not start"; exit 1; }
python3 -m torchgloro.cli evaluate "$run" --device cuda --attack pgd 2>&1 | tail -8
python3 -m benchmarks.record_run "$run" --name mnist-2c2f-gloro-cuda --out-dir "$OUT" \
    --train-command "${train[*]}" --eval-command "gloro evaluate RUN --device cuda --attack pgd" \
    --commit "$GIT_COMMIT" --device "cuda: $gpu"
