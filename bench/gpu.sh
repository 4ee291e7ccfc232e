#!/usr/bin/env bash
# The GPU benchmarks and tests, on a machine of your own with a CUDA GPU:
#
#   make setup && make bench-gpu        # or: bash bench/gpu.sh
#
# Steps, each with a time limit; a step that fails or runs out of time is reported and the next one runs,
# so that every figure that can be measured is:
#   1. pytest -m gpu: the CUDA provider with IO binding and dens-infer on CUDA against the CPU's
#      probabilities, AMP training steps, a CUDA training run, Grad-CAM on the GPU
#   2. the training step: fp32 against AMP (bf16, fp16), channels_last off and on    (train_step.py)
#   3. Grad-CAM on the GPU against a plain forward pass                                (gradcam.py)
#   4. the model stage: ONNX Runtime's CUDA provider with IO binding and uint8 input, fp32 and fp16, batch
#      1 to 256; torch eager as the reference                                          (model_stage.py)
#   5. dens-infer end to end on full-size JPEG 2000 files against the naive reference (pipeline.py), on a
#      100-patient full-size synthetic cohort made in the background while steps 1-4 run
#   6. end to end against the number of decode workers                                 (scaling.py)
#   7. JPEG 2000 decoded on the GPU (nvImageCodec) against dens's CPU route             (gpu_decode.py)
#      needs `.venv/bin/pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13`; left out without them
# Then bench/summarize.py draws the machine's plot and rewrites the table in bench/README.md. The exit
# status is 0 when every step passed, 1 otherwise. The step limits add up to under an hour.
#
# Settings through the environment: PYTHON (default .venv/bin/python), DENS_GPU_COHORT (the end-to-end
# cohort's folder, default .cache/gpu-cohort, made once), DENS_BENCH_RESULTS (default bench/results).
# DENS_GPU_REHEARSAL=1 runs every step on the CPU with tiny models and a tiny cohort (DENS_GPU_COHORT and
# DENS_BENCH_RESULTS must name folders of their own; the table goes to a README.md there): it checks this
# script, not the GPU, and its figures mean nothing (tests/test_bench.py runs it, marked slow).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=${DENS_BENCH_RESULTS:-bench/results}
README=bench/README.md
export PYTHONUNBUFFERED=1 DENS_BENCH_RESULTS=$RESULTS

if [ -n "${DENS_GPU_REHEARSAL:-}" ]; then
    DEV=cpu PATIENTS=3 SIZE=small NAIVE=4 WORKERS=1,2 DECODE_FILES=4
    COHORT=${DENS_GPU_COHORT:?a rehearsal names its own cohort folder}
    : "${DENS_BENCH_RESULTS:?a rehearsal names its own results folder}"
    README=$RESULTS/README.md  # bench/README.md keeps real figures only
    TRAIN=(--arch resnet18 --size 64 --batch 2 --precision fp32 bf16 --min-seconds 0 --min-steps 1)
    GRADCAM=(--models resnet18:64 --batches 1 --repeat 1)
    MODEL=(--arch resnet18 --size 64 --seconds 0.2 --batch-sizes 1,2)
    E2E=(--arch resnet18 --size 64 --model-seconds 0.2)
else
    DEV=cuda PATIENTS=100 SIZE=full NAIVE=30 WORKERS= DECODE_FILES=48
    COHORT=${DENS_GPU_COHORT:-.cache/gpu-cohort}
    TRAIN=(--batch 32 --min-seconds 3)  # fp32, bf16, fp16 x channels_last off, on
    GRADCAM=(--repeat 3)
    MODEL=(--seconds 3 --batch-sizes 1,8,32,64,128,256)
    E2E=(--model-seconds 5)
    if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu.sh: torch sees no CUDA device; run it on a machine with an NVIDIA GPU and its driver" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

failed=()
step() {  # step SECONDS NAME COMMAND...: one time-limited step; a failure is reported, never fatal
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "== $name: stopped after ${limit}s" || echo "== $name: failed (exit $rc)"
        failed+=("$name")
    fi
}

# The end-to-end cohort, made once, in the background at low priority while steps 1-4 use the GPU; two
# cores stay for them.
cohort_pid=
if [ ! -f "$COHORT/train.csv" ]; then
    cores=$("$PY" -c "import dens; print(max(1, dens.usable_cores() - 2))")
    echo "== making the end-to-end cohort in $COHORT ($PATIENTS $SIZE patients, in the background)"
    nice -n 10 "$PY" -c "from dens.synth import generate
generate('$COHORT', patients=$PATIENTS, size='$SIZE', seed=14, workers=$cores, overwrite=True, progress=False)" &
    cohort_pid=$!
fi

step 900 "pytest -m gpu" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests
step 300 "training step" "$PY" bench/train_step.py --device "$DEV" "${TRAIN[@]}"
step 180 "Grad-CAM" "$PY" bench/gradcam.py --device "$DEV" "${GRADCAM[@]}"
step 300 "model stage" "$PY" bench/model_stage.py --device "$DEV" "${MODEL[@]}"

if [ -n "$cohort_pid" ] && ! wait "$cohort_pid"; then
    echo "== the end-to-end cohort could not be made: end to end and scaling are left out"
    failed+=("cohort")
else
    step 600 "end to end" "$PY" bench/pipeline.py --device "$DEV" --cohort "$COHORT" --naive-files "$NAIVE" "${E2E[@]}"
    step 600 "scaling" "$PY" bench/scaling.py --device "$DEV" --cohort "$COHORT" ${WORKERS:+--workers "$WORKERS"} \
        "${E2E[@]}"
fi

if "$PY" -c "import nvidia.nvimgcodec" 2>/dev/null; then
    step 300 "GPU decoding" "$PY" bench/gpu_decode.py --cohort "$COHORT" --files "$DECODE_FILES"
else
    echo "== GPU decoding: left out (.venv/bin/pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13 to measure it)"
fi

step 120 "summary" "$PY" bench/summarize.py --results "$RESULTS" --readme "$README"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu.sh: ${#failed[@]} step(s) failed: ${failed[*]} (their lines above say why)"
    exit 1
fi
echo "gpu.sh: every step passed; results in $RESULTS"
