"""The benchmark suite runs: each script of `make bench` at toy settings (resnet18 at S=64, a 2-patient small
cohort, fractions of a second per setting) into a temporary results folder, then summarize.py over what
they wrote. The figures are meaningless at this size; what is checked is that every script runs, writes
its JSON with the machine and command, and that the plot and the README table come out of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dens import synth

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "cohort"
    synth.generate(out, patients=2, size="small", seed=14, workers=1, progress=False)
    return out


def _run(script: str, *args: str, results: Path) -> None:
    env = {**os.environ, "DENS_BENCH_RESULTS": str(results)}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_every_benchmark_runs_and_summarize_reads_them(cohort, tmp_path):
    results = tmp_path / "results"
    model = ("--arch", "resnet18", "--size", "64")
    _run("decode.py", "--cohort", str(cohort), "--real", str(tmp_path / "none"), "--size", "64", "--repeat", "1",
         results=results)  # fmt: skip
    _run("model_stage.py", *model, "--device", "cpu", "--batch-sizes", "1,2", "--seconds", "0.2", results=results)
    _run("pipeline.py", "--cohort", str(cohort), *model, "--device", "cpu", "--model-seconds", "0.2", results=results)
    _run("scaling.py", "--cohort", str(cohort), *model, "--device", "cpu", "--workers", "1,2", "--model-seconds",
         "0.2", results=results)  # fmt: skip
    _run("train_step.py", "--device", "cpu", *("--arch", "resnet18", "--size", "64", "--batch", "2"),
         "--min-seconds", "0", "--min-steps", "1", results=results)  # fmt: skip
    _run("gradcam.py", "--device", "cpu", "--models", "resnet18:64", "--batches", "1", "--repeat", "1",
         results=results)  # fmt: skip

    written = {json.loads(p.read_text())["benchmark"]: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert set(written) == {"decode", "model", "pipeline", "scaling", "train_step", "gradcam"}
    for name, record in written.items():
        assert record["machine"]["cpu_count"] and record["command"].startswith("python bench/"), name
    pipeline = written["pipeline"]["results"]
    assert pipeline["dens_infer"]["images"] == pipeline["naive"]["images"] > 0
    assert pipeline["model_stage"]["alone_img_per_s"] > 0  # the share itself needs a longer run than this
    assert [p["workers"] for p in written["scaling"]["points"]] == [1, 2]
    assert {p["bound"] for p in written["scaling"]["points"]} <= {"decode", "model", "hand-off"}
    assert written["decode"]["results"]["synthetic_full"]["jpeg2000"]["files"] > 0

    readme = tmp_path / "README.md"
    readme.write_text("kept above\n<!-- figures:start -->\nold table\n<!-- figures:end -->\nkept below\n")
    _run("summarize.py", "--results", str(results), "--readme", str(readme), results=results)
    text = readme.read_text()
    assert "kept above" in text and "kept below" in text and "old table" not in text
    for name in written:
        assert f"| {name} |" in text
    assert "naive reference" in text and "decode workers" in text and "training step" in text
    (png,) = results.glob("summary-*.png")
    assert png.stat().st_size > 10_000


def test_share_of_peak_and_bound_labels():
    sys.path.insert(0, str(BENCH))
    try:
        from model_stage import fp16_peak
        from scaling import bound
    finally:
        sys.path.remove(str(BENCH))
    assert fp16_peak("NVIDIA H100 80GB HBM3") == fp16_peak("NVIDIA H200") == 989.4
    assert fp16_peak("NVIDIA H100 NVL") == 835.0 and fp16_peak("NVIDIA H100 PCIe") == 756.0
    assert fp16_peak("NVIDIA L40S") == 362.0 and fp16_peak("Tesla T4") is None and fp16_peak(None) is None
    point = {"run_s": 10.0, "wait_for_decode_s": 0.5, "model_s": 8.0}
    assert bound(point) == "model"
    assert bound({**point, "wait_for_decode_s": 3.0}) == "decode"
    assert bound({**point, "model_s": 4.0}) == "hand-off"


def test_gpu_decoding_benchmark_says_why_it_cannot_run(tmp_path):
    # It measures nvImageCodec on a GPU; elsewhere it must stop with the reason, writing nothing.
    if _cuda_and_nvimgcodec():
        pytest.skip("a GPU with nvImageCodec is here: bench/gpu_session.sh runs this benchmark for real")
    env = {**os.environ, "DENS_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_decode.py"), "--cohort", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "gpu_decode: " in proc.stderr
    assert ("no CUDA device" in proc.stderr) or ("nvImageCodec is not installed" in proc.stderr)
    assert not list(tmp_path.glob("*.json"))


def _cuda_and_nvimgcodec() -> bool:
    import importlib.util

    import torch

    try:
        return torch.cuda.is_available() and importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:  # no nvidia package at all
        return False


def test_a_refused_setting_is_shown_in_the_table_not_dropped():
    sys.path.insert(0, str(BENCH))
    try:
        from summarize import model_figures
    finally:
        sys.path.remove(str(BENCH))
    refused = {"setting": "ort fp16 prefer_nhwc", "batch": 64, "error": "unknown provider option"}
    record = {"settings": {"arch": "resnet50", "size": 512}, "results": [refused]}
    (figure,) = model_figures(record)
    assert figure.img_per_s == 0 and figure.note == "failed: unknown provider option"
    assert figure.setting == "ort fp16 prefer_nhwc, batch 64"


def test_machines_sharing_a_host_name_get_their_own_plot():
    sys.path.insert(0, str(BENCH))
    try:
        from summarize import machine_label
    finally:
        sys.path.remove(str(BENCH))
    amd, intel = ("vm", "AMD EPYC", 2, None), ("vm", "Intel(R) Xeon(R) Processor", 2, None)
    h100 = ("h100", "Intel(R) Xeon(R) Platinum", 16, "NVIDIA H100 80GB HBM3")
    assert machine_label(h100, [amd, h100]) == "h100" and machine_label(amd, [amd, h100]) == "vm"
    assert {machine_label(amd, [amd, intel]), machine_label(intel, [amd, intel])} == {
        "vm-amd-epyc-2c", "vm-intel-r-xeon-r-processor-2c"}
