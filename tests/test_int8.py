"""int8: dens-export --int8 on a small trained model (its graph, metadata and decision parity with fp32; a
failing parity exits 2), dens-infer --precision int8, the calibration split and the agreement figures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dens import labels
from dens.artifact.metadata import (
    METADATA_KEY,
    OnnxMetadataError,
    file_sha256,
    parse_metadata,
    read_metadata,
    variant_path,
)
from dens.artifact.model import load_checkpoint
from dens.export.cli import PARITY_FAILED
from dens.export.cli import main as export_main
from dens.export.config import DEFAULT_CALIBRATION_IMAGES
from dens.export.parity import ImageSet, load_images
from dens.export.quantize import (
    Int8Thresholds,
    check_int8_parity,
    cohen_kappa,
    decision_agreement,
    split_calibration,
)
from dens.export.runner import ExportConfig
from dens.infer.cli import main as infer_main

SIZE = 64


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, synthetic_cohort) -> Path:
    return synthetic_cohort(3, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cohort) -> Path:
    """A resnet18 at S=64 trained for eight epochs at a high rate on the shared synthetic cohort (seconds on a
    CPU): its calls are confident (top-two margins of 0.66-0.95 when measured), not near-ties that any
    rounding flips. Two epochs left it near uniform (validation NLL 1.46, ln 4 = 1.39), and one held-out
    image of six then changed class under int8 with |dp| 0.005.

    On canonical image version 2: this cohort of three patients from mixed synthetic machines has no family
    with the eight training images version 3 fits a line on, so every image takes the pooled line, and the
    model trained on it calls all six held-out images B, whose calls no tampering could change. Version 2's
    per-image stretch evens the machines out, which is all a parity test of the graph needs."""
    from dens.train import loop
    from dens.train.config import TrainConfig

    root = tmp_path_factory.mktemp("int8-train")
    cfg = TrainConfig(
        data=str(cohort),
        out=str(root / "run"),
        arch="resnet18",
        weights="none",
        size=SIZE,
        preprocess_version=2,
        epochs=8,
        batch_size=4,
        lr=3e-3,
        bootstrap=0,
        workers=0,
        decode_workers=2,
        cache=str(root / "cache"),
        progress=False,
    )
    loop.run(cfg)
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def exported(checkpoint, cohort):
    """`dens-export --onnx --int8 --calibrate COHORT` on the trained checkpoint."""
    result = CliRunner().invoke(
        export_main,
        ["--onnx", "--checkpoint", str(checkpoint), "--int8", "--calibrate", str(cohort), "--no-progress"],
    )
    return result, checkpoint.parent / "model.onnx", checkpoint.parent / "model.int8.onnx"


def test_int8_export_passes_decision_parity(exported):
    result, fp32, int8 = exported
    assert result.exit_code == 0, result.output
    assert "model.int8.onnx (int8" in result.output and "parity with fp32 passed" in result.output
    report = json.loads(int8.with_name("model.int8.parity.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert report["thresholds"] == {"argmax_agreement": 0.97, "dense_agreement": 0.99, "mean_abs_prob_diff": 0.02}
    assert report["dense_agreement"] >= 0.99 and report["argmax_agreement"] >= 0.97
    assert report["images"] == report["held_out"]["count"] > 0
    assert report["onnx_sha256"] == file_sha256(int8) and report["reference_sha256"] == file_sha256(fp32)
    assert 0 < report["mean_abs_prob_diff"] <= report["max_abs_prob_diff"]  # int8 is not fp32 under a new name


def test_int8_metadata_is_the_fp32_metadata_plus_its_calibration(exported, cohort, checkpoint):
    _, fp32, int8 = exported
    meta, source = read_metadata(int8), read_metadata(fp32)
    assert meta["precision"] == "int8"
    # Each file is signed for its own graph (dens.artifact.metadata), so the signatures differ too.
    assert {k: v for k, v in meta.items() if k not in ("precision", "exported_at", "int8", "signature")} == {
        k: v for k, v in source.items() if k not in ("precision", "exported_at", "signature")
    }
    quant = meta["int8"]
    assert quant["format"] == "u8s8" and quant["source_sha256"] == file_sha256(fp32)
    report = json.loads(int8.with_name("model.int8.parity.json").read_text())
    held_out, calibration = report["held_out"]["files"], report["calibration_files"]
    assert (quant["calibration_images"], quant["held_out_images"]) == (len(calibration), len(held_out))
    assert quant["calibration_sha256"] == hashlib.sha256("\n".join(calibration).encode()).hexdigest()
    # The lists are the folder's usable files in sorted order, whatever order the decode engine finished them in.
    images = load_images(cohort, load_checkpoint(checkpoint), max_images=DEFAULT_CALIBRATION_IMAGES)
    assert sorted(calibration + held_out) == [os.path.relpath(p, cohort) for p in images.used]
    assert not set(calibration) & set(held_out) and len(held_out) >= 1


def test_int8_graph_is_quantized_with_a_float_head(exported):
    _, _, int8 = exported
    model = onnx.load(str(int8))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm" and producer["probs"].op_type == "Softmax"
    # The classifier's weights stay float (no DequantizeLinear feeds it); the convolutions' are int8.
    assert all(
        producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in producer["logits"].input[1:]
    )
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert any(a.dtype == np.int8 and a.ndim == 4 for a in inits.values())
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.UINT8]


def test_a_tampered_int8_graph_fails_parity_with_exit_2(exported, checkpoint, cohort, tmp_path):
    _, fp32, int8 = exported
    work = tmp_path / "model"
    work.mkdir()
    shutil.copy(fp32, work / "model.onnx")
    model = onnx.load(str(int8))
    # Scale every per-channel weight scale of the convolutions by 40: the graph still runs, its answers do not.
    for init in model.graph.initializer:
        if init.name.endswith("_scale") and init.dims and init.dims[0] > 1:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 40, init.name))
    onnx.save(model, str(work / "model.int8.onnx"))
    result = CliRunner().invoke(
        export_main,
        [
            "--onnx",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(work / "model.onnx"),
            "--int8",
            "--calibrate",
            str(cohort),
            "--check-only",
            "--no-progress",
        ],
    )
    assert result.exit_code == PARITY_FAILED, result.output
    report = json.loads((work / "model.int8.parity.json").read_text())
    assert not report["passed"] and any("agreement" in f or "mean |Δp|" in f for f in report["failures"])
    assert "PARITY FAILED" in result.output and "model.int8.onnx" in result.output


def test_each_threshold_is_applied(exported, cohort, checkpoint):
    _, fp32, int8 = exported
    ckpt = load_checkpoint(checkpoint)
    split = split_calibration(load_images(cohort, ckpt, max_images=DEFAULT_CALIBRATION_IMAGES))
    passed = check_int8_parity(int8, fp32, split)
    assert passed["passed"], passed["failures"]
    failed = check_int8_parity(int8, fp32, split, limits=Int8Thresholds(mean_abs_prob_diff=0.0))
    assert not failed["passed"] and failed["failures"][0].startswith("mean |Δp|")
    # Another calibration list than the file's: its held-out images may have been calibrated on.
    other = split_calibration(load_images(cohort, ckpt, max_images=len(split.calibration) + len(split.held_out) - 1))
    assert any("another file list" in f for f in check_int8_parity(int8, fp32, other)["failures"])


def test_dens_infer_precision_int8_runs_the_int8_file(exported, cohort, tmp_path, caplog):
    _, fp32, int8 = exported
    out = tmp_path / "preds.csv"
    args = [str(cohort), "--model", str(fp32), "--workers", "1", "--no-progress"]
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(infer_main, [*args, "--precision", "int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"running the int8 graph {int8}" in caplog.text
    preds = pd.read_csv(out, dtype=str, keep_default_na=False)
    ok = preds[preds[labels.STATUS] == "ok"]
    assert len(ok) and set(ok[labels.MODEL_SHA256]) == {file_sha256(int8)}
    # The same run on the fp32 file makes the same dense calls.
    result = CliRunner().invoke(infer_main, [*args, "--out", str(tmp_path / "fp32.csv")])
    assert result.exit_code == 0, result.output
    reference = pd.read_csv(tmp_path / "fp32.csv", dtype=str, keep_default_na=False)
    assert set(reference[labels.MODEL_SHA256]) - {""} == {file_sha256(fp32)}
    assert reference[labels.DENSE].tolist() == preds[labels.DENSE].tolist()


def test_dens_infer_precision_without_the_file_says_how_to_make_it(exported, cohort, tmp_path):
    _, fp32, _ = exported
    work = tmp_path / "m"
    work.mkdir()
    shutil.copy(fp32, work / "model.onnx")
    result = CliRunner().invoke(
        infer_main,
        [str(cohort), "--model", str(work / "model.onnx"), "--precision", "int8", "--out", str(tmp_path / "p.csv")],
    )
    assert result.exit_code == 1
    assert "model.int8.onnx not found" in result.output and "dens-export --onnx --int8 --calibrate DIR" in result.output


def test_int8_options_are_checked():
    with pytest.raises(ValueError, match="--calibrate DIR"):
        ExportConfig(int8=True)
    with pytest.raises(ValueError, match="add --int8"):
        ExportConfig(calibrate=Path("x"))
    with pytest.raises(ValueError, match="int8 format"):
        ExportConfig(int8=True, calibrate=Path("x"), int8_format="u8u8")
    assert ExportConfig(int8=True, calibrate=Path("x"), fp16=True).precisions == ("fp32", "fp16", "int8")


def test_int8_metadata_needs_its_calibration_record():
    meta = {
        "format_version": 1,
        "classes": list(labels.CLASSES),
        "preprocess": {"size": SIZE},
        "temperature": 1.0,
        "arch": "resnet18",
        "model_args": {},
        "summary": {},
        "checkpoint_sha256": "0" * 64,
        "opset": 17,
        "precision": "int8",
        "input": "image",
        "outputs": ["probs", "logits"],
    }
    with pytest.raises(OnnxMetadataError, match="calibration record"):
        parse_metadata(json.dumps(meta), "m.int8.onnx")
    record = {"format": "u8s8", "calibration_images": 8, "calibration_sha256": "a", "source_sha256": "b"}
    assert parse_metadata(json.dumps({**meta, "int8": record}), "m.int8.onnx")["int8"] == record
    with pytest.raises(OnnxMetadataError, match="precision 'int4'"):
        parse_metadata(json.dumps({**meta, "precision": "int4"}), "m.onnx")
    assert METADATA_KEY == "dens"


def test_variant_paths():
    assert variant_path("r/model.onnx", "int8") == Path("r/model.int8.onnx")
    assert variant_path("r/model.int8.onnx", "int8") == Path("r/model.int8.onnx")
    assert variant_path("r/model.fp16.onnx", "fp32") == Path("r/model.onnx")
    assert variant_path("r/model.onnx", "fp32") == Path("r/model.onnx")


@pytest.mark.parametrize(("n", "held"), [(300, 60), (100, 40), (50, 25), (10, 5), (3, 1), (2, 1)])
def test_calibration_split_holds_out_a_spread_part(n, held):
    images = np.arange(n).reshape(n, 1, 1, 1)
    split = split_calibration(ImageSet("/d", images, n, [f"/d/{i:03d}.dcm" for i in range(n)], {}, {}))
    assert len(split.held_out) == held and len(split.calibration) == n - held
    assert not set(split.held_out_files) & set(split.calibration_files)
    assert split.held_out_files[0] == "000.dcm"
    assert held == 1 or split.held_out_files[-1] == f"{n - 1:03d}.dcm"  # spread from the first to the last
    assert split.held_out[:, 0, 0, 0].tolist() == [int(f[:3]) for f in split.held_out_files]


def test_calibration_needs_two_images():
    one = ImageSet("/d", np.zeros((1, 1, 4, 4), np.uint8), 5, ["/d/a.dcm"], {"not_dicom": 4}, {})
    with pytest.raises(ValueError, match="at least 2"):
        split_calibration(one)


def test_agreement_figures():
    assert cohen_kappa(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 4) == pytest.approx(0.5)
    assert cohen_kappa(np.array([2, 2]), np.array([2, 2]), 4) == 1.0
    ref = np.array([[0.7, 0.2, 0.05, 0.05], [0.1, 0.45, 0.4, 0.05], [0.0, 0.1, 0.3, 0.6]])
    got = np.array([[0.6, 0.3, 0.05, 0.05], [0.1, 0.40, 0.45, 0.05], [0.0, 0.1, 0.6, 0.3]])
    figures = decision_agreement(ref, got, list(labels.CLASSES))
    assert figures["argmax_agreement"] == pytest.approx(1 / 3)  # B->C and D->C
    assert figures["dense_agreement"] == pytest.approx(2 / 3)  # only B->C changes the dense call
    assert figures["max_abs_prob_diff"] == pytest.approx(0.3)
    assert figures["mean_abs_prob_diff"] == pytest.approx(np.abs(got - ref).mean())


@pytest.mark.slow
def test_the_int8_benchmark_runs_and_summarize_reads_it(cohort, tmp_path):
    """bench/int8.py at toy settings (resnet18 at S=64, fractions of a second per setting, no agreement part,
    which needs the demo model): it writes its JSON with the CPU's flags, and summarize.py tables it."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    env = {**os.environ, "DENS_BENCH_RESULTS": str(tmp_path)}
    toy = ["--arch", "resnet18", "--size", "64", "--batch-sizes", "1,2", "--seconds", "0.2", "--rounds", "1"]
    for script, args in (
        ("int8.py", ["--cohort", str(cohort), *toy, "--calibration-images", "6", "--skip-agreement"]),
        ("summarize.py", ["--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]),
    ):
        proc = subprocess.run(
            [sys.executable, str(bench / script), *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode == 0, f"{script}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (result,) = tmp_path.glob("int8-*.json")
    record = json.loads(result.read_text())
    assert isinstance(record["results"]["cpu_flags"], list) and record["machine"]["cpu"]
    graphs = {(r["graph"], r["batch"]) for r in record["results"]["model_stage"]}
    assert graphs == {(g, b) for g in ("fp32", "int8 u8s8", "int8 s8s8") for b in (1, 2)}
    assert record["results"]["end_to_end"]["int8"]["images"] == record["results"]["end_to_end"]["fp32"]["images"] > 0
    assert "int8 vs fp32 end to end" in (tmp_path / "README.md").read_text()
