"""dens-infer: one row per file over a cohort mixed with bad files, PyTorch parity, the same predictions
whatever the worker count and batch size, kill -9 and --resume, a crashing decode worker, provider choice,
the walk, the writer's torn-end handling and the breast/exam aggregation."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openjpeg
import pandas as pd
import pytest
from click.testing import CliRunner
from pydicom.uid import JPEG2000Lossless

from conftest import synthetic_breast, write_dicom
from dens import labels
from dens.engine import DecodePool
from dens.exams import breasts, exams
from dens.infer import EXIT_ERRORS, EXIT_FAILED, EXIT_OK
from dens.infer.cli import main as infer_main
from dens.infer.runner import InferConfig, InferError, run
from dens.preds.columns import COLUMNS, HEADER, make_row
from dens.preds.writer import OutputExists, PredsWriter, read_existing
from dens.route.config import PreprocessConfig
from dens.scoring import runtime
from dens.sources import walk

S = 64
TOLERANCE = 1e-4  # the export's parity tolerance on probabilities
GPU_TOLERANCE = 5e-3  # CUDA against the CPU: cuDNN's convolutions run in TF32 by default, MLAS's in fp32
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.22"
FOR_PROCESSING_SOP = "1.2.840.10008.5.1.4.1.1.1.2.1"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, model.onnx): a random resnet18 at S=64, temperature 1.5."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, build_model("resnet18"), PreprocessConfig(size=S), temperature=1.5)
    return checkpoint, export_onnx(checkpoint, root / "model.onnx")


# What each bad file must become: (status, reason code).
EXPECTED = {
    "truncated.dcm": ("error", None),  # corrupt_pixel_data or unreadable, depending on where the cut falls
    "notes.txt": ("skipped", "not_dicom"),
    "report-sr.dcm": ("skipped", "non_image_object"),
    "raw-for-processing.dcm": ("skipped", "for_processing"),
    "cleavage.dcm": ("skipped", "excluded_view"),
    "corrupt-j2k.dcm": ("error", "corrupt_pixel_data"),
    "empty.dcm": ("error", "empty_file"),
    "dangling": ("error", "unreadable"),
    "train.csv": ("skipped", "not_dicom"),
    "IMG0001": ("ok", ""),  # DICOM without an extension: recognised by content
}


@pytest.fixture(scope="module")
def studies(tmp_path_factory, synthetic_cohort) -> Path:
    """3 synthetic patients (small) plus the bad files, a symlink loop and a second link to one folder."""
    root = tmp_path_factory.mktemp("studies") / "studies"
    shutil.copytree(synthetic_cohort(3, seed=5), root)  # the shared cohort stays as it was made
    first = root / pd.read_csv(root / "train.csv")[labels.PATH].iloc[0]
    bad = root / "zz-bad"
    bad.mkdir()
    data = first.read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) // 2])
    shutil.copyfile(first, bad / "IMG0001")
    (bad / "notes.txt").write_text("patient list\n" * 20)
    (bad / "empty.dcm").touch()
    (bad / "dangling").symlink_to(root / "no-such-file.dcm")
    stored = synthetic_breast()
    write_dicom(bad / "report-sr.dcm", None, sop_class=SR_SOP, modality="SR")
    write_dicom(bad / "raw-for-processing.dcm", stored, sop_class=FOR_PROCESSING_SOP, bits_stored=12)
    write_dicom(bad / "cleavage.dcm", stored, bits_stored=12, ViewPosition="CV")
    codestream = openjpeg.encode(stored, bits_stored=12)
    write_dicom(
        bad / "corrupt-j2k.dcm",
        stored,
        syntax=JPEG2000Lossless,
        bits_stored=12,
        frame=codestream[: len(codestream) // 2],
    )
    (bad / "loop").symlink_to("..", target_is_directory=True)  # a loop: entered once only
    (root / "again").symlink_to(bad, target_is_directory=True)  # a second link to a visited folder
    return root


def real_files(root: Path) -> set[str]:
    """What dens-infer must account for, found independently of dens.sources: every file of the tree
    (not through its symlinked folders), by real path, and the dangling link itself."""
    out = set()
    for folder, _, files in os.walk(root, followlinks=False):
        out.update(os.path.realpath(Path(folder) / name) for name in files)
    return out


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def probabilities(preds: pd.DataFrame) -> dict[str, np.ndarray]:
    ok = preds[preds[labels.STATUS] == "ok"]
    return dict(zip(ok[labels.PATH], ok[list(labels.PROB_COLUMNS)].astype(float).to_numpy(), strict=True))


@pytest.fixture(scope="module")
def first_run(studies, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "preds.csv"
    summary = run(InferConfig(studies, out, model=model[1], workers=2, batch_size=4, progress=False))
    return summary, read(out)


def test_every_file_gets_exactly_one_row_with_its_status(studies, first_run):
    summary, preds = first_run
    assert list(preds.columns) == list(COLUMNS)
    assert {os.path.realpath(p) for p in preds[labels.PATH]} == real_files(studies)
    assert preds[labels.PATH].map(os.path.realpath).is_unique  # the loop and the second link: entered once
    by_name = {Path(p).name: r for p, r in zip(preds[labels.PATH], preds.to_dict("records"), strict=True)}
    for name, (status, reason) in EXPECTED.items():
        row = by_name[name]
        assert row[labels.STATUS] == status, row
        if reason is not None:
            assert row[labels.REASON].split(":")[0] == reason, row
    dicom_files = [p for p in preds[labels.PATH] if p.endswith(".dcm") and "zz-bad" not in p and "again" not in p]
    assert (preds.set_index(labels.PATH).loc[dicom_files, labels.STATUS] == "ok").all()
    ok = preds[preds[labels.STATUS] == "ok"]
    assert (ok[list(labels.PROB_COLUMNS)].astype(float).sum(axis=1) - 1).abs().max() < 1e-5
    assert set(ok[labels.LATERALITY]) <= {"L", "R"} and ok[labels.SOP_UID].all() and ok[labels.STUDY_UID].all()
    assert (preds["model_sha256"].str.len() == 64).all()
    for name in ("report-sr.dcm", "raw-for-processing.dcm", "cleavage.dcm", "corrupt-j2k.dcm"):  # headers read
        row = by_name[name]
        assert row[labels.SOP_UID] and row[labels.STUDY_UID] and row[labels.PATIENT_ID] == "P0001", row
    assert not by_name["notes.txt"][labels.SOP_UID] and not by_name["empty.dcm"][labels.SOP_UID]  # no header
    assert (summary.ok, summary.errors) == (len(ok), (preds[labels.STATUS] == "error").sum())
    assert summary.files == len(preds) and summary.exit_code == EXIT_ERRORS


def test_breast_and_exam_csvs_beside_preds(first_run):
    summary, preds = first_run
    breast, exam = read(summary.breast_csv), read(summary.exam_csv)
    ok = preds[preds[labels.STATUS] == "ok"]
    # IMG0001 is a copy of a cohort file: same SOP, counted in its study's breast.
    assert breast["n_images"].astype(int).sum() == len(ok)
    assert set(exam[labels.STUDY_UID]) == set(ok[labels.STUDY_UID])
    for _, e in exam.iterrows():
        sides = breast[breast[labels.STUDY_UID] == e[labels.STUDY_UID]]
        densest = max(sides[labels.DENSITY], key=labels.class_index)
        assert e[labels.DENSITY] == densest


def test_predictions_equal_pytorch_on_the_checkpoint(first_run, model):
    import torch

    from dens.artifact.model import load_checkpoint
    from dens.route.preprocess import load

    ckpt = load_checkpoint(model[0])
    got = probabilities(first_run[1])
    paths = sorted(got)
    images = np.stack([load(p, ckpt.preprocess)[0] for p in paths])[:, None]
    with torch.no_grad():
        want = torch.softmax(ckpt.model(torch.from_numpy(images)) / ckpt.temperature, dim=1).numpy()
    np.testing.assert_allclose(np.stack([got[p] for p in paths]), want, atol=TOLERANCE, rtol=0)


def test_same_predictions_whatever_workers_and_batch_size(studies, model, first_run, tmp_path):
    summary = run(InferConfig(studies, tmp_path / "preds.csv", model=model[1], workers=1, batch_size=3, progress=False))
    again = read(tmp_path / "preds.csv")
    assert list(again[labels.PATH]) == list(first_run[1][labels.PATH])  # deterministic order too
    got, want = probabilities(again), probabilities(first_run[1])
    assert got.keys() == want.keys()
    np.testing.assert_allclose(np.stack([got[p] for p in want]), np.stack(list(want.values())), atol=1e-6)
    assert summary.exit_code == EXIT_ERRORS


def test_kill_9_mid_run_then_resume(studies, model, first_run, tmp_path):
    out = tmp_path / "preds.csv"
    command = [
        sys.executable,
        "-c",
        "from dens.infer.cli import main; main()",
        str(studies),
        "--out",
        str(out),
        "--model",
        str(model[1]),
        "--workers",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    rows = 0
    while time.monotonic() < deadline and proc.poll() is None:
        rows = out.read_bytes().count(b"\n") - 1 if out.exists() else 0
        if rows >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = len(first_run[1])
    written = out.read_bytes().count(b"\n") - 1
    assert 3 <= written < total, f"the kill did not land mid-run ({written} of {total} rows)"
    with open(out, "ab") as f:  # and as if it had died in the middle of a write
        f.write(b"/half/a/row.dcm,o")
    refused = CliRunner().invoke(infer_main, [str(studies), "--out", str(out), "--model", str(model[1])])
    assert refused.exit_code == EXIT_FAILED and "--resume" in refused.output
    summary = run(InferConfig(studies, out, model=model[1], resume=True, progress=False))
    preds = read(out)
    assert sorted(preds[labels.PATH]) == sorted(first_run[1][labels.PATH])  # each file exactly once
    assert summary.already_done == written and summary.files == total - written
    got, want = probabilities(preds), probabilities(first_run[1])
    np.testing.assert_allclose(np.stack([got[p] for p in want]), np.stack(list(want.values())), atol=1e-6)


def test_a_crashing_decode_worker_costs_one_error_row(studies, model, first_run, tmp_path, codec_fault):
    victim = sorted(p for p in first_run[1][labels.PATH] if p.endswith(".dcm") and "zz-bad" not in p)[2]
    codec_fault("crash", Path(victim).name)  # spawned workers SIGSEGV on that file
    summary = run(InferConfig(studies, tmp_path / "preds.csv", model=model[1], workers=2, batch_size=4, progress=False))
    preds = read(tmp_path / "preds.csv").set_index(labels.PATH)
    assert preds.loc[victim, labels.STATUS] == "error"
    assert preds.loc[victim, labels.REASON].startswith("worker_crashed") and "SIGSEGV" in preds.loc[victim, "reason"]
    before = first_run[1].set_index(labels.PATH)[labels.STATUS]
    assert (preds[labels.STATUS].drop(victim) == before.drop(victim)).all()  # the pool carried on
    assert summary.errors == (before == "error").sum() + 1


def test_cli_exit_status_and_summary(studies, model, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(next(p for p in sorted(studies.iterdir()) if p.is_dir() and p.name.isdigit()), clean)
    result = CliRunner().invoke(
        infer_main, [str(clean), "--out", str(tmp_path / "p.csv"), "--model", str(model[1]), "--workers", "1"]
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "files" in result.output and "img/s" in result.output and "0 errors" in result.output
    assert (tmp_path / "p.breast.csv").is_file() and (tmp_path / "p.exam.csv").is_file()
    assert CliRunner().invoke(infer_main, [str(clean), "--device", "gpu"]).exit_code == 2


def _until_all_ready(pool: DecodePool, items: list) -> list:
    """map() until every worker has reported ready: a fast worker can take a whole short list alone."""
    for _ in range(50):
        results = list(pool.map(items))
        if None not in pool.cv2_threads:
            break
    return results


def test_workers_pin_opencv_to_one_thread(studies):
    with DecodePool(2, PreprocessConfig(size=S)) as pool:
        items = [(str(studies / "zz-bad" / "IMG0001"), ""), (str(studies / "nothing"), "gone")]
        results = _until_all_ready(pool, items)
        assert pool.cv2_threads == [1, 1]
    assert [r.status for r in results] == ["ok", "error"] and results[0].image.shape == (S, S)


def test_decode_workers_yield_to_the_model_on_cpu(studies):
    # On the CPU the model is the bottleneck: the workers decode at a lower priority and fill its gaps.
    base = os.nice(0)
    with DecodePool(2, PreprocessConfig(size=S), nice=3) as pool:
        _until_all_ready(pool, [(str(studies / "zz-bad" / "IMG0001"), "")])
        assert pool.niceness == [base + 3] * 2
    with DecodePool(1) as pool:  # as dens-infer does: the niceness once the model's device is known
        pool.configure(PreprocessConfig(size=S), nice=2)
        list(pool.map([(str(studies / "zz-bad" / "IMG0001"), "")]))
        assert pool.niceness == [base + 2]
    assert runtime.decode_nice("cpu") == runtime.CPU_DECODE_NICE > 0
    assert runtime.decode_nice("cuda") == runtime.decode_nice("tensorrt") == 0
    assert runtime.default_parallelism("cpu", cores=8) == (8, 8)
    assert runtime.default_parallelism("cuda", cores=8) == (7, 1)


def test_work_in_flight_is_bounded(studies):
    # Memory stays flat on any archive: the pool reads ahead of a slow consumer by a fixed window only.
    pulled, ahead = 0, []

    def items():
        nonlocal pulled
        for _ in range(40):
            pulled += 1
            yield str(studies / "zz-bad" / "notes.txt"), ""

    with DecodePool(2, PreprocessConfig(size=S), per_worker=2, buffer=4) as pool:
        for consumed, result in enumerate(pool.map(items()), start=1):
            assert result.status == "skipped"
            time.sleep(0.02)  # a consumer slower than the decoders: the model, on the CPU
            ahead.append(pulled - consumed)
    assert consumed == 40
    assert 4 <= max(ahead) <= 2 * 4 + 2 * 2 + 1  # the queue, the window (tasks + reordered), one in hand


# --- the runtime: provider choice never silently lands on the CPU -----------------------------------


def test_auto_runs_on_the_cpu_without_a_gpu(model):
    if runtime.gpu_present():
        pytest.skip("a GPU is present")
    rt = runtime.open_runtime(model[1], "auto")
    assert (rt.device, rt.provider, rt.batch_size) == ("cpu", "CPUExecutionProvider", runtime.DEFAULT_BATCH["cpu"])
    assert rt.predict(np.zeros((3, 1, S, S), np.uint8)).shape == (3, 4)


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_explicit_gpu_request_without_a_gpu_is_an_error(model, device):
    if runtime.gpu_present():
        pytest.skip("a GPU is present")
    with pytest.raises(runtime.DeviceError, match="no CUDA GPU"):
        runtime.open_runtime(model[1], device)


def test_a_gpu_provider_that_falls_back_to_the_cpu_is_caught(model, monkeypatch):
    # onnxruntime-gpu accepts the CUDA provider here and silently runs on the CPU: the session says so.
    if runtime.gpu_present():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime, "tensorrt_present", lambda: False)
    with pytest.raises(runtime.DeviceError, match="could not start CUDAExecutionProvider"):
        runtime.open_runtime(model[1], "cuda")
    rt = runtime.open_runtime(model[1], "auto")  # auto: a logged fall-back, with the CPU's threads
    assert rt.device == "cpu" and rt.threads == runtime.default_parallelism("cpu")[1]
    with pytest.raises(runtime.DeviceError, match="TensorRT"):
        runtime.open_runtime(model[1], "tensorrt")


def test_a_fall_back_to_the_cpu_gets_the_cpus_decode_workers(studies, model, tmp_path, monkeypatch):
    # The pool starts before the model opens, sized for the GPU that was planned (a core left to feed it);
    # when the GPU provider does not load, the CPU run gets the CPU's count, every core.
    if runtime.gpu_present():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime, "tensorrt_present", lambda: False)
    summary = run(InferConfig(studies, tmp_path / "preds.csv", model=model[1], batch_size=4, progress=False))
    assert summary.provider == "CPUExecutionProvider"
    assert (summary.workers, summary.threads) == runtime.default_parallelism("cpu")


def test_extra_cuda_options_reach_the_cuda_provider_only(model, monkeypatch):
    import onnxruntime as ort

    if runtime.gpu_present():
        pytest.skip("a GPU is present")
    asked = []
    real = ort.InferenceSession

    def spy(path, options, providers, provider_options):
        asked.append(dict(zip(providers, provider_options, strict=True)))
        return real(path, options, providers=providers, provider_options=provider_options)

    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime, "tensorrt_present", lambda: False)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    runtime.open_runtime(model[1], "auto", cuda_options={"prefer_nhwc": "1"})  # falls back to the CPU here
    assert asked[0] == {"CUDAExecutionProvider": {"device_id": 0, "prefer_nhwc": "1"}, "CPUExecutionProvider": {}}


def test_a_gpu_session_loads_torchs_cuda_libraries_first(model):
    # ORT's own preload looks for the nvidia packages beside onnxruntime only; torch's import loads them
    # from wherever torch is. Fresh processes, since this one imported torch long ago; a CPU run stays
    # torch-free (dens-infer's start-up).
    if runtime.gpu_present():
        pytest.skip("a GPU is present (the fall-back to the CPU below is simulated)")
    code = (
        "import sys, onnxruntime as ort\nfrom dens.scoring import runtime\ncalls = []\n"
        "ort.preload_dlls = lambda: calls.append('torch' in sys.modules)\n"
        "runtime.gpu_present = lambda: {gpu}\nruntime.tensorrt_present = lambda: False\n"
        f"rt = runtime.open_runtime({str(model[1])!r}, 'auto')\n"
        "print(calls, rt.device, 'torch' in sys.modules)"
    )
    for gpu, expected in ((True, "[True] cpu True"), (False, "[] cpu False")):
        done = subprocess.run([sys.executable, "-c", code.format(gpu=gpu)], capture_output=True, text=True, check=True)
        assert done.stdout.split("\n")[-2] == expected


def test_the_io_binding_path_matches_the_plain_run(model, monkeypatch):
    # The CUDA path binds a uint8 input buffer per batch shape (reused, at most two kept) and copies only the
    # probabilities back. No GPU is needed to check that logic: the same calls on a CPU session, with the
    # buffers made on the host.
    import onnxruntime as ort

    rt = runtime.open_runtime(model[1], "cpu")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 1, S, S), dtype=np.uint8) for n in (2, 3, 2, 1, 3)]
    expected = [rt.predict(b) for b in batches]
    made = []
    host = ort.OrtValue.ortvalue_from_shape_and_type

    def on_host(shape, dtype, device, device_id):
        assert (device, device_id) == ("cuda", 0)
        made.append(tuple(shape))
        return host(shape, dtype, "cpu", 0)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", staticmethod(on_host))
    rt.device = "cuda"
    for batch, want in zip(batches, expected, strict=True):
        np.testing.assert_allclose(rt.predict(batch), want, rtol=1e-5, atol=1e-6)
    assert made == [(2, 1, S, S), (3, 1, S, S), (1, 1, S, S), (3, 1, S, S)]  # reused while kept
    assert len(rt._device_input) <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not runtime.gpu_present(), reason="needs a CUDA device")
def test_the_cuda_provider_with_io_binding_matches_the_cpu(model):
    gpu, cpu = runtime.open_runtime(model[1], "cuda"), runtime.open_runtime(model[1], "cpu")
    assert (gpu.device, gpu.provider) == ("cuda", "CUDAExecutionProvider")
    rng = np.random.default_rng(1)
    for n in (1, 4, 4, 2, 3):  # new shapes, reused ones, and more shapes than the two buffers kept
        batch = rng.integers(0, 256, (n, 1, S, S), dtype=np.uint8)
        np.testing.assert_allclose(gpu.predict(batch), cpu.predict(batch), atol=GPU_TOLERANCE, rtol=0)
    assert len(gpu._device_input) <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not runtime.gpu_present(), reason="needs a CUDA device")
def test_dens_infer_on_cuda_gives_the_cpu_rows(studies, model, first_run, tmp_path):
    summary = run(InferConfig(studies, tmp_path / "preds.csv", model=model[1], device="cuda", progress=False))
    again = read(tmp_path / "preds.csv")
    assert summary.provider == "CUDAExecutionProvider"
    assert list(again[labels.PATH]) == list(first_run[1][labels.PATH])
    assert list(again[labels.STATUS]) == list(first_run[1][labels.STATUS])
    got, want = probabilities(again), probabilities(first_run[1])
    np.testing.assert_allclose(np.stack([got[p] for p in want]), np.stack(list(want.values())), atol=GPU_TOLERANCE)


def test_a_model_without_dens_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["probs"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [None, 1, S, S])],
        [helper.make_tensor_value_info("probs", TensorProto.UINT8, [None, 1, S, S])],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    with pytest.raises(runtime.ModelError, match="dens-export"):
        runtime.open_runtime(path, "cpu")
    with pytest.raises(InferError, match="not found"):
        run(InferConfig(tmp_path, tmp_path / "p.csv", model=tmp_path / "missing.onnx"))


# --- the walk ---------------------------------------------------------------------------------------


def test_walk_is_sorted_follows_links_once_and_skips_its_outputs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    for name in ("b/2", "b/1", "a/z", "c"):
        (tmp_path / name).write_text(name)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "x").write_text("x")
    (tmp_path / "link-out").symlink_to(outside, target_is_directory=True)
    (tmp_path / "a" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "preds.csv").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    entries = list(walk(tmp_path, exclude=[tmp_path / "preds.csv"]))
    names = [os.path.relpath(e.path, tmp_path) for e in entries]
    assert names == ["a/z", "b/1", "b/2", "c", "fifo", "link-out/x"]
    assert [bool(e.problem) for e in entries] == [False, False, False, False, True, False]


# --- the writer ------------------------------------------------------------------------------------


def _row(path: str, status: str = "ok") -> dict:
    probs = [0.1, 0.2, 0.3, 0.4] if status == "ok" else None
    return make_row(
        path,
        status=status,
        reason="" if probs else "not_dicom: x",
        info={"laterality": "L"},
        probs=probs,
        model_sha256="f" * 64,
    )


@pytest.mark.parametrize(
    "tail",
    [b"", b"/d/3.dcm,ok,,P", b'"/d/new\nline.dcm",ok', b'"/d/new\n'],
    ids=["clean", "cut-row", "cut-after-quoted-newline", "cut-inside-quotes"],
)
def test_resume_drops_a_torn_last_record(tmp_path, tail):
    path = tmp_path / "preds.csv"
    with PredsWriter(path) as writer:
        writer.write([_row("/d/1.dcm"), _row("/d/2, with comma.txt", "skipped")])
    with open(path, "ab") as f:
        f.write(tail)
    with PredsWriter(path, resume=True) as writer:
        assert writer.done == {"/d/1.dcm", "/d/2, with comma.txt"} and writer.models == {"f" * 64}
        writer.write([_row("/d/3.dcm")])
    assert [r[0] for r in read_existing(path).rows] == ["/d/1.dcm", "/d/2, with comma.txt", "/d/3.dcm"]
    assert not read_existing(path).torn


def test_writer_refuses_an_existing_output_and_foreign_files(tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text(HEADER)
    with pytest.raises(OutputExists, match="--resume"):
        PredsWriter(path)
    with PredsWriter(path, overwrite=True) as writer:
        assert not writer.done
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        PredsWriter(path, resume=True)
    path.write_text(HEADER[:20])  # killed while writing the header
    with PredsWriter(path, resume=True) as writer:
        assert not writer.done
    assert path.read_text() == HEADER


# --- aggregation -----------------------------------------------------------------------------------


def _preds(rows: list[tuple[str, str, str, str, list[float]]]) -> pd.DataFrame:
    out = []
    for i, (study, accession, side, view, probs) in enumerate(rows):
        info = {
            labels.STUDY_UID: study,
            labels.ACCESSION: accession,
            labels.PATIENT_ID: "P",
            labels.LATERALITY: side,
            labels.VIEW: view,
        }
        out.append(make_row(f"/d/{i}.dcm", status="ok", info=info, probs=probs, model_sha256="f" * 64))
    out.append(make_row("/d/x.txt", status="skipped", reason="not_dicom: x", model_sha256="f" * 64))
    return pd.DataFrame(out)


def test_breast_is_the_mean_of_its_views_and_the_denser_breast_sets_the_exam():
    a, b, c, d = [0.7, 0.2, 0.05, 0.05], [0.1, 0.6, 0.2, 0.1], [0.05, 0.15, 0.6, 0.2], [0.0, 0.1, 0.2, 0.7]
    preds = _preds(
        [
            ("S1", "", "L", "CC", a),
            ("S1", "", "L", "MLO", a),
            ("S1", "", "R", "CC", c),
            ("S1", "", "R", "MLO", d),  # right: mean of C and D views
            ("", "ACC2", "L", "CC", b),
            ("", "ACC2", "R", "CC", c),
        ]
    )  # no study UID: the accession
    breast = breasts(preds)
    assert len(breast) == 4
    right = breast[(breast[labels.STUDY_UID] == "S1") & (breast[labels.LATERALITY] == "R")].iloc[0]
    np.testing.assert_allclose(right[list(labels.PROB_COLUMNS)].astype(float), (np.array(c) + np.array(d)) / 2)
    assert right["views"] == "CC;MLO" and right["n_images"] == "2" and right[labels.DENSITY] == "D"
    exam = exams(breast).set_index("exam")
    s1, acc2 = exam.loc["study_uid:S1"], exam.loc["accession:ACC2"]
    assert (s1[labels.DENSITY], s1["density_L"], s1["density_R"], s1["lr_disagreement"]) == ("D", "A", "D", "true")
    assert (acc2[labels.DENSITY], acc2["lr_disagreement"], acc2["flagged"]) == ("C", "false", "true")
    assert s1["n_images"] == "4"
