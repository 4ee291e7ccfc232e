"""dens-eval: its outputs, its figures are dens-train's test section's for the same model and images, a
checkpoint and its ONNX export agree, unusable files are counted, and bad inputs are clear errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from dens import labels, manifest
from dens.artifact.metadata import INPUT, LOGITS, read_metadata
from dens.eval import cli
from dens.eval.runner import EvalConfig, run
from dens.figures import evaluation
from dens.figures.metrics import jsonable
from dens.route.config import PreprocessConfig
from dens.route.preprocess import load

PNGS = (
    *(f"confusion_{level}.png" for level in evaluation.LEVELS),
    *(f"confusion_{level}_normalised.png" for level in evaluation.LEVELS),
    "roc_dense.png",
    "reliability.png",
)


def _close(a, b, path: str = "", rel: float = 1e-5, abs_: float = 1e-6) -> list[str]:
    """Where two metrics.json-like values differ beyond float tolerance."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}", rel, abs_)]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _close(x, y, f"{path}[{i}]", rel, abs_)]
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return [] if a is b else [f"{path}: {a} != {b}"]
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=abs_) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def trained(synthetic_cohort, tmp_path_factory) -> tuple[Path, dict]:
    """A one-epoch dens-train run on a small cohort: its folder and what its metrics.json holds."""
    from dens.train import loop
    from dens.train.config import TrainConfig

    runs = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        data=str(synthetic_cohort(patients=6, seed=5)),
        out=str(runs / "run"),
        arch="resnet18",
        weights="none",
        size=64,
        epochs=1,
        batch_size=4,
        lr=1e-3,
        bootstrap=50,
        workers=0,
        decode_workers=2,
        cache=str(runs / "cache"),
        progress=False,
    )
    return runs / "run", loop.run(cfg)


def _eval(model: Path, data: Path, out: Path, **options) -> dict:
    settings = dict(bootstrap=50, workers=2, progress=False)
    return run(EvalConfig(Path(model), Path(data), out, **{**settings, **options})).metrics


def test_eval_of_a_run_s_checkpoint_on_its_test_split_gives_its_test_section(trained, tmp_path):
    run_dir, result = trained
    metrics = _eval(run_dir / "best.pt", run_dir / "split.csv", tmp_path / "eval", split="test", device="cpu")
    test = result["test"]
    assert metrics["data"]["images"] == result["data"]["test"]["images"]
    for level in evaluation.LEVELS:  # the headline figures first: the clearest failure message
        for key in ("accuracy", "kappa_linear", "kappa_quadratic"):
            assert metrics["figures"][level][key] == pytest.approx(test[level][key], abs=1e-9, nan_ok=True)
    # Every figure, interval and group: one code path, the same images, the same model.
    assert _close(metrics["figures"], test) == []
    assert metrics["model"]["temperature"] == result["calibration"]["temperature"]
    assert _close(metrics["calibration"], result["calibration"]["test"]) == []


def test_a_checkpoint_and_its_onnx_export_give_the_same_figures_at_the_model_s_temperature(trained, tmp_path):
    from dens.artifact.model import load_checkpoint, save_checkpoint
    from dens.export.onnx import export_onnx

    run_dir, _ = trained
    # The tiny run keeps T = 1 (too few validation images to fit one): ship this copy with another.
    ckpt = load_checkpoint(run_dir / "best.pt")
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, ckpt.model, ckpt.preprocess, summary=ckpt.summary, temperature=1.7)
    onnx = export_onnx(checkpoint, tmp_path / "model.onnx")
    data = run_dir / "split.csv"
    from_pt = _eval(checkpoint, data, tmp_path / "pt", device="cpu")
    from_onnx = _eval(onnx, data, tmp_path / "onnx")
    assert from_onnx["model"]["kind"] == "onnx" and from_pt["model"]["kind"] == "checkpoint"
    # The model's own PreprocessConfig, every field of it, is what the images were made with.
    assert from_pt["model"]["preprocess"] == from_onnx["model"]["preprocess"] == ckpt.preprocess.to_dict()
    assert _close(from_pt["figures"], from_onnx["figures"], rel=1e-4, abs_=1e-5) == []
    # The figures are the calibrated model's: softmax(logits / 1.7), not the raw logits'.
    calibration = from_onnx["calibration"]
    assert calibration["temperature"] == pytest.approx(1.7) and calibration["nll_after"] != calibration["nll_before"]
    assert from_onnx["figures"]["image"]["nll"] == pytest.approx(calibration["nll_after"])


def test_the_cli_writes_every_output_with_the_shared_figure_code(onnx_model, synthetic_cohort, tmp_path):
    cohort = synthetic_cohort()
    out = tmp_path / "eval"
    args = [str(onnx_model), str(cohort), "--out", str(out), "--bootstrap", "30", "--workers", "2", "--no-progress"]
    done = CliRunner().invoke(cli.main, args)
    assert done.exit_code == 0, done.output
    assert "dens-eval: 12 images (0 unusable)" in done.output and "quadratic kappa" in done.output
    for name in ("metrics.json", "summary.md", "unusable.csv", *PNGS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    figures = metrics["figures"]
    for level in evaluation.LEVELS:
        assert {"accuracy", "kappa_linear", "kappa_quadratic", "confusion", "ci"} <= set(figures[level])
        assert {"sensitivity", "specificity", "auc"} <= set(figures[level]["dense"])
    assert set(figures["by"]) >= {"manufacturer", "site_id"}

    # The same figures from the model's logits computed here, image by image, through the shared code.
    import onnxruntime as ort

    meta = read_metadata(onnx_model)
    pre = PreprocessConfig.from_dict(meta["preprocess"])
    frame, _ = manifest.read_manifest(cohort)
    decoded = [load(p, pre) for p in frame[labels.PATH]]
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    batch = np.stack([image for image, _ in decoded])[:, None]
    logits = session.run([LOGITS], {INPUT: batch})[0]
    frame = manifest.with_identity(frame, [info.to_dict() for _, info in decoded])
    expected = evaluation.report(frame, logits, frame[manifest.LABEL].to_numpy(), meta["temperature"], resamples=30)
    assert _close(figures, json.loads(json.dumps(jsonable(expected))), rel=1e-4, abs_=1e-5) == []

    summary = (out / "summary.md").read_text()
    assert "| figure | image | breast | exam |" in summary and "| kappa, quadratic |" in summary
    assert "Per manufacturer, image level" in summary


def test_unusable_files_are_listed_and_counted_not_fatal(onnx_model, synthetic_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(synthetic_cohort(), cohort)
    (cohort / "notes.dcm").write_text("not a DICOM file")
    rows = pd.read_csv(cohort / "train.csv", dtype=str, keep_default_na=False)
    extra = rows.iloc[:2].copy()
    extra[labels.PATH] = ["notes.dcm", "gone.dcm"]
    pd.concat([rows, extra]).to_csv(cohort / "train.csv", index=False)
    result = run(EvalConfig(onnx_model, cohort, tmp_path / "eval", bootstrap=0, workers=2, progress=False))
    assert (result.images, result.unusable) == (len(rows), 2)
    unusable = pd.read_csv(tmp_path / "eval" / "unusable.csv", dtype=str, keep_default_na=False)
    assert [Path(p).name for p in unusable[labels.PATH]] == ["notes.dcm", "gone.dcm"]
    assert unusable[labels.REASON].iloc[1] == manifest.MISSING_FILE and unusable[labels.REASON].iloc[0]
    assert result.metrics["data"]["unusable"] == 2 and "ci" not in result.metrics["figures"]["image"]
    assert "12 images (2 unusable)" in result.line()


def test_bad_inputs_are_clear_usage_errors(onnx_model, synthetic_cohort, tmp_path):
    cohort = synthetic_cohort()
    rows = pd.read_csv(cohort / "train.csv", dtype=str, keep_default_na=False)
    no_label = tmp_path / "no_label.csv"
    rows.drop(columns=[labels.DENSITY]).assign(path=lambda f: [str(cohort / p) for p in f[labels.PATH]]).to_csv(
        no_label, index=False
    )
    nothing_there = tmp_path / "missing.csv"
    rows.assign(path=[f"nowhere/{i}.dcm" for i in range(len(rows))]).to_csv(nothing_there, index=False)
    written = tmp_path / "written"
    written.mkdir()
    (written / "metrics.json").write_text("{}")
    wrong_model = tmp_path / "model.bin"
    wrong_model.write_bytes(b"x")
    cases = [
        ([onnx_model, no_label], "no 'density' column"),
        ([onnx_model, cohort, "--split", "test"], "has no 'split' column"),
        ([onnx_model, nothing_there], "none of its 12 files exists"),
        ([onnx_model, cohort, "--out", written], "already holds dens-eval output"),
        ([wrong_model, cohort], "give an .onnx (dens-export) or a .pt (dens-train) file"),
    ]
    for args, message in cases:
        out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
        done = CliRunner().invoke(cli.main, [*map(str, args), *out, "--no-progress", "--workers", "1"])
        assert done.exit_code == 2, (args, done.output)
        assert message in done.output, (args, done.output)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_images_of_families_the_model_never_saw_are_a_warning(trained, synthetic_cohort, tmp_path):
    """dens-eval counts the images the pooled line mapped (a family the model never saw, or one too rare in
    its training split for a line of its own) as dens-train did, and says so; plain files, a family the model
    never met, all are."""
    run_dir, _ = trained
    split = pd.read_csv(run_dir / "split.csv", dtype=str, keep_default_na=False)
    fallback = int((split.loc[split["split"] == "test", "harmonisation"] == "fallback").sum())
    seen = _eval(run_dir / "best.pt", run_dir / "split.csv", tmp_path / "seen", split="test")
    said = [w for w in seen["warnings"] if "acquisition families" in w]
    assert [w.split(" of ")[0] for w in said] == ([str(fallback)] if fallback else [])
    frame, _ = manifest.read_manifest(synthetic_cohort(patients=6, seed=5))
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, path in enumerate(frame[labels.PATH][:8]):  # the same images as plain files: a family never seen
        cv2.imwrite(str(plain / f"{i}.png"), load(path, PreprocessConfig(size=64, crop=False))[0])
    pd.DataFrame(
        {labels.PATH: [f"{i}.png" for i in range(8)], labels.DENSITY: frame[labels.DENSITY][:8].tolist()}
    ).to_csv(plain / "labels.csv", index=False)
    unseen = _eval(run_dir / "best.pt", plain / "labels.csv", tmp_path / "unseen")
    assert any(w.startswith("8 of 8 images are of acquisition families") for w in unseen["warnings"])
