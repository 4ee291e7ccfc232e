"""The signature dens-export records in a model (digests of its graph and of its metadata), and the stages that
verify it: an edited model is refused by dens-infer and dens-serve (scored only with --allow-modified-model,
loudly), an unsigned one from an older dens is scored with a warning, and dens-export --check-only fails a model
whose metadata is not its checkpoint's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from dens.artifact.metadata import METADATA_KEY, SIGNATURE, read_metadata, write_metadata
from dens.commands import EXIT_FAILED, EXIT_OK
from dens.export.cli import PARITY_FAILED
from dens.export.cli import main as export_main
from dens.infer.cli import main as infer_main


@pytest.fixture(scope="module")
def studies(tmp_path_factory, synthetic_cohort) -> Path:
    """One patient's images of a synthetic cohort: enough for a row per file, quick to score."""
    cohort = synthetic_cohort(3, seed=5)
    patient = next(p for p in sorted(cohort.iterdir()) if p.is_dir())
    root = tmp_path_factory.mktemp("signature") / "studies"
    shutil.copytree(patient, root)
    return root


def edited(
    src: Path,
    dst: Path,
    meta_edit: Callable[[dict], None] | None = None,
    graph_edit: Callable[[onnx.ModelProto], None] | None = None,
    resign: bool = False,
) -> Path:
    """A copy of the model at ``src`` with its metadata and/or graph edited with onnx, as anyone could; ``resign``:
    signed again after the edit, as someone who knows the scheme could."""
    model = onnx.load(str(src))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    if meta_edit is not None:
        meta_edit(meta)
        prop.value = json.dumps(meta)
    if graph_edit is not None:
        graph_edit(model)
    if resign:
        write_metadata(model, meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def crop_off(meta: dict) -> None:
    meta["preprocess"]["crop"] = False


def one_weight_changed(model: onnx.ModelProto) -> None:
    init = next(i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 4)
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weights, init.name))


def infer(studies: Path, out: Path, model: Path, *more: str):
    return CliRunner().invoke(
        infer_main, [str(studies), "--out", str(out), "--model", str(model), "--workers", "1", "--no-progress", *more]
    )


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def signature_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "signature" in r.getMessage()]


def test_an_exported_model_is_signed_and_scores_without_a_warning(onnx_model, studies, tmp_path, caplog):
    meta = read_metadata(onnx_model)
    assert set(meta[SIGNATURE]) == {"graph_sha256", "metadata_sha256"}
    result = infer(studies, tmp_path / "preds.csv", onnx_model)
    assert result.exit_code == EXIT_OK, result.output
    assert signature_lines(caplog) == []
    assert (read(tmp_path / "preds.csv")["status"] == "ok").all()


def test_an_edited_preprocess_is_refused_and_scored_only_when_allowed(onnx_model, studies, tmp_path, caplog):
    model = edited(onnx_model, tmp_path / "crop-off.onnx", crop_off)
    refused = infer(studies, tmp_path / "refused.csv", model)
    assert refused.exit_code == EXIT_FAILED, refused.output
    assert "was modified after dens-export wrote it: its metadata" in refused.output
    assert "graph" not in refused.output.split("its metadata")[1].split(";")[0]  # the graph is as exported
    assert "re-export it with `dens-export --onnx" in refused.output and "--allow-modified-model" in refused.output
    assert not (tmp_path / "refused.csv").exists()

    caplog.clear()
    allowed = infer(studies, tmp_path / "allowed.csv", model, "--allow-modified-model")
    assert allowed.exit_code == EXIT_OK, allowed.output
    warned = [line for line in signature_lines(caplog) if "WARNING" in line]
    assert len(warned) == 1 and "scoring it anyway" in warned[0] and "its metadata" in warned[0]
    assert all("crop=false" in cell for cell in read(tmp_path / "allowed.csv")["preprocess"])


def test_a_graph_with_one_weight_changed_is_refused(onnx_model, studies, tmp_path):
    model = edited(onnx_model, tmp_path / "weight.onnx", graph_edit=one_weight_changed)
    result = infer(studies, tmp_path / "preds.csv", model)
    assert result.exit_code == EXIT_FAILED, result.output
    assert "its graph (operations, weights) does not match" in result.output
    assert "metadata (preprocess" not in result.output


def test_a_model_without_a_signature_is_scored_with_one_warning(onnx_model, studies, tmp_path, caplog):
    model = edited(onnx_model, tmp_path / "old.onnx", lambda meta: meta.pop(SIGNATURE))
    result = infer(studies, tmp_path / "preds.csv", model)
    assert result.exit_code == EXIT_OK, result.output
    lines = signature_lines(caplog)
    assert len(lines) == 1 and "has no signature" in lines[0] and "cannot be detected" in lines[0]
    assert "dens-export --onnx --checkpoint" in lines[0]


def _check_only(model: Path, checkpoint: Path):
    return CliRunner().invoke(
        export_main, ["--onnx", "--checkpoint", str(checkpoint), "--out", str(model), "--check-only", "--no-progress"]
    )


def test_dens_export_check_only_fails_an_edited_model(onnx_model, tmp_path):
    checkpoint = onnx_model.with_name("best.pt")
    exported = tmp_path / "exported" / "model.onnx"
    exported.parent.mkdir()
    shutil.copy(onnx_model, exported)
    assert _check_only(exported, checkpoint).exit_code == EXIT_OK

    model = edited(onnx_model, tmp_path / "edited" / "model.onnx", crop_off)
    result = _check_only(model, checkpoint)
    assert result.exit_code == PARITY_FAILED, result.output
    failures = json.loads(model.with_suffix(".parity.json").read_text())["failures"]
    assert any("its metadata (preprocess" in f and "does not match" in f for f in failures)
    assert any("preprocess is not the checkpoint's: crop=False (checkpoint: True)" in f for f in failures)

    # Signed again after the edit: the signature holds, the comparison with the checkpoint does not.
    resigned = edited(onnx_model, tmp_path / "resigned" / "model.onnx", crop_off, resign=True)
    assert read_metadata(resigned)["preprocess"]["crop"] is False
    result = _check_only(resigned, checkpoint)
    assert result.exit_code == PARITY_FAILED and "crop=False (checkpoint: True)" in result.output

    hotter = edited(onnx_model, tmp_path / "hotter" / "model.onnx", lambda m: m.update(temperature=3.0), resign=True)
    result = _check_only(hotter, checkpoint)
    assert result.exit_code == PARITY_FAILED and "temperature 3.0 is not the checkpoint's 1.0" in result.output


def test_every_variant_dens_export_writes_is_signed_for_its_own_graph(onnx_model, tmp_path, caplog):
    from dens.export.onnx import export_onnx
    from dens.export.parity import ImageSet
    from dens.export.quantize import quantize_int8, split_calibration
    from dens.scoring.model import ModelFile

    fp16 = export_onnx(onnx_model.with_name("best.pt"), tmp_path / "model.fp16.onnx", fp16=True)
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 64, 64), dtype=np.uint8)
    split = split_calibration(ImageSet("/r", images, 6, [f"/r/{i}.png" for i in range(6)], {}, {}))
    int8 = quantize_int8(onnx_model, tmp_path / "model.int8.onnx", split)
    signatures = {path: read_metadata(path)[SIGNATURE] for path in (onnx_model, fp16, int8)}
    assert len({s["graph_sha256"] for s in signatures.values()}) == 3
    assert len({s["metadata_sha256"] for s in signatures.values()}) == 3
    for path in (fp16, int8):
        assert ModelFile.read(path).metadata[SIGNATURE] == signatures[path]
    assert signature_lines(caplog) == []


def test_dens_serve_refuses_an_edited_model_unless_allowed(onnx_model, tmp_path):
    from dens.scoring.model import ModelError, ModelFile
    from dens.serve.config import ServeConfig
    from dens.serve.node import ServeError, start

    model = edited(onnx_model, tmp_path / "crop-off.onnx", crop_off)
    with pytest.raises(ServeError, match="modified after dens-export wrote it: its metadata"):
        start(ServeConfig(tmp_path / "state", model=model, allow_any=True, port=0))
    assert not (tmp_path / "state").exists()
    with pytest.raises(ModelError, match="--allow-modified-model"):
        ModelFile.read(model, "dens-serve")
    assert ModelFile.read(model, "dens-serve", allow_modified=True).preprocess.crop is False


def test_allow_modified_model_is_refused_with_the_ray_engine(onnx_model, studies, tmp_path):
    result = infer(studies, tmp_path / "preds.csv", onnx_model, "--engine", "ray", "--allow-modified-model")
    assert result.exit_code == 2 and "--allow-modified-model is for --engine local" in result.output
