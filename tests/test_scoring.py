"""One scoring path: dens-infer's local engine, dens-serve's pipeline and dens-qc give the same calls for the same
files (the Ray engine against the local one is tests/test_ray.py's), and the model is found, read and checked
in one place (dens.scoring.model) for all of them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dens import labels
from dens.flags import flag_dense
from dens.preds.cells import raw_path
from dens.scoring.model import ModelError, ModelFile, resolve_model
from ray_cases import read

PROBS = list(labels.PROB_COLUMNS)


def _comparable(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Every cell but the probabilities as text, and the probabilities as numbers (batches of other sizes
    differ in the last float bits)."""
    frame = frame.reset_index(drop=True)
    probs = frame[[*PROBS, labels.P_DENSE]].replace("", "nan").astype(float).to_numpy()
    return frame.drop(columns=[*PROBS, labels.P_DENSE]), probs


def test_dens_serve_writes_the_rows_dens_infer_writes(mixed_studies, small_model, local_preds, tmp_path):
    from dens.serve.pipeline import Pipeline

    local = read(local_preds)
    # Files the walk could not open (a broken symlink) never reach a node: a PACS sends instances.
    local = local[~local[labels.REASON].str.startswith("unreadable")]
    pipeline = Pipeline(ModelFile.read(small_model), tmp_path / "preds.csv", flag_dense, workers=1)
    try:
        rows = pipeline.score([raw_path(cell) for cell in local[labels.PATH]])
    finally:
        pipeline.close()
    served = read(tmp_path / "preds.csv")
    assert len(rows) == len(served) == len(local) and {"ok", "skipped", "error"} <= set(served[labels.STATUS])
    (text_a, probs_a), (text_b, probs_b) = _comparable(local), _comparable(served)
    pd.testing.assert_frame_equal(text_a, text_b)
    np.testing.assert_allclose(probs_a, probs_b, atol=2e-6)


def test_dens_qc_calls_what_dens_infer_calls(mixed_studies, small_model, local_preds, tmp_path):
    from dens.qc.runner import QcConfig, run

    result = run(QcConfig((mixed_studies,), tmp_path / "sheet.png", model=small_model, limit=500, progress=False))
    local = read(local_preds)
    ok = local[local[labels.STATUS] == "ok"].set_index(labels.PATH)
    assert len(result.tiles) == len(ok) > 0
    for tile in result.tiles:
        row = ok.loc[tile.path] if tile.path in ok.index else ok.loc[_cell(tile.path)]
        assert tile.density == row[labels.DENSITY]
        assert tile.p_dense == pytest.approx(float(row[labels.P_DENSE]), abs=1e-4)


def _cell(path: str) -> str:
    from dens.preds.cells import path_cell

    return path_cell(path)


def test_every_stage_refuses_a_checkpoint_with_what_to_do(small_model):
    checkpoint = small_model.with_name("best.pt")
    for stage in ("dens-infer", "dens-serve", "dens-qc"):
        with pytest.raises(ModelError, match=f"{stage} runs the exported model.*dens-export --onnx --checkpoint"):
            ModelFile.read(checkpoint, stage)
    assert resolve_model(small_model) == small_model


def test_a_dens_infer_run_reads_and_hashes_its_model_once(synthetic_cohort, small_model, tmp_path, monkeypatch):
    import onnx

    import dens.scoring.model as model_module
    from dens.infer.config import InferConfig
    from dens.infer.runner import run

    loads, hashes = [], []
    real_load, real_hash = onnx.load, model_module.file_sha256
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(model_module, "file_sha256", lambda path: hashes.append(path) or real_hash(path))
    summary = run(
        InferConfig(synthetic_cohort(3, seed=5), tmp_path / "preds.csv", model=small_model, sr=tmp_path / "sr")
    )
    assert summary.ok > 0 and summary.reports  # the SRs name the model too, from the same reading
    assert len(loads) == 1 and hashes == [small_model]


def test_the_model_is_read_once(small_model, monkeypatch):
    import dens.scoring.model as model_module

    reads = []
    real = model_module.read_metadata
    monkeypatch.setattr(model_module, "read_metadata", lambda path: reads.append(path) or real(path))
    from dens.scoring.runtime import open_runtime

    model = ModelFile.read(small_model)
    runtime = open_runtime(model, "cpu")
    assert reads == [small_model] and runtime.model is model and runtime.classes == labels.CLASSES
