"""dens-qc: the contact sheet shows the canonical images of the model's own preprocessing, in file order,
each with the model's call; --limit takes the first usable files; files without an image are counted, not
shown; the errors a user can meet are messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from dens.artifact.metadata import INPUT, PROBS
from dens.flags import call
from dens.qc.cli import main as qc_main
from dens.qc.runner import QcConfig, QcError, find_files, run
from dens.qc.sheet import TILE_HEIGHT
from dens.route.config import PreprocessConfig
from dens.route.preprocess import load

# Not the default canvas, so a sheet made with the default instead of the model's would differ.
CANVAS = PreprocessConfig(height=96, width=48)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random resnet18 on a 96x48 version-2 canvas, exported to ONNX."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("qc-model")
    torch.manual_seed(0)
    save_checkpoint(root / "best.pt", build_model("resnet18"), CANVAS, temperature=1.5)
    return export_onnx(root / "best.pt", root / "model.onnx")


@pytest.fixture(scope="module")
def studies(tmp_path_factory, synthetic_cohort) -> Path:
    """The shared 3-patient cohort (its train.csv and dens-synth.json are not images) plus a PNG."""
    root = tmp_path_factory.mktemp("qc") / "studies"
    shutil.copytree(synthetic_cohort(3, seed=5), root)
    cv2.imwrite(str(root / "0-photo.png"), np.full((40, 30), 200, np.uint8))
    return root


def dicom_files(root: Path) -> list[Path]:
    return [p for p, _ in find_files([root]) if p.suffix == ".dcm"]


def test_the_sheet_shows_what_the_model_saw_with_its_calls(studies, model, tmp_path):
    out = tmp_path / "sheet.png"
    result = run(QcConfig((studies,), out, model=model, columns=4, progress=False))
    files = dicom_files(studies)
    assert [Path(t.path) for t in result.tiles] == files  # every image, in sorted file order
    assert sorted(Path(d.path).name for d in result.failures) == ["0-photo.png", "dens-synth.json", "train.csv"]
    reasons = {Path(d.path).name: (d.status, d.code) for d in result.failures}
    assert reasons["0-photo.png"] == ("skipped", "plain_image_not_requested")
    assert reasons["train.csv"] == ("skipped", "not_dicom")

    # The calls are ONNX Runtime's on load(path, the model's preprocessing), for each file.
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images = np.stack([load(p, CANVAS)[0] for p in files])[:, None]
    probs = session.run([PROBS], {INPUT: images})[0]
    for tile, p in zip(result.tiles, probs, strict=True):
        density, p_dense = call(p)
        assert (tile.density, tile.p_dense) == (density, pytest.approx(p_dense, abs=1e-6))
        assert tile.caption(tile.path)[-1] == f"call {density}  p_dense {p_dense:.2f}"

    # The sheet holds the canonical images of the model's canvas (96x48: tiles half as wide as high).
    sheet = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
    for i in (0, len(files) - 1):
        assert_tile_shows(sheet, i, len(files), 4, 4, images[i, 0])


def assert_tile_shows(sheet: np.ndarray, i: int, tiles: int, columns: int, lines: int, image: np.ndarray) -> None:
    """Tile ``i`` of a sheet of ``tiles`` is ``image`` scaled to the tile height (inside its grey outline)."""
    height, width = TILE_HEIGHT, round(image.shape[1] * TILE_HEIGHT / image.shape[0])
    cell_h, cell_w = height + lines * 14 + 8, max(width, 150) + 8
    title = sheet.shape[0] - -(-tiles // columns) * cell_h
    assert 0 < title < 60, "a title strip above the tiles"
    top, left = title + (i // columns) * cell_h + 4, (i % columns) * cell_w + 4
    shown = sheet[top + 1 : top + height - 1, left + 1 : left + width - 1].astype(int)
    expected = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)[1:-1, 1:-1]
    assert np.abs(shown - expected).max() <= 1


def test_without_a_model_the_default_route_and_no_calls(studies, tmp_path):
    result = run(QcConfig((studies,), tmp_path / "sheet.png", limit=2, progress=False))
    assert all(t.p_dense is None and len(t.caption("x")) == 3 for t in result.tiles)
    sheet = cv2.imread(str(tmp_path / "sheet.png"), cv2.IMREAD_GRAYSCALE)
    first = load(result.tiles[0].path, PreprocessConfig())[0]
    assert first.shape == PreprocessConfig().shape
    assert_tile_shows(sheet, 0, 2, 8, 3, first)


def test_limit_takes_the_first_usable_files_in_order(studies, tmp_path):
    files = dicom_files(studies)
    result = run(QcConfig((studies,), tmp_path / "sheet.png", limit=3, workers=2, progress=False))
    assert [Path(t.path) for t in result.tiles] == files[:3]
    # 0-photo.png sorts first and is read (a skipped file); the files after the third image are not.
    assert [Path(d.path).name for d in result.failures] == ["0-photo.png"]
    assert result.unread == result.files - 4
    assert "more files not read (--limit)" in result.line()


def test_plain_images_when_asked_and_the_sheet_itself_is_never_an_input(studies, tmp_path):
    folder = tmp_path / "studies"
    shutil.copytree(studies, folder)
    out = folder / "sheet.png"
    first = run(QcConfig((folder,), out, plain_images=True, progress=False))
    assert Path(first.tiles[0].path).name == "0-photo.png"
    again = run(QcConfig((folder,), out, plain_images=True, progress=False))
    assert [t.path for t in again.tiles] == [t.path for t in first.tiles]


def test_cli_writes_the_sheet_and_says_what_it_read(studies, model, tmp_path):
    files = dicom_files(studies)
    out = tmp_path / "qc" / "sheet.png"
    result = CliRunner().invoke(
        qc_main, [str(files[0]), str(files[1]), "--out", str(out), "--model", str(model), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "dens-qc: 2 images from 2 files (0 skipped, 0 errors)" in result.output
    assert cv2.imread(str(out)) is not None


def test_errors_a_user_can_meet_are_messages(studies, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "list.txt").write_text("patients\n")
    runner = CliRunner()

    nothing = runner.invoke(qc_main, [str(notes), "--out", str(tmp_path / "s.png")])
    assert nothing.exit_code == 1
    assert "none of the 1 files read gave an image" in nothing.output
    assert not (tmp_path / "s.png").exists()

    wrong_out = runner.invoke(qc_main, [str(studies), "--out", str(tmp_path / "sheet.txt")])
    assert wrong_out.exit_code == 1 and "name a .png, .jpg, .jpeg file" in wrong_out.output

    not_a_model = tmp_path / "model.onnx"
    not_a_model.write_bytes(b"not onnx")
    bad_model = runner.invoke(qc_main, [str(studies), "--out", str(tmp_path / "s.png"), "--model", str(not_a_model)])
    assert bad_model.exit_code == 1 and "is not a readable ONNX file" in bad_model.output

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QcError, match="no files in"):
        run(QcConfig((empty,), tmp_path / "s.png"))


def test_a_call_on_a_machine_the_model_never_saw_says_so():
    from dens.qc.runner import Tile

    unseen = Tile("x.dcm", {"harmonisation": "fallback"}, density="C", p_dense=0.7).caption("x.dcm")[-1]
    seen = Tile("x.dcm", {"harmonisation": "family"}, density="C", p_dense=0.7).caption("x.dcm")[-1]
    assert unseen == "call C  p_dense 0.70  (machine unseen)" and seen == "call C  p_dense 0.70"


SEPARATORS = " /_-."


@pytest.mark.parametrize(
    ("text", "width", "kept"),
    [
        ("screening/2023/patient_004217/study_000193/R_CC_0001.dcm", 150, "R_CC_0001.dcm"),
        ("screening/2023/patient_004217/study_000193/R_CC_0001.dcm", 260, "R_CC_0001.dcm"),
        ("site/1.2.826.0.1.3680043.8.498.12345/1.2.826.0.1.3680043.8.498.12345.1.0.dcm", 150, "12345.1.0.dcm"),
        ("Hologic Selenia Dimensions HD Tomosynthesis", 150, "Hologic Selenia"),  # not a path: no name
    ],
)
def test_captions_are_cut_at_a_separator_keeping_the_file_s_own_name(text, width, kept):
    from dens.qc.sheet import fit_caption

    assert fit_caption("R_CC.dcm", width) == "R_CC.dcm"  # what fits is shown whole
    shown = fit_caption(text, width)
    assert cv2.getTextSize(shown, cv2.FONT_HERSHEY_SIMPLEX, 0.38, 1)[0][0] <= width
    assert shown.count("~") == 1 and kept in shown  # the file's name, or the end of a long one, in sight
    head, tail = shown.split("~")
    assert text.startswith(head) and text.endswith(tail) and len(head) + len(tail) >= 12
    # Each cut falls at a separator or a word boundary, never inside a word.
    for cut in (len(head), len(text) - len(tail)):
        assert cut in (0, len(text)) or text[cut - 1] in SEPARATORS or text[cut] in SEPARATORS, (shown, cut)
