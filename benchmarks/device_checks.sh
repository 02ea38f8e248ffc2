#!/usr/bin/env bash
# Every GPU check of issues 7, 8, 28 and 31 in one call of the device tool (inside its 10-minute limit).
#
# Prepare once, here (both folders are git-ignored):
#   mkdir -p .devdata && cp -r ../shared/data/mnist .devdata/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl tomli-w==1.2.0
# Then: run(command="GIT_COMMIT=<git rev-parse HEAD here> bash benchmarks/device_checks.sh",
#           carry=[".devdata", ".whl"], timeout_s=600)
# CIFAR-10 (issue 28) first goes over in parts, in calls made back to back (the machine goes
# back after ~30 s idle): `python -m benchmarks.device_stage split ~/data/cifar10/cifar10.npz
# .devcifar` prints one run(...) per part; then this script with RECIPES="cifar10-6c2f-gloro"
# (or a returned run folder carried under .devdata/ to resume it).
#
# Phases, all under one deadline (BUDGET seconds, default 540):
#   A. the full recipes in RECIPES, side by side on the one GPU, with the CUDA tests beside
#      them; each finished run is evaluated (`gloro evaluate --fallback --cost`) and recorded
#      (benchmarks/record_run). A run still training at the deadline is stopped with SIGINT,
#      which checkpoints it: its folder comes back whole, for `gloro train --resume`.
#   B. with the time left, on the idle GPU: seconds per epoch of mnist-2c2f-gloro (eager, and
#      with torch.compile mode reduce-overhead) and -plus (TIMING_EPOCHS each, schedules
#      scaled), then train_overhead and certify_overhead.
#   0. (CPU_SUITE=1 only, first) the CPU test suite on this machine's CPUs (issue 33).
#   C. (PHASE=speed: instead of A and B) issue 31, the whole training step compiled: the
#      CUDA test of the compiled step (reduce-overhead) against eager, train_overhead eager
#      (all models) and compiled with CUDA graphs (2C2F, 6C2F: the 6C2F epoch time is its
#      extrapolation), 2C2F MNIST recipe epochs eager and compiled, and certify_overhead in
#      batches of 10,000. About 9 minutes, mostly inductor compiling; everything in bench.tgz.
#      run(command="PHASE=speed GIT_COMMIT=... bash benchmarks/device_checks.sh", ...)
# What comes back in $OUT (8 files at most): log.txt, pytest-cuda.log, pytest-cpu.log,
# bench.tgz (timing runs and overhead JSONs) and each run folder, with its result JSON, as <recipe>.tgz.00,
# .01, ... (about 31 MB for a 4C3F run: two runs at most fit the 64 MiB that come back).
# Nothing written on the machine outlives the call reliably: pack everything into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
MNIST=${MNIST:-.devdata/mnist}
# CIFAR-10 does not fit in one call: carry it in parts first (python -m benchmarks.device_stage
# split ~/data/cifar10/cifar10.npz .devcifar prints the calls); this script joins them.
CIFAR=${CIFAR:-.devcifar/cifar10.npz}
BUDGET=${BUDGET:-540}
TIMING_EPOCHS=${TIMING_EPOCHS:-20}
# Recipes to train, or run folders (carried in, e.g. under .devdata/) to resume. Measured on an
# H100 (2026-11-26): a 4C3F recipe takes about 1.7 s/epoch alone and 2.7 s/epoch with three
# side by side, so one call finishes at most one 300-epoch 4C3F recipe; resume the others.
# Separated by ';'; a recipe may carry its own flags after a '|':
# RECIPES="mnist-4c3f-plus|--epochs 300;mnist-4c3f-gloro-t". A cifar10-* recipe (or run
# folder) reads $CIFAR: RECIPES="cifar10-6c2f-gloro;cifar10-6c2f-gloro-t" (800 epochs each,
# about 1-2 s/epoch expected on an H100: several calls, each resuming the folders it returned).
RECIPES=${RECIPES:-"mnist-4c3f-plus"}
# Seconds kept after training for evaluation, timing and packing; lower it (e.g. 45) when
# every run is to be resumed elsewhere rather than evaluated here.
TRAIN_RESERVE=${TRAIN_RESERVE:-120}
DEVICE=${DEVICE:-cuda}
PHASE=${PHASE:-recipes}  # recipes: phases 0, A, B; speed: phase C alone (issue 31)
# For a dry run on a CPU: DEVICE=cpu TRAIN_ARGS="--epochs 1 --set data.train_subset=1000"
# BENCH_ARGS=--quick EVAL_ARGS="--limit 100" (all empty on the GPU).
read -ra TRAIN_ARGS <<<"${TRAIN_ARGS:-}"
read -ra BENCH_ARGS <<<"${BENCH_ARGS:-}"
read -ra EVAL_ARGS <<<"${EVAL_ARGS:-}"
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
mkdir -p "$OUT" && exec > >(tee -a "$OUT/log.txt") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:$PWD:/tmp/site" PYTHONUNBUFFERED=1 BENCH_MNIST="$PWD/$MNIST"
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
if [ "$DEVICE" = cuda ]; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
else
    gpu=$(python3 -c "import platform; print(platform.processor() or 'cpu')")
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
work=$(mktemp -d) && mkdir -p "$work/bench" "$work/runs"
gloro=(python3 -m torchgloro.cli)
if compgen -G "$(dirname "$CIFAR")/*.manifest.json" >/dev/null; then
    python3 -m benchmarks.device_stage join "$(dirname "$CIFAR")" || exit 1
fi
data_for() {  # the --data-dir of a recipe (or run folder) name, and its label in records
    case "$(basename "$1")" in
    cifar10-*) [ -f "$CIFAR" ] && echo "$CIFAR CIFAR10_NPZ" || echo "MISSING CIFAR10_NPZ" ;;
    *) echo "$MNIST MNIST" ;;
    esac
}

if [ "${CPU_SUITE:-0}" = 1 ]; then
    # Issue 33: the CPU suite on this machine's CPUs, whose flags (AMX, AVX512-BF16) differ
    # from the developers'. Opt-in (CPU_SUITE=1): it takes most of one call on 16 cores.
    echo "== 0. CPU suite; CPU flags: $(grep -o 'amx_bf16\|avx512_bf16\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    timeout $(($(left) - 60)) env CUDA_VISIBLE_DEVICES= python3 -m pytest -q -p no:cacheprovider \
        >"$OUT/pytest-cpu.log" 2>&1
    tail -6 "$OUT/pytest-cpu.log"
fi

if [ "$PHASE" = speed ]; then
    echo "== C. issue 31: the whole training step compiled ($(left) s left)"
    timeout 170 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
        -k "compiled and reduce" >"$OUT/pytest-cuda.log" 2>&1
    tail -4 "$OUT/pytest-cuda.log"
    timeout 90 python3 -m benchmarks.train_overhead --device "$DEVICE" --out-dir "$work/bench" \
        "${BENCH_ARGS[@]}" | tail -8
    # The counters say whether any graph fell back from CUDA graphs (perf_hints logs why).
    [ "$(left)" -gt 260 ] && TORCH_LOGS=perf_hints timeout $(($(left) - 200)) \
        python3 -m benchmarks.train_overhead \
        --device "$DEVICE" --out-dir "$work/bench" --compile --compile-mode reduce-overhead \
        --arch 2c2f --arch 6c2f "${BENCH_ARGS[@]}" 2>&1 | grep -v "^ *$" | tail -12
    for spec in "eager|" "compiled|--set run.compile=true --set run.compile_mode=reduce-overhead"; do
        [ "$(left)" -gt 80 ] || break
        read -ra extra <<<"${spec#*|}"
        echo "-- mnist-2c2f-gloro ${spec%%|*} (compiled: the first epoch includes compiling)"
        timeout $(($(left) - 60)) "${gloro[@]}" train mnist-2c2f-gloro --device "$DEVICE" \
            --data-dir "$MNIST" --no-progress --out "$work/bench/2c2f-${spec%%|*}" \
            --epochs "${SPEED_EPOCHS:-8}" "${extra[@]}" "${TRAIN_ARGS[@]}" 2>&1 |
            grep -E "^epoch|Finished|Error|error" | tail -4
    done
    [ "$(left)" -gt 30 ] && timeout $(($(left) - 15)) python3 -m benchmarks.certify_overhead \
        --device "$DEVICE" --out-dir "$work/bench" --batch 10000 "${BENCH_ARGS[@]}" | tail -6
    RECIPES=""  # phases A and B are not run
fi

[ "$PHASE" = speed ] || echo "== A. full recipes side by side: $RECIPES ($(left) s left)"
train_end=$((T0 + BUDGET - TRAIN_RESERVE))
job() {  # job RECIPE[|FLAGS], or job PATH/TO/RUN_FOLDER (carried in): resume it
    local r=${1%%|*} run cmd extra=()
    [[ "$1" == *"|"* ]] && read -ra extra <<<"${1#*|}"
    local data label
    read -r data label <<<"$(data_for "$r")"
    [ "$data" != MISSING ] || { echo "$r: $CIFAR is not here: carry it first (device_stage)"; return; }
    if [ -d "$1" ]; then
        cp -r "$1" "$work/runs/" && run="$work/runs/$(basename "$1")"
        r=$(basename "$1" | sed 's/-[0-9]\{8\}-[0-9]\{6\}$//')
        cmd=("${gloro[@]}" train --resume "$run" --device "$DEVICE" --data-dir "$data" --no-progress)
    else
        cmd=("${gloro[@]}" train "$r" --device "$DEVICE" --data-dir "$data" --out "$work/runs" --no-progress "${TRAIN_ARGS[@]}" "${extra[@]}")
    fi
    local log="$work/$r.train.log"
    local t=$((train_end - $(date +%s)))
    [ "$t" -gt 5 ] || { echo "$r: no time left to train"; return; }
    timeout -s INT "$t" "${cmd[@]}" >"$log" 2>&1
    run=$(ls -d "$work/runs/$r"-* 2>/dev/null | tail -1)
    [ -n "$run" ] || { echo "$r: no run folder"; tail -5 "$log"; return; }
    cat "$log" >>"$run/train.log"
    if ! grep -qE "^Finished|already finished" "$log"; then
        echo "$r: stopped before the end: $(grep -c '^epoch' "$log") epochs; checkpoint kept"
        return
    fi
    grep -A12 "^Finished" "$log"
    local ev=(gloro evaluate RUN --device "$DEVICE" --data-dir "$label" --fallback --cost)
    local t=$(($(left) - 25))
    [ "$t" -gt 10 ] || { echo "$r: no time left to evaluate"; return; }
    timeout "$t" "${gloro[@]}" evaluate "$run" --device "$DEVICE" --data-dir "$data" --fallback --cost \
        "${EVAL_ARGS[@]}" >"$run/eval.log" 2>&1 || echo "$r: evaluation did not finish"
    tail -12 "$run/eval.log"
    local evf rec=()
    evf=$(cd "$run" && ls -t evaluation*.json 2>/dev/null | head -1)
    if [ -n "$evf" ]; then
        rec=(--evaluation "$evf" --eval-command "${ev[*]} ${EVAL_ARGS[*]}")
    else
        rec=(--note "training only: the evaluation did not finish")
    fi
    python3 -m benchmarks.record_run "$run" --name "$r-$DEVICE" --out-dir "$run" "${rec[@]}" \
        --train-command "gloro train $r ${extra[*]} --device $DEVICE --data-dir $label --no-progress" \
        --commit "$GIT_COMMIT" --device "$DEVICE: $gpu" | tail -2
}
pids=()
IFS=';' read -ra specs <<<"$RECIPES"
for spec in "${specs[@]}"; do
    job "$spec" &
    pids+=($!)
done
if [ "$DEVICE" = cuda ] && [ "$PHASE" != speed ]; then
    timeout $((train_end - $(date +%s))) python3 -m pytest -q -rs -p no:cacheprovider \
        tests/test_cuda.py >"$OUT/pytest-cuda.log" 2>&1
    tail -4 "$OUT/pytest-cuda.log"
fi
# Guarded: a bare `wait` (no jobs) also waits for the log's tee, which never ends (bash >= 5.1).
[ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"

[ "$PHASE" = speed ] || echo "== B. timing on the idle device ($(left) s left)"
# Each timing run goes to its own folder: "recipe|extra --set flags".
specs=("mnist-2c2f-gloro|" \
    "mnist-2c2f-gloro|--set run.compile=true --set run.compile_mode=reduce-overhead" \
    "mnist-2c2f-plus|")
[ -f "$CIFAR" ] && specs+=("cifar10-6c2f-gloro|")  # issue 31's target: <= 1.0 s/epoch
[ "$PHASE" = speed ] && specs=()  # phase C timed its own
for spec in "${specs[@]}"; do
    [ "$(left)" -gt 100 ] || break
    r=${spec%%|*} && read -ra extra <<<"${spec#*|}"
    read -r data label <<<"$(data_for "$r")"
    echo "-- $r ${extra[*]}"
    timeout 60 "${gloro[@]}" train "$r" --device "$DEVICE" --data-dir "$data" --no-progress \
        --out "$work/bench/$r${extra:+-compiled}" --epochs "$TIMING_EPOCHS" "${extra[@]}" \
        "${TRAIN_ARGS[@]}" 2>&1 | grep -E "^epoch|Finished|Error|error" | tail -3
done
[ "$PHASE" != speed ] && [ "$(left)" -gt 90 ] && timeout $(($(left) - 30)) python3 -m benchmarks.train_overhead --device "$DEVICE" --out-dir "$work/bench" "${BENCH_ARGS[@]}" | tail -8
[ "$PHASE" != speed ] && [ "$(left)" -gt 40 ] && timeout $(($(left) - 15)) python3 -m benchmarks.certify_overhead --device "$DEVICE" --out-dir "$work/bench" "${BENCH_ARGS[@]}" | tail -6

echo "== packing ($(left) s left)"
tar czf "$OUT/bench.tgz" --exclude="*.safetensors" -C "$work" bench
# One file comes back only under 16 MiB, 64 MiB in all: a run folder still holding its
# checkpoint (about 23 MB for 4C3F) comes back in 15 MiB parts (cat NAME.tgz.* | tar xz).
# A finished run leaves its resume checkpoint behind (best.safetensors is what evaluate reads).
for run in "$work"/runs/*; do
    [ -d "$run" ] || continue
    name=$(basename "$run" | sed 's/-[0-9]\{8\}-[0-9]\{6\}$//')
    drop=()
    grep -qE "^Finished|already finished" "$run/train.log" && drop=(--exclude=checkpoint.safetensors)
    tar czf - "${drop[@]}" -C "$work/runs" "$(basename "$run")" |
        split -b 15M -d - "$OUT/$name.tgz."
done
ls -la "$OUT"
echo "done in $(($(date +%s) - T0)) s"
