#!/usr/bin/env bash
# The GPU part of the benchmark suite on a lent GPU machine, one stage per device call (each under the
# 10-minute limit of a call; the machine keeps /tmp only while it stays warm between calls). Prepare the
# wheels here first with `bash bench/gpu_wheels.sh`. Results go to $OUT/results (the device returns $OUT);
# copy them into bench/results/ here and run `python bench/summarize.py`.
#
#   bash bench/gpu_session.sh part K    # carry .whl/ort-K: one part of onnxruntime-gpu into /tmp/ort
#   bash bench/gpu_session.sh install   # carry .whl/small: join and check the wheel, install all into /tmp/site
#   bash bench/gpu_session.sh model     # ORT CUDA fp16/fp32 at batch 1..256, share of fp16 peak; torch eager
#   bash bench/gpu_session.sh pipeline  # dens-infer end to end on 100 full-size patients, naive on 60 files
#   bash bench/gpu_session.sh scaling   # end to end against decode workers 1, 2, 4 ... cores
#   bash bench/gpu_session.sh train     # training step fp32 vs bf16 vs fp16, channels_last off/on
#   bash bench/gpu_session.sh gradcam   # Grad-CAM on CUDA
#
# Not yet run on a device (no session so far was lent one): the first run checks this script too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export DENS_BENCH_RESULTS="${OUT:-/tmp/out}/results"
COHORT=/tmp/bench-c100

cohort() {  # the GPU-sized cohort: 100 full-size patients (about 440 files), made once per warm machine
    [ -f "$COHORT/train.csv" ] || python3 -c "from dens.synth import generate
generate('$COHORT', patients=100, size='full', seed=14, overwrite=True, progress=False)"
}

case "${1:-}" in
    part)
        mkdir -p /tmp/ort && cp ".whl/ort-$2"/* /tmp/ort/ && ls -l /tmp/ort ;;
    install)
        name=$(cat /tmp/ort/NAME)
        cat /tmp/ort/part-* > "/tmp/ort/$name"
        echo "$(cat /tmp/ort/SHA256)  /tmp/ort/$name" | sha256sum -c
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "/tmp/ort/$name" .whl/small/*.whl
        python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
        nvidia-smi --query-gpu=name,memory.total --format=csv ;;
    model)
        python3 bench/model_stage.py --device cuda ;;
    pipeline)
        cohort && python3 bench/pipeline.py --device cuda --cohort "$COHORT" --naive-files 60 ;;
    scaling)
        cohort && python3 bench/scaling.py --device cuda --cohort "$COHORT" ;;
    train)
        python3 bench/train_step.py --device cuda ;;
    gradcam)
        python3 bench/gradcam.py --device cuda ;;
    *)
        sed -n '2,14p' "$0"; exit 2 ;;
esac
