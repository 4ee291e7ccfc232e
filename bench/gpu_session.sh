#!/usr/bin/env bash
# The GPU part of the benchmark suite on a lent GPU machine, in as few device calls as the onnxruntime-gpu
# wheel allows. A session has about 15 minutes of device time, machine start included; the wheel travels
# in parts, one per call (a call carries at most 64 MiB), and the machine keeps /tmp only while it stays
# warm (about 30 s between calls): so the calls go back to back, and the ones that carry a part also do the
# GPU work that needs no onnxruntime-gpu (PyTorch is there already).
#
# Here first: `bash bench/gpu_wheels.sh` (into .whl/, git-ignored; it prints the calls). Then one device
# call each, in order, N being the number of parts (5):
#   bash bench/gpu_session.sh 1        carry .whl/small .whl/ort-1: the codecs installed, the 100-patient
#                                      full-size cohort started in the background, training step (fp32, bf16,
#                                      fp16; channels_last off and on)
#   bash bench/gpu_session.sh 2        carry .whl/ort-2: Grad-CAM on CUDA; pytest -m gpu for training and Grad-CAM
#   bash bench/gpu_session.sh K        carry .whl/ort-K (3 .. N-1): the part only
#   bash bench/gpu_session.sh N        carry .whl/ort-N: onnxruntime-gpu joined, checked and installed; pytest -m gpu
#                                      for inference (CUDA provider and dens-infer against the CPU); the model
#                                      stage (ORT CUDA fp16/fp32, batch 1..256, IO binding; torch eager); dens-infer
#                                      end to end against the naive reference
#   bash bench/gpu_session.sh scaling  carry .whl/nvimg: end to end against decode workers 1, 2, 4, 8, 16; then
#                                      JPEG 2000 decoding on the GPU (nvImageCodec) against the CPU route
# Each call leaves $OUT/results/*.json (copy them into bench/results/ here, then run bench/summarize.py) and
# $OUT/step-*.log. Estimated device time: 2 min start, 2 min for 1-4, 3.5 min for N, 3.5 min for scaling.
#
# Rehearsal on a CPU machine, every step with tiny settings (run it after changing this script: a mistake
# found on the device costs minutes of a short budget):
#   PYVER=3.11 bash bench/gpu_wheels.sh     # wheels for the rehearsing Python
#   DENS_GPU_REHEARSAL=1 PYTHON=/path/to/python OUT=/tmp/out bash bench/gpu_session.sh 1   # ... N, scaling
set -euo pipefail
case "${1:-}" in
    [1-9] | scaling) step=$1 ;;
    *) sed -n '2,27p' "$0"; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
STASH=/tmp/dens-ort        # the parts as they arrive
SITE=/tmp/dens-site        # the wheels installed here (the image's own packages stay untouched)
COHORT=/tmp/dens-c100      # the end-to-end cohort, made once per warm machine
mkdir -p "$OUT/results" "$STASH"
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DENS_BENCH_RESULTS="$OUT/results"
# Everything to the log as well; at exit, wait for tee so that the last lines reach both.
exec > >(tee -a "$OUT/step-$step.log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid" 2>/dev/null || true' EXIT

if [ -n "${DENS_GPU_REHEARSAL:-}" ]; then  # CPU, tiny models and cohort: the script's own steps, not figures
    DEV=cpu PATIENTS=3 NAIVE=4 WORKERS=1,2 GPU_DECODE_FILES=4
    export DENS_BENCH_HOST=rehearsal
    TRAIN=(--arch resnet18 --size 128 --batch 2 --precision fp32 bf16 --min-seconds 0.5)
    GRADCAM=(--models resnet18:128 --batches 1 --repeat 1)
    MODEL=(--arch resnet18 --size 128 --seconds 0.5 --batch-sizes 1,2)
    E2E=(--arch resnet18 --size 128 --model-seconds 1)
else
    DEV=cuda PATIENTS=100 NAIVE=30 WORKERS=1,2,4,8,16 GPU_DECODE_FILES=48
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
    DENS_BENCH_HOST=$(echo "$gpu" | grep -oiE '[HAB][0-9]{2,3}|L40S?|L4' | head -1 | tr 'A-Z' 'a-z' || true)
    export DENS_BENCH_HOST=${DENS_BENCH_HOST:-gpu}
    TRAIN=(--batch 32 --min-seconds 3)  # fp32, bf16, fp16 x channels_last off, on
    GRADCAM=(--repeat 3)
    MODEL=(--seconds 3 --batch-sizes 1,8,32,64,128,256)
    E2E=(--model-seconds 5)
fi

stash() {  # stash K: keep part K; the parts before it must still be here (the machine stayed warm)
    local k=$1 have
    have=$(find "$STASH" -name 'part-*' | wc -l)
    if [ "$have" -lt $((k - 1)) ]; then
        echo "step $k: $have part(s) of onnxruntime-gpu in $STASH, $((k - 1)) expected: the machine went cold" \
             "between calls (its /tmp is gone) or a step was skipped; start again at step 1" >&2
        exit 3
    fi
    cp .whl/ort-"$k"/* "$STASH"/  # a step run again copies its part again
}

install_wheels() {  # install_wheels WHEEL...: into $SITE, no index, no dependencies (the image has them)
    local log=/tmp/dens-pip.log
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" \
            >"$log" 2>&1; then
        cat "$log"
        echo "pip could not install $*" >&2
        exit 5
    fi
    grep -v "already exists\|Target directory" "$log" || true
}

measure() {  # measure SECONDS COMMAND...: one benchmark or test run, time-limited; a failure is reported and
    # the call goes on to the next one (each figure is worth having without the others)
    local limit=$1
    shift
    timeout "$limit" "$@" || echo "FAILED (exit $?): $* -- read the lines above before using its figures"
}

wait_for_cohort() {
    for _ in $(seq 1 180); do
        [ -f "$COHORT.done" ] && return 0
        if [ -f "$COHORT.failed" ]; then
            tail -20 "$COHORT.log"
            echo "the cohort could not be made (log above)" >&2
            exit 4
        fi
        sleep 1
    done
    echo "the cohort is not ready after 3 minutes; $(find "$COHORT" -name '*.dcm' | wc -l) files so far" >&2
    exit 4
}

case "$step" in
    1)
        # The wheels must be for this Python (gpu_wheels.sh fetches cp312 unless PYVER says otherwise).
        tag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
        if ! grep -q -- "-$tag-" .whl/ort-1/NAME; then
            echo "the wheels in .whl/ are not for $tag ($(cat .whl/ort-1/NAME)): run bash bench/gpu_wheels.sh" >&2
            exit 5
        fi
        rm -rf "$STASH" && mkdir -p "$STASH"  # step 1 starts afresh, also when run again on a warm machine
        stash 1
        install_wheels .whl/small/*.whl
        "$PY" -c "import pydicom, openjpeg, torch; print('pydicom', pydicom.__version__, 'openjpeg', openjpeg.__version__,
              'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
        [ "$DEV" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
        # The cohort, in the background while the GPU steps run: its own process session (a command's other
        # processes end with it), at low priority, two cores left to the benchmarks. A rerun stops the last one.
        if [ -f "$COHORT.pid" ]; then kill -- -"$(cat "$COHORT.pid")" 2>/dev/null || true; fi
        rm -rf "$COHORT" "$COHORT".*
        cores=$("$PY" -c "import dens; print(max(1, dens.usable_cores() - 2))")
        setsid nice -n 10 "$PY" -c "
import sys; from pathlib import Path
from dens.synth import generate
try:
    generate('$COHORT', patients=$PATIENTS, size='full', seed=14, workers=$cores, overwrite=True, progress=False)
except BaseException:
    Path('$COHORT.failed').touch(); raise
Path('$COHORT.done').touch()" >"$COHORT.log" 2>&1 </dev/null &
        echo $! >"$COHORT.pid"
        measure 240 "$PY" bench/train_step.py --device "$DEV" "${TRAIN[@]}" ;;
    scaling)
        wait_for_cohort
        measure 330 "$PY" bench/scaling.py --device "$DEV" --cohort "$COHORT" --workers "$WORKERS" "${E2E[@]}"
        # Last, so that nothing above runs beside these wheels and its figures are safe whatever happens here;
        # one pip call (both wheels share the nvidia/ folder); a CPU rehearsal stops at the script's refusal.
        install_wheels .whl/nvimg/*.whl
        measure 150 "$PY" bench/gpu_decode.py --cohort "$COHORT" --files "$GPU_DECODE_FILES" ;;
    [2-9])
        parts=$(cat "$STASH/PARTS" 2>/dev/null || echo 0)
        stash "$step"
        if [ "$step" = 2 ]; then
            measure 120 "$PY" bench/gradcam.py --device "$DEV" "${GRADCAM[@]}"
            measure 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_train.py tests/test_gradcam.py
        fi
        echo "part $step of $parts here; cohort: $(find "$COHORT" -name '*.dcm' 2>/dev/null | wc -l) files" \
             "$([ -f "$COHORT.done" ] && echo '(done)')"
        if [ "$step" = "$parts" ]; then
            name=$(cat "$STASH/NAME")
            cat "$STASH"/part-* >"/tmp/$name"
            echo "$(cat "$STASH/SHA256")  /tmp/$name" | sha256sum -c
            install_wheels "/tmp/$name"
            rm "/tmp/$name"
            # The GPU build, from $SITE, with its CUDA provider (else every figure below would be the CPU's).
            "$PY" -c "
import onnxruntime as o, sys
print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())
sys.exit(not (o.__file__.startswith('$SITE') and 'CUDAExecutionProvider' in o.get_available_providers()))" || {
                echo "onnxruntime-gpu is not the onnxruntime this Python imports" >&2
                exit 5
            }
            measure 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_infer.py
            measure 200 "$PY" bench/model_stage.py --device "$DEV" "${MODEL[@]}"
            wait_for_cohort
            measure 200 "$PY" bench/pipeline.py --device "$DEV" --cohort "$COHORT" --naive-files "$NAIVE" "${E2E[@]}"
        fi ;;
esac
