"""dens-export: the ONNX graph, its metadata, and parity with the PyTorch checkpoint (resnet18, S=64, CPU)."""

from __future__ import annotations

import datetime as dt
import fractions
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import dens
from dens import runs
from dens.artifact.metadata import OnnxMetadataError, read_metadata
from dens.artifact.model import build_model, file_sha256, load_checkpoint, save_checkpoint
from dens.export.cli import main
from dens.export.onnx import Fp16ConversionError, to_fp16
from dens.export.parity import THRESHOLDS, check_parity
from dens.export.runner import ExportConfig
from dens.route.config import PreprocessConfig

SIZE = 64
TEMPERATURE = 1.7
SUMMARY = {"images": 24, "val": {"kappa_quadratic": 0.5}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    """A random resnet18 checkpoint in runs/<name>/best.pt, with runs/latest pointing at it."""
    torch.manual_seed(0)
    path = workdir / "runs" / "run1" / "best.pt"
    save_checkpoint(
        path, build_model("resnet18"), PreprocessConfig(size=SIZE), temperature=TEMPERATURE, summary=SUMMARY
    )
    runs.update_latest(path.parent)
    return path


@pytest.fixture(scope="module")
def cohort(workdir, synthetic_cohort) -> Path:
    """A tiny synthetic cohort plus files that are no image (a samples folder's notes, labels and readme, sorted
    first, so they are always seen)."""
    out = workdir / "cohort"
    shutil.copytree(synthetic_cohort(3, seed=5), out)  # the shared cohort stays as it was made
    (out / "0-notes.txt").write_text("not an image\n")
    (out / "0-labels.csv").write_text("path,density\n")
    (out / "0-README.md").write_text("# samples\n")
    return out


@pytest.fixture(scope="module")
def exported(workdir, checkpoint, cohort):
    """`dens-export --onnx --fp16 --images COHORT` run from the project folder, checkpoint by default."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        result = CliRunner().invoke(
            main, ["--onnx", "--fp16", "--images", str(cohort), "--max-images", "6", "--no-progress"]
        )
    return result


def _model(checkpoint: Path, name: str = "model.onnx") -> Path:
    return checkpoint.parent / name


def test_export_of_latest_checkpoint_passes_parity(exported, checkpoint):
    assert exported.exit_code == 0, exported.output
    assert "parity passed" in exported.output
    report = json.loads(_model(checkpoint, "model.parity.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert report["precision"] == "fp32" and report["thresholds"]["prob_atol"] == THRESHOLDS["fp32"].prob_atol
    assert report["checkpoint_sha256"] == file_sha256(checkpoint)
    assert report["onnx_sha256"] == file_sha256(_model(checkpoint))
    for name in ("random", "images"):
        assert set(report[name]["by_batch_size"]) == {"1", "3", "8"}
        assert report[name]["max_abs_prob_diff"] <= report["thresholds"]["prob_atol"]
        assert report[name]["argmax_agreement"] == 1.0
    images = report["images"]
    assert images["count"] == 6 and len(images["used"]) == 6  # --max-images
    # The notes, labels and readme are not candidate images: ignored and named, not counted as unusable files.
    assert images["skipped"] == {} and images["errors"] == {}
    assert images["ignored"] == ["0-README.md", "0-labels.csv", "0-notes.txt"]
    assert all(p.endswith(".dcm") for p in images["used"])
    assert (
        "6 preprocessed images (3 other files ignored, not DICOM nor an image: 0-README.md, 0-labels.csv, 0-notes.txt)"
        in exported.output
    )
    assert "unusable" not in exported.output


def test_metadata_round_trip(exported, checkpoint):
    assert exported.exit_code == 0, exported.output
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16")):
        meta = read_metadata(_model(checkpoint, name))
        assert meta["format_version"] == 1
        assert meta["classes"] == ["A", "B", "C", "D"]
        assert PreprocessConfig.from_dict(meta["preprocess"]) == PreprocessConfig(size=SIZE)
        assert meta["temperature"] == TEMPERATURE
        assert meta["arch"] == "resnet18" and meta["model_args"]["arch"] == "resnet18"
        assert meta["model_args"]["num_classes"] == 4
        assert meta["summary"] == SUMMARY
        assert meta["checkpoint_path"] == str(checkpoint.resolve())
        assert meta["checkpoint_sha256"] == file_sha256(checkpoint)
        assert meta["dens_version"] == dens.__version__
        exported_at = dt.datetime.fromisoformat(meta["exported_at"])
        assert exported_at.utcoffset() == dt.timedelta(0)
        assert abs(dt.datetime.now(dt.timezone.utc) - exported_at) < dt.timedelta(hours=1)
        assert meta["opset"] == 17 and meta["precision"] == precision
        assert meta["input"] == "image" and meta["outputs"] == ["probs", "logits"]
        model = onnx.load(str(_model(checkpoint, name)), load_external_data=False)
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) == 17


def test_batch_sizes_1_3_8_through_one_graph(exported, checkpoint):
    assert exported.exit_code == 0, exported.output
    session = ort.InferenceSession(str(_model(checkpoint)), providers=["CPUExecutionProvider"])
    (inp,), outs = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type) == ("image", "tensor(uint8)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, SIZE, SIZE]
    assert [(o.name, o.type) for o in outs] == [("probs", "tensor(float)"), ("logits", "tensor(float)")]

    images = np.random.default_rng(1).integers(0, 256, (8, 1, SIZE, SIZE), dtype=np.uint8)
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        expected = ckpt.model(torch.from_numpy(images)).numpy()
    for batch in (1, 3, 8):
        chunks = [session.run(None, {"image": images[i : i + batch]}) for i in range(0, 8, batch)]
        assert [c[0].shape for c in chunks] == [(len(images[i : i + batch]), 4) for i in range(0, 8, batch)]
        probs = np.concatenate([c[0] for c in chunks])
        logits = np.concatenate([c[1] for c in chunks])
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        scaled = np.exp(expected / TEMPERATURE)  # the stored temperature is inside the graph
        np.testing.assert_allclose(probs, scaled / scaled.sum(1, keepdims=True), atol=1e-5)


def _change_one_weight(src: Path, dst: Path, delta: float) -> None:
    """Add ``delta`` to one weight of the first convolution: a small, realistic corruption."""
    model = onnx.load(str(src))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    weights = numpy_helper.to_array(init).copy()
    weights[0, 0, 3, 3] += delta
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(dst))


def test_changed_weight_fails_parity_with_nonzero_exit(exported, checkpoint, tmp_path):
    assert exported.exit_code == 0, exported.output
    intact, changed = tmp_path / "intact.onnx", tmp_path / "changed.onnx"
    shutil.copy(_model(checkpoint), intact)
    _change_one_weight(_model(checkpoint), changed, delta=0.01)

    # Control: the same check on the untouched copy passes (checkpoint found through its metadata).
    ok = CliRunner().invoke(main, ["--onnx", "--check-only", "--out", str(intact), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(
        main, ["--onnx", "--check-only", "--out", str(changed), "--checkpoint", str(checkpoint), "--no-progress"]
    )
    assert bad.exit_code == 2, bad.output
    assert "PARITY FAILED" in bad.output and str(changed) in bad.output
    report = json.loads((tmp_path / "changed.parity.json").read_text())
    assert not report["passed"] and report["failures"]
    assert report["logit_rel_diff"] > report["thresholds"]["logit_rtol"]


def test_fp16_variant_passes_looser_parity(exported, checkpoint):
    assert exported.exit_code == 0, exported.output
    path = _model(checkpoint, "model.fp16.onnx")
    report = json.loads(_model(checkpoint, "model.fp16.parity.json").read_text())
    assert report["passed"] and report["precision"] == "fp16"
    assert report["thresholds"]["prob_atol"] > THRESHOLDS["fp32"].prob_atol
    assert report["argmax_agreement"] == 1.0 and report["images"]["count"] == 6
    assert report["max_abs_logit_diff"] > 0  # float16 rounding is really there
    model = onnx.load(str(path))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in model.graph.initializer if i.name in conv_weights} == {TensorProto.FLOAT16}
    types = [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]
    assert types == [("image", TensorProto.UINT8), ("probs", TensorProto.FLOAT), ("logits", TensorProto.FLOAT)]
    assert path.stat().st_size < 0.6 * _model(checkpoint).stat().st_size


def test_parity_fails_without_usable_images(exported, checkpoint, tmp_path):
    assert exported.exit_code == 0, exported.output
    (tmp_path / "a.txt").write_text("x")
    report = check_parity(_model(checkpoint), checkpoint, images=tmp_path, batch_sizes=(1, 2))
    assert not report["passed"]
    assert any(
        "no usable image" in f and "1 other file ignored, not DICOM nor an image: a.txt" in f
        for f in report["failures"]
    )
    assert report["images"]["skipped"] == {} and report["images"]["ignored"] == ["a.txt"]


def test_static_batch_axis_fails_parity(exported, checkpoint, tmp_path):
    assert exported.exit_code == 0, exported.output
    model = onnx.load(str(_model(checkpoint)))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # as if exported without dynamic_axes
    onnx.save(model, str(tmp_path / "static.onnx"))
    report = check_parity(tmp_path / "static.onnx", checkpoint, batch_sizes=(1, 3))
    assert not report["passed"]
    assert any("symbolic N" in f for f in report["failures"])


def _tiny_onnx(path: Path, props: dict[str, str] | None = None) -> Path:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    if props:
        helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("props", "message"),
    [
        (None, "no 'dens' metadata"),
        ({"dens": "{not json"}, "not valid JSON"),
        ({"dens": json.dumps({"format_version": 1, "classes": ["A"]})}, "lacks or mistypes"),
        ({"dens": json.dumps({"format_version": 99})}, "newer dens"),
    ],
)
def test_read_metadata_rejects_missing_or_malformed(tmp_path, props, message):
    path = _tiny_onnx(tmp_path / "m.onnx", props)
    with pytest.raises(OnnxMetadataError, match=message) as info:
        read_metadata(path)
    assert str(path) in str(info.value)


def test_read_metadata_rejects_non_onnx(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(OnnxMetadataError, match="not a readable ONNX file"):
        read_metadata(tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "absent.onnx")


def test_to_fp16_refuses_ops_it_does_not_handle():
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["logits"], mode="nearest")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, np.float32), "scales")],
    )
    with pytest.raises(Fp16ConversionError, match="Resize"):
        to_fp16(helper.make_model(graph))


def test_cli_without_a_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--onnx", "--no-progress"])
    assert result.exit_code == 1
    assert "no run found" in result.output and "--checkpoint" in result.output
    result = CliRunner().invoke(main, ["--no-progress"])
    assert result.exit_code == 2 and "--onnx" in result.output


def test_an_onnx_file_given_as_the_checkpoint_is_named_as_such(exported, checkpoint, tmp_path):
    """`dens-export --checkpoint model.onnx` says the file is an ONNX model, not a checkpoint, and what to pass;
    no file that is not a checkpoint gets PyTorch's advice to load it with weights_only=False."""
    assert exported.exit_code == 0, exported.output
    renamed = tmp_path / "weights.bin"  # an ONNX file by its bytes, whatever its name
    shutil.copy(_model(checkpoint), renamed)
    for given in (_model(checkpoint), renamed):
        result = CliRunner().invoke(main, ["--onnx", "--checkpoint", str(given), "--out", str(tmp_path / "x.onnx")])
        assert result.exit_code == 1, result.output
        assert f"{given} is an ONNX model (what dens-export writes), not a dens checkpoint" in result.output
        assert "a checkpoint is the best.pt of a dens-train run" in result.output
        assert "weights_only" not in result.output.replace("torch.load(weights_only=True)", "")
    pickled = tmp_path / "other.pt"
    torch.save({"a": fractions.Fraction(1, 3)}, pickled)  # a pickle the safe loader refuses
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for given in (pickled, tmp_path / "notes.txt"):
        result = CliRunner().invoke(main, ["--onnx", "--checkpoint", str(given), "--out", str(tmp_path / "x.onnx")])
        assert result.exit_code == 1 and f"{given}: cannot be read as a dens checkpoint" in result.output
        assert "weights_only` set to `False" not in result.output and "weights_only=False" not in result.output


def test_config_refuses_what_the_exporter_cannot_write():
    with pytest.raises(ValueError, match="opset 12 is not supported"):
        ExportConfig(opset=12)
    with pytest.raises(ValueError, match="batch sizes"):
        ExportConfig(batch_sizes=())
    assert ExportConfig().precisions == ("fp32",) and ExportConfig(fp16=True).precisions == ("fp32", "fp16")
