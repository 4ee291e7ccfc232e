#!/usr/bin/env bash
# Before a session on a lent GPU machine (its image has torch, onnxruntime CPU, opencv, pandas, matplotlib,
# click, tqdm, pyyaml for Python 3.12, and no internet): fetch, here, the wheels dens needs that it lacks,
# for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored). onnxruntime-gpu (about 255 MB) is split into
# parts small enough for one device call each (the device carries at most 64 MiB a call, the working tree
# included); the small wheels go in .whl/small/.
#
#   bash bench/gpu_wheels.sh            # the versions this checkout's .venv runs, else the newest
#
# On the device, bench/gpu_session.sh takes it from there (`part K` once per part, then `install`).
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=${PART_MIB:-50}
version() {  # the version this checkout's venv has, so the device runs what the tests ran
    .venv/bin/python -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print "==" $2}' || true
}
fetch() {  # fetch DEST NAME...
    local dest=$1; shift
    for name in "$@"; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
            --platform manylinux_2_35_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$name$(version "$name")"
    done
}
rm -rf .whl/small .whl/ort .whl/ort-*
mkdir -p .whl/small .whl/ort
fetch .whl/small pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle pyjpegls python-gdcm
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
rm "$wheel"
du -sh .whl/small .whl/ort-*
echo "onnxruntime-gpu: $(cat .whl/ort-1/NAME) in $k parts (.whl/ort-1 .. .whl/ort-$k); small wheels in .whl/small"
