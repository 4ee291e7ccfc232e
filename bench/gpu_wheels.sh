#!/usr/bin/env bash
# Before a session on a lent GPU machine (its image has torch, onnxruntime CPU, opencv, pandas, matplotlib,
# click, tqdm, pyyaml for Python 3.12, and no internet): fetch, here, the wheels dens needs that it lacks,
# for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored). onnxruntime-gpu (about 245 MiB) is split into
# parts small enough for one device call each (a call carries at most 64 MiB, the working tree included:
# the first part travels with the codecs, so parts are 50 MiB); the codecs go in .whl/small/, nvImageCodec
# and nvJPEG2000 (29 MB, for bench/gpu_decode.py) in .whl/nvimg/. python-gdcm
# (13 MB) stays behind: it decodes only JPEG Extended, which the synthetic cohort there does not hold.
#
#   bash bench/gpu_wheels.sh            # the versions this checkout's .venv runs, else the newest
#   PYVER=3.11 bash bench/gpu_wheels.sh # for another Python (the CPU rehearsal of bench/gpu_session.sh)
#
# On the device, bench/gpu_session.sh takes it from there: one call per part, `1` .. `N`.
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=${PART_MIB:-50}
PYVER=${PYVER:-3.12}
version() {  # the version this checkout's venv has, so the device runs what the tests ran
    .venv/bin/python -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print "==" $2}' || true
}
fetch() {  # fetch DEST NAME...
    local dest=$1; shift
    for name in "$@"; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
            --platform manylinux_2_35_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$name$(version "$name")"
    done
}
rm -rf .whl/small .whl/nvimg .whl/ort .whl/ort-*
mkdir -p .whl/small .whl/nvimg .whl/ort
fetch .whl/small pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle pyjpegls
fetch .whl/nvimg nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13  # GPU JPEG 2000 decoding (bench/gpu_decode.py)
fetch .whl/ort onnxruntime-gpu
wheel=$(ls .whl/ort/*.whl)
(cd .whl/ort && split -b "${PART_MIB}M" -d "$(basename "$wheel")" part-)
k=0
for part in .whl/ort/part-*; do
    k=$((k + 1))
    mkdir -p ".whl/ort-$k"
    mv "$part" ".whl/ort-$k/"
done
basename "$wheel" > .whl/ort-1/NAME
sha256sum "$wheel" | cut -d' ' -f1 > .whl/ort-1/SHA256
echo "$k" > .whl/ort-1/PARTS
rm "$wheel"
du -sh .whl/small .whl/nvimg .whl/ort-*
echo "onnxruntime-gpu: $(cat .whl/ort-1/NAME) in $k parts; the device calls, back to back:"
echo "  bash bench/gpu_session.sh 1        carry [\".whl/small\", \".whl/ort-1\"]"
for i in $(seq 2 "$k"); do echo "  bash bench/gpu_session.sh $i        carry [\".whl/ort-$i\"]"; done
echo "  bash bench/gpu_session.sh scaling  carry [\".whl/nvimg\"]"
