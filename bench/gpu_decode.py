"""JPEG 2000 decoding on the GPU (nvImageCodec, nvJPEG2000) against dens's CPU route on the same files: the
measurement that decides whether dens-infer gets a GPU ``--decoder``.

    python bench/gpu_decode.py [--cohort DIR] [--files 48] [--batch 8] [--size 512]

dens decodes JPEG 2000 on the CPU at reduced resolution (the wavelet level just above S), one process per
core. nvImageCodec's Python API decodes the full-resolution frame only (it has no resolution-level
option), so the GPU figure is: the whole frame decoded into device memory, area-resized to S x S there
(torch), and the small image copied back, one file at a time and in batches. The CPU figures are
``dens.route.preprocess.load`` in one process and dens-infer's decode pool on every core. The GPU's resized frame
is not the canonical image (no VOI, crop or orientation): it stands for the GPU's share of the work only;
a ``--decoder`` would hand its frame to dens.route.preprocess's own steps, the one route to the model's input.
Pixels: the GPU frames of the first ``--check-files`` files are compared with pydicom's decode of them
(lossless JPEG 2000: they must match bit for bit).

Needs a CUDA GPU and nvidia-nvimgcodec-cu13 with nvidia-nvjpeg2k-cu13 (`.venv/bin/pip install` them);
`make bench-gpu` runs it as its last step. No GPU has run it yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_COHORT, ensure_cohort, shown, write_result
from dens import usable_cores
from dens.route import dicom
from pipeline import bench_decode_inline, bench_decode_pool, cohort_files


def jpeg2000_files(cohort: Path, limit: int) -> list[Path]:
    files = [p for p in cohort_files(cohort) if _syntax(p) in dicom.JPEG2000_SYNTAXES]
    return files[:limit]


def _syntax(path: Path) -> str:
    try:
        return dicom.read(path).transfer_syntax
    except dicom.UnusableFile:
        return ""


def open_gpu_decoder():
    """(torch, nvimgcodec module, Decoder, DecodeParams); SystemExit with the reason when there is none."""
    import torch  # first: its CUDA runtime libraries are the ones nvImageCodec loads

    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode: no CUDA device visible; this benchmark measures GPU decoding")
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        raise SystemExit(
            f"gpu_decode: nvImageCodec is not installed ({exc}); pip install "
            "nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13"
        ) from exc
    params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)
    # No CPU-only codec (nvImageCodec can fall back to OpenJPEG on the host, a CPU figure under a GPU name);
    # nvJPEG2000 itself parses on the host and decodes on the GPU, which the hybrid kind covers.
    kinds = (nvimgcodec.BackendKind.GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
    decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(kind) for kind in kinds])
    return torch, nvimgcodec, decoder, params


def codestreams(nvimgcodec, files: list[Path]) -> list:
    """Each file's one JPEG 2000 frame as an nvImageCodec CodeStream, read before any timing (the disk is
    not what is measured)."""
    import pydicom
    from pydicom.encaps import generate_frames

    return [
        nvimgcodec.CodeStream(next(generate_frames(pydicom.dcmread(p).PixelData, number_of_frames=1))) for p in files
    ]


def decoded(image, what: str):
    if image is None:  # nvImageCodec's answer to a code stream it cannot decode
        raise SystemExit(f"gpu_decode: nvImageCodec could not decode {what}")
    return image


def bench_gpu(torch, decoder, params, streams: list, size: int, batch: int) -> dict:
    """img/s of decode -> area resize to size x size -> host, one file a call and ``batch`` files a call. The
    decoder works on torch's stream, so the copy back to the host waits for the decode."""
    stream = torch.cuda.current_stream().cuda_stream

    def finish(image) -> np.ndarray:
        frame = torch.as_tensor(decoded(image, "a file"), device="cuda")  # [H, W, 1] in device memory
        if frame.dtype == torch.uint16:  # torch's uint16 has few kernels: through int16's bits to int32
            frame = frame.view(torch.int16).to(torch.int32) & 0xFFFF
        frame = frame.float()
        small = torch.nn.functional.interpolate(frame.permute(2, 0, 1)[None], size=(size, size), mode="area")
        return small.cpu().numpy()

    first = decoded(decoder.decode(streams[0], params=params, cuda_stream=stream), "the first file")
    kind = str(first.buffer_kind)  # where the decoded frame lives: device memory for a GPU decode
    finish(first)  # warm-up: the codec's first call sets up its state
    torch.cuda.synchronize()
    start = time.perf_counter()
    for code in streams:
        finish(decoder.decode(code, params=params, cuda_stream=stream))
    single = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(streams), batch):
        for image in decoder.decode(streams[i : i + batch], params=params, cuda_stream=stream):
            finish(image)
    batched = time.perf_counter() - start
    n = len(streams)
    return {
        "images": n,
        "one_at_a_time_img_per_s": round(n / single, 2),
        "batch": batch,
        "batched_img_per_s": round(n / batched, 2),
        "buffer_kind": kind,
    }


def pixel_check(decoder, params, files: list[Path], streams: list) -> dict:
    """The largest absolute difference between the GPU's full frame and pydicom's, over every file."""
    import pydicom

    worst, shapes_differ = 0, 0
    for path, stream in zip(files, streams, strict=True):
        gpu = np.asarray(decoded(decoder.decode(stream, params=params), path.name).cpu()).reshape(-1)
        cpu = pydicom.dcmread(path).pixel_array.reshape(-1)
        if gpu.size != cpu.size:
            shapes_differ += 1
            continue
        worst = max(worst, int(np.abs(gpu.astype(np.int64) - cpu.astype(np.int64)).max()))
    return {"files": len(files), "max_abs_difference": worst, "size_mismatches": shapes_differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, default=DEFAULT_COHORT, help="a full-size dens-synth cohort")
    parser.add_argument("--files", type=int, default=48, help="JPEG 2000 files to decode, at most")
    parser.add_argument("--batch", type=int, default=8, help="files per nvImageCodec call in the batched run")
    parser.add_argument("--size", type=int, default=512, help="canonical image size S")
    parser.add_argument(
        "--check-files",
        type=int,
        default=8,
        help="files whose GPU frame is compared with pydicom's (about 1 s each on the CPU)",
    )
    args = parser.parse_args()
    torch, nvimgcodec, decoder, params = open_gpu_decoder()
    files = jpeg2000_files(ensure_cohort(args.cohort), args.files)
    if not files:
        raise SystemExit(f"gpu_decode: no JPEG 2000 file in {args.cohort}")
    streams = codestreams(nvimgcodec, files)
    results = {
        "gpu": bench_gpu(torch, decoder, params, streams, args.size, args.batch),
        "pixels": pixel_check(decoder, params, files[: args.check_files], streams[: args.check_files]),
        "cpu_one_process": bench_decode_inline(files, args.size),
        "cpu_pool": bench_decode_pool(files, args.size, usable_cores()),
    }
    gpu = max(results["gpu"]["one_at_a_time_img_per_s"], results["gpu"]["batched_img_per_s"])
    pool = results["cpu_pool"]["img_per_s_after_first"]
    results["gpu_over_cpu_pool"] = round(gpu / pool, 2) if pool else None
    settings = {
        "cohort": shown(args.cohort),
        "files": len(files),
        "batch": args.batch,
        "size": args.size,
        "nvimgcodec_version": getattr(nvimgcodec, "__version__", None),
    }
    out = write_result("gpu_decode", {"settings": settings, "results": results})
    print(
        f"JPEG 2000, {len(files)} files: GPU (full frame) {gpu} img/s, CPU pool ({usable_cores()} workers, reduced) "
        f"{pool} img/s, x{results['gpu_over_cpu_pool']}; pixels {results['pixels']}\nwrote {out}"
    )


if __name__ == "__main__":
    main()
