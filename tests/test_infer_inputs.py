"""What dens-infer takes in and says about it: a manifest's identity columns (plain images carry none of their
own) reaching the rows and the exams, plain images met without --plain-images, the "nothing scored" exit
status, and an --out under a file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import synthetic_breast, write_dicom
from dens import exams, labels, sources
from dens.commands import EXIT_FAILED, EXIT_NOTHING_SCORED, EXIT_OK
from dens.flags import FALSE
from dens.infer.cli import main as infer_main
from dens.preds.columns import LATERALITY_SOURCE

# One woman's four screening views and a second woman's two, as a public set ships them: PGM files, and the
# identity in the manifest only.
VIEWS = [("1", "10", "L", "CC"), ("1", "10", "L", "MLO"), ("1", "10", "R", "CC"), ("1", "10", "R", "MLO")]
VIEWS += [("2", "20", "L", "CC"), ("2", "20", "R", "CC")]


def plain_image(path: Path, side: str, seed: int = 0) -> Path:
    """A 16-bit PGM of a breast of ``side`` (chest wall on the left for L, on the right for R, as displayed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = synthetic_breast(seed=seed)
    assert cv2.imwrite(str(path), image if side == "L" else np.ascontiguousarray(image[:, ::-1]))
    return path


def infer(*args) -> object:
    return CliRunner().invoke(infer_main, [*map(str, args), "--workers", "1", "--no-progress"])


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_manifests_identity_columns_reach_the_rows_and_the_exams(onnx_model, tmp_path, kind):
    images = tmp_path / "images"
    for i, (_, _, side, _) in enumerate(VIEWS):
        plain_image(images / f"{i}.pgm", side, seed=i)
    write_dicom(  # its header says who it is: the header wins over the manifest
        images / "header.dcm", synthetic_breast(seed=9), bits_stored=12, ImageLaterality="R", ViewPosition="MLO"
    )
    # RSNA-style names and values (patient_id, laterality L/R, view CC/MLO) and a study/exam id column; the Parquet
    # manifest spells them as DICOM keywords and words (Left, mlo).
    table = pd.DataFrame(
        {
            "path": [f"images/{i}.pgm" for i in range(len(VIEWS))] + ["images/header.dcm"],
            "patient_id": [v[0] for v in VIEWS] + ["someone-else"],
            "exam_id": [v[1] for v in VIEWS] + ["99"],
            "laterality": [v[2] for v in VIEWS] + ["L"],
            "view": [v[3] for v in VIEWS] + ["CC"],
            "density": "B",
        }
    )
    if kind == "csv":
        manifest = tmp_path / "manifest.csv"
        table.to_csv(manifest, index=False)
    else:
        manifest = tmp_path / "manifest.parquet"
        table["laterality"] = table["laterality"].map({"L": "Left", "R": "right"})
        table["view"] = table["view"].str.lower()
        names = {"patient_id": "PatientID", "exam_id": "StudyInstanceUID", "laterality": "ImageLaterality"}
        table.rename(columns={**names, "view": "ViewPosition"}).to_parquet(manifest, index=False)
    out = tmp_path / "preds.csv"
    result = infer(manifest, "--out", out, "--model", onnx_model, "--plain-images")
    assert result.exit_code == EXIT_OK, result.output

    preds = read(out)
    assert list(preds[labels.STATUS]) == ["ok"] * (len(VIEWS) + 1)
    plain, header = preds.iloc[: len(VIEWS)], preds.iloc[-1]
    columns = (labels.PATIENT_ID, labels.STUDY_UID, labels.LATERALITY, labels.VIEW)
    got = list(zip(*(plain[c] for c in columns), strict=True))
    assert got == VIEWS
    assert set(plain[LATERALITY_SOURCE]) == {"manifest"}
    assert (header[labels.PATIENT_ID], header[labels.LATERALITY], header[labels.VIEW]) == ("P0001", "R", "MLO")
    assert header[LATERALITY_SOURCE] == "tag" and header[labels.STUDY_UID] != "99"

    breast, exam = (read(p) for p in exams.aggregate_paths(out))
    first = exam[exam[labels.STUDY_UID] == "10"].iloc[0]
    assert (first[exams.N_IMAGES], first[exams.INCOMPLETE], first[exams.MISSING_VIEWS]) == ("4", FALSE, "")
    second = exam[exam[labels.STUDY_UID] == "20"].iloc[0]
    assert second[exams.MISSING_VIEWS] == "L-MLO;R-MLO"
    assert len(exam) == 3  # two women's exams and the DICOM's own study
    woman = breast[breast[labels.STUDY_UID] == "10"]
    assert list(woman[labels.LATERALITY]) == ["L", "R"] and set(woman[exams.VIEWS]) == {"CC;MLO"}


def test_a_manifest_without_identity_columns_reads_as_before(tmp_path):
    (tmp_path / "a.pgm").touch()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,note\na.pgm,x\n,blank\n")
    found = list(sources.entries(manifest))
    assert [(Path(e.path).name, e.identity) for e in found] == [("a.pgm", ())]


def test_manifest_identity_values_are_read_as_dens_writes_them(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,Patient ID,study_uid,Study,Image Laterality,View Position\n"
        "a.png, 7 ,1.2.3,ignored,left,mlo\n"
        "b.png,8,,x,B,cc\n"
    )
    a, b = (dict(e.identity) for e in sources.entries(manifest))
    assert a == {labels.PATIENT_ID: "7", labels.STUDY_UID: "1.2.3", labels.LATERALITY: "L", labels.VIEW: "MLO"}
    assert b == {labels.PATIENT_ID: "8", labels.VIEW: "CC"}  # B is no laterality; Study is not read beside study_uid


def test_a_header_keeps_its_identity_and_the_manifest_fills_what_it_lacks():
    header = {labels.PATIENT_ID: "P1", labels.STUDY_UID: "", labels.LATERALITY: "R", LATERALITY_SOURCE: "pixels"}
    manifest = ((labels.PATIENT_ID, "M1"), (labels.STUDY_UID, "S1"), (labels.LATERALITY, "L"))
    filled = sources.fill_identity(header, manifest)
    assert (filled[labels.PATIENT_ID], filled[labels.STUDY_UID]) == ("P1", "S1")
    assert (filled[labels.LATERALITY], filled[LATERALITY_SOURCE]) == ("L", "manifest")  # a guess gives way
    tagged = {**header, LATERALITY_SOURCE: "tag"}
    assert sources.fill_identity(tagged, manifest)[labels.LATERALITY] == "R"
    assert sources.fill_identity(None, ()) is None


def test_plain_images_without_the_option_are_named_and_nothing_scored_has_its_status(onnx_model, tmp_path):
    images = tmp_path / "pgm"
    for i in range(3):
        plain_image(images / f"{i}.pgm", "L", seed=i)
    result = infer(images, "--out", tmp_path / "preds.csv", "--model", onnx_model)
    assert result.exit_code == EXIT_NOTHING_SCORED, result.output
    assert "3 plain images" in result.output and "--plain-images" in result.output
    assert "nothing scored" in result.output

    write_dicom(images / "one.dcm", synthetic_breast(), bits_stored=12, ImageLaterality="L", ViewPosition="CC")
    mixed = infer(images, "--out", tmp_path / "mixed.csv", "--model", onnx_model)
    assert mixed.exit_code == EXIT_OK, mixed.output
    assert "3 plain images" in mixed.output and "nothing scored" not in mixed.output


def test_the_exit_statuses_are_documented_in_help():
    text = CliRunner().invoke(infer_main, ["--help"]).output
    assert f"{EXIT_NOTHING_SCORED} nothing" in " ".join(text.split())


def test_an_out_under_a_file_says_the_file_is_no_folder(onnx_model, tmp_path):
    studies = tmp_path / "in"
    plain_image(studies / "1.pgm", "L")
    (tmp_path / "afile").write_text("not a folder\n")
    result = infer(studies, "--out", tmp_path / "afile" / "preds.csv", "--model", onnx_model)
    assert result.exit_code == EXIT_FAILED
    assert f"{tmp_path / 'afile'} is a file, not a folder" in result.output, result.output
    assert "File exists" not in result.output
