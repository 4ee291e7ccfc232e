"""The benchmark suite: what its results record, that bench/README.md's table is what summarize.py makes of the
committed results, and (marked slow) that every script of `make bench` and every step of bench/gpu.sh runs
at toy settings (resnet18 at S=64, a 3-patient small cohort, fractions of a second per setting) into a
temporary results folder. The figures are meaningless at that size; what is checked is that every script
runs, writes its JSON with the machine and command, and that the plot and the README table come out of
them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture
def bench_module(monkeypatch):
    """``bench_module(name)``: a module of bench/ imported as its scripts import one another."""
    monkeypatch.syspath_prepend(str(BENCH))
    return __import__


def _run(script: str, *args: str, results: Path) -> None:
    env = {**os.environ, "DENS_BENCH_RESULTS": str(results)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_a_result_records_the_machine_and_names_no_folder_outside_the_repository(bench_module, tmp_path, monkeypatch):
    common = bench_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/decode.py", "--size", "64"])
    outside = tmp_path / "real-mammo"
    path = common.write_result(
        "decode", {"settings": {"cohort": common.shown(common.DEFAULT_COHORT), "real": common.shown(outside)}}
    )
    record = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith(f"decode-{record['machine']['host']}-")
    assert record["settings"] == {"cohort": ".cache/bench-cohort", "real": "real-mammo"}
    assert record["command"] == "python bench/decode.py --size 64"
    assert record["machine"]["cpu_count"] > 0 and len(record["load_average_end"]) == 3


def test_committed_results_name_no_folder_of_the_machine_that_ran_them():
    committed = [p for p in (BENCH / "results").rglob("*") if p.suffix in (".json", ".yaml", ".md")]
    assert committed
    for path in committed:
        text = path.read_text()
        assert not re.search(r"(^|[\s\"'`])(/|~/|[A-Za-z]:\\)[\w.-]", text, re.MULTILINE), path


def test_the_readme_table_is_what_summarize_makes_of_the_committed_results(tmp_path):
    # summarize.py draws its plots beside the results it reads: a copy keeps the committed plots untouched.
    results = tmp_path / "results"
    results.mkdir()
    for path in (BENCH / "results").glob("*.json"):
        shutil.copy(path, results)
    readme = tmp_path / "README.md"
    shutil.copy(BENCH / "README.md", readme)
    _run("summarize.py", "--results", str(results), "--readme", str(readme), results=results)
    assert readme.read_text() == (BENCH / "README.md").read_text(), "run `python bench/summarize.py`"
    drawn = {p.name for p in results.glob("summary-*.png")}
    assert drawn == {p.name for p in (BENCH / "results").glob("summary-*.png")}


@pytest.mark.slow  # fast cover: the three tests above (what a result records, the table from the results)
def test_every_benchmark_runs_and_summarize_reads_them(synthetic_cohort, tmp_path):
    cohort = synthetic_cohort(3, seed=5)
    results = tmp_path / "results"
    model = ("--arch", "resnet18", "--size", "64")
    _run(
        "decode.py",
        "--cohort",
        str(cohort),
        "--real",
        str(tmp_path / "none"),
        "--size",
        "64",
        "--repeat",
        "1",
        results=results,
    )
    _run("model_stage.py", *model, "--device", "cpu", "--batch-sizes", "1,2", "--seconds", "0.2", results=results)
    _run("pipeline.py", "--cohort", str(cohort), *model, "--device", "cpu", "--model-seconds", "0.2", results=results)
    _run(
        "scaling.py",
        "--cohort",
        str(cohort),
        *model,
        "--device",
        "cpu",
        "--workers",
        "1,2",
        "--model-seconds",
        "0.2",
        results=results,
    )
    _run(
        "train_step.py",
        "--device",
        "cpu",
        *("--arch", "resnet18", "--size", "64", "--batch", "2"),
        "--min-seconds",
        "0",
        "--min-steps",
        "1",
        results=results,
    )
    _run("gradcam.py", "--device", "cpu", "--models", "resnet18:64", "--batches", "1", "--repeat", "1", results=results)

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


@pytest.mark.slow  # fast cover: the tests above, and bench/gpu.sh's own steps are the benchmarks tested above
def test_the_gpu_suite_rehearses_every_step_on_the_cpu(tmp_path):
    results = tmp_path / "results"
    env = {
        **os.environ,
        "DENS_GPU_REHEARSAL": "1",
        "DENS_GPU_COHORT": str(tmp_path / "cohort"),
        "DENS_BENCH_RESULTS": str(results),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    written = {json.loads(p.read_text())["benchmark"] for p in results.glob("*.json")}
    assert written == {"train_step", "gradcam", "model", "pipeline", "scaling"}
    assert "| pipeline |" in (results / "README.md").read_text()
    assert "GPU decoding: left out" in proc.stdout and "every step passed" in proc.stdout


def test_share_of_peak_and_bound_labels(bench_module):
    fp16_peak = bench_module("model_stage").fp16_peak
    bound = bench_module("scaling").bound
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
        pytest.skip("a GPU with nvImageCodec is here: make bench-gpu runs this benchmark for real")
    env = {**os.environ, "DENS_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_decode.py"), "--cohort", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
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


def test_a_refused_setting_is_shown_in_the_table_not_dropped(bench_module):
    model_figures = bench_module("summarize").model_figures
    refused = {"setting": "ort fp16 prefer_nhwc", "batch": 64, "error": "unknown provider option"}
    record = {"settings": {"arch": "resnet50", "size": 512}, "results": [refused]}
    (figure,) = model_figures(record)
    assert figure.img_per_s == 0 and figure.note == "failed: unknown provider option"
    assert figure.setting == "ort fp16 prefer_nhwc, batch 64"


def test_machines_sharing_a_host_name_get_their_own_plot(bench_module):
    machine_label = bench_module("summarize").machine_label
    amd, intel = ("vm", "AMD EPYC", 2, None), ("vm", "Intel(R) Xeon(R) Processor", 2, None)
    h100 = ("h100", "Intel(R) Xeon(R) Platinum", 16, "NVIDIA H100 80GB HBM3")
    assert machine_label(h100, [amd, h100]) == "h100" and machine_label(amd, [amd, h100]) == "vm"
    assert {machine_label(amd, [amd, intel]), machine_label(intel, [amd, intel])} == {
        "vm-amd-epyc-2c",
        "vm-intel-r-xeon-r-processor-2c",
    }
