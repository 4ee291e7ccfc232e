"""The model card: what it says (dens.train.card, dens.artifact.modelcard), and where it travels (best.pt, the ONNX
metadata, dens-infer's warning, report.html's header)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dens import labels
from dens.artifact import modelcard
from dens.figures import evaluation
from dens.route.config import PreprocessConfig
from dens.train import card
from dens.train.config import TrainConfig


def _facts(*, synthetic: bool = True, weights: str = "none", absent: tuple[str, ...] = ()) -> dict:
    """A card from real figures: a test split of 40 patients with noisy logits."""
    rng = np.random.default_rng(0)
    rows = [
        {labels.PATIENT_ID: f"P{p}", labels.STUDY_UID: f"S{p}", labels.LATERALITY: side, "site_id": str(p % 2)}
        for p in range(40)
        for side in "LR"
    ]
    images = pd.DataFrame(rows)
    y = np.repeat(rng.choice(4, 40), 2)
    test = evaluation.report(images, np.eye(4)[y] * 2 + rng.normal(0, 1, (80, 4)), y, resamples=100)
    resolved = {
        **TrainConfig(weights=weights, lr=1e-3).to_dict(),
        "resolved": {
            "weights": weights,
            "dens_version": "0.1.0",
            "device": "cpu",
            "world_size": 1,
            "precision": "fp32",
        },
    }
    split = {"images": 80, "patients": 40, "exams": 40, "classes": dict.fromkeys(labels.CLASSES, 20)}
    info = {
        "csv": "cohort/train.csv",
        "source": "csv",
        "synthetic": synthetic,
        "unusable": 2,
        "train": split,
        "val": split,
        "test": split,
        "groups": {"site_id": {"0": 120, "1": 120}},
        "classes_absent_from_training": list(absent),
        "warnings": [f"class {c} has no usable training image" for c in absent],
    }
    calibration = {"temperature": 1.3, "kept": True, "reason": "T = 1.3 lowers the validation NLL"}
    return card.facts(resolved, info, 3, test, calibration)


def test_the_card_puts_what_no_reader_may_miss_first_and_the_figures_with_their_intervals():
    facts = _facts()
    text = modelcard.render(facts)
    lines = text.splitlines()
    assert "not a medical device" in lines[2]  # right under the title
    assert "random weights" in text and "synthetic phantoms" in text
    exam = facts["test"]["exam"]
    low, high = exam["ci"]["kappa_quadratic"]
    assert "| kappa (quadratic) |" in text and f"{exam['kappa_quadratic']:.3f} [{low:.3f}, {high:.3f}]" in text
    assert "### By site_id" in text and "| train | 80 | 40 | 40 | 20 | 20 | 20 | 20 |" in text
    assert "Intended use" in text and "does not detect or diagnose cancer" in text
    assert "temperature 1.300 (kept)" in text


def test_caveats_name_each_reason_not_to_trust_a_model():
    assert modelcard.caveats({"from_scratch": False, "model_card": _facts(synthetic=False, weights="imagenet")}) == []
    said = modelcard.caveats({"from_scratch": True, "model_card": _facts(absent=("D",))})
    assert len(said) == 3 and "random weights" in said[0] and "synthetic" in said[1] and "class D" in said[2]
    assert "no model card" in modelcard.caveats({})[0]


def test_a_dens_synth_cohort_is_marked_synthetic(tmp_path):
    from dens.manifest import read_manifest
    from dens.synth import generate

    generate(tmp_path / "c", 1, workers=1, progress=False)
    assert modelcard.synthetic_folder(tmp_path / "c")
    assert read_manifest(tmp_path / "c")[1]["synthetic"]
    (tmp_path / "c" / modelcard.SYNTH_MARKER).unlink()
    assert not read_manifest(tmp_path / "c")[1]["synthetic"]


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory) -> Path:
    """An ONNX model whose checkpoint's card says it was trained from scratch on synthetic phantoms."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    summary = {"from_scratch": True, modelcard.CARD_KEY: _facts()}
    save_checkpoint(root / "best.pt", build_model("resnet18"), PreprocessConfig(size=64), summary=summary)
    return export_onnx(root / "best.pt", root / "model.onnx")


def test_the_card_travels_into_the_onnx_metadata_and_dens_infer_warns(
    synthetic_model, synthetic_cohort, tmp_path, caplog
):
    from dens.artifact.metadata import read_metadata
    from dens.infer.config import InferConfig
    from dens.infer.runner import run

    travelled = read_metadata(synthetic_model)["summary"][modelcard.CARD_KEY]
    assert travelled["data"]["synthetic"] and travelled["test"]["exam"]["ci"] == _facts()["test"]["exam"]["ci"]
    studies = synthetic_cohort(1, seed=3)
    with caplog.at_level(logging.WARNING, logger="dens.infer"):
        run(InferConfig(studies, tmp_path / "preds.csv", model=synthetic_model, workers=1, progress=False))
    warnings = [r.getMessage() for r in caplog.records if "warning" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "random weights" in warnings[0] and "synthetic phantoms" in warnings[0]


def test_report_html_is_headed_by_the_card(tmp_path):
    from dens.review.report import write_report

    preds = pd.DataFrame({labels.PATH: ["a.dcm"], labels.STATUS: ["skipped"], labels.REASON: ["not_dicom: x"]})
    facts = _facts()
    facts["model"]["arch"] = "<script>alert(1)</script>"
    page = write_report(preds, tmp_path / "preds.csv", {}, card=facts).read_text()
    assert 'id="model-card"' in page and "not a medical device" in page and "Test, exam level" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert 'class="card warn"' in page  # synthetic and from scratch: the block is red
    bare = write_report(preds, tmp_path / "preds.csv", {}).read_text()
    assert "No model card" in bare
