"""dens.sr: the density SR of an exam, read back with pydicom, and validated by dicom3tools' dciodvfy and
DCMTK's dsrdump (those tests skip, saying why, where the tools are absent: `make test` installs them as root)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import REAL_FILES, synthetic_breast, write_dicom
from dens import labels, sr
from dens.flags import prediction_cells

DENS_INFER = [sys.executable, "-c", "from dens.infer.cli import main; main()"]
SHA = "ab" * 32
MODEL = sr.ModelIdentity("dens resnet18 breast density", "dens 0.1.0; resnet18 fp32", SHA)
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
# Per side, the probabilities of both its views: the left breast is B, the right one D, so the exam is D.
PROBS = {"L": [0.1, 0.7, 0.15, 0.05], "R": [0.02, 0.08, 0.2, 0.7]}


def make_exam(folder: Path, views=VIEWS, **tags) -> pd.DataFrame:
    """DICOM files of one exam in ``folder`` and their preds.csv rows (``path`` the file itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    identity = {
        "PatientID": "P-42",
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "StudyInstanceUID": study,
        "StudyDate": "20260101",
        "StudyTime": "101010",
        "StudyID": "S1",
        "ReferringPhysicianName": "",
        "AccessionNumber": "ACC-7",
        **tags,
    }
    rows = []
    for i, (side, view) in enumerate(views):
        path = write_dicom(
            folder / f"{side}{view}.dcm",
            synthetic_breast(64, 48, seed=i),
            ImageLaterality=side,
            ViewPosition=view,
            SeriesInstanceUID=generate_uid(),
            InstanceNumber=i + 1,
            **identity,
        )
        ds = dcmread(path, stop_before_pixels=True)
        rows.append(
            {
                labels.PATH: str(path),
                labels.STATUS: "ok",
                labels.PATIENT_ID: ds.PatientID,
                labels.ACCESSION: ds.AccessionNumber,
                labels.STUDY_UID: ds.StudyInstanceUID,
                labels.SERIES_UID: ds.SeriesInstanceUID,
                labels.SOP_UID: ds.SOPInstanceUID,
                labels.LATERALITY: side,
                labels.VIEW: view,
                **prediction_cells(np.array(PROBS[side])),
                labels.MODEL_SHA256: SHA,
            }
        )
    return pd.DataFrame(rows).astype(str)


def content(item) -> list:
    """Every content item under ``item``, depth first."""
    found = []
    for child in getattr(item, "ContentSequence", []):
        found.append(child)
        found.extend(content(child))
    return found


def code(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def groups(ds) -> dict[str, object]:
    """The measurement groups by tracking identifier."""
    found = {}
    for item in content(ds):
        if item.ValueType == "CONTAINER" and code(item) == "125007":  # Measurement Group
            name = next(c.TextValue for c in item.ContentSequence if code(c) == "112039")  # Tracking Identifier
            found[name] = item
    return found


def composition(group) -> str | None:
    for child in group.ContentSequence:
        if code(child) == "129715009":
            return child.ConceptCodeSequence[0].CodeValue
    return None


def laterality(group) -> str:
    site = next(c for c in group.ContentSequence if code(c) == "363698007")  # Finding Site
    return next(c.ConceptCodeSequence[0].CodeValue for c in site.ContentSequence if code(c) == "272741003")


@pytest.fixture
def complete(tmp_path) -> tuple[pd.DataFrame, Path]:
    rows = make_exam(tmp_path / "exam")
    return rows, sr.write_reports(rows, tmp_path / "sr", MODEL)[0]


def test_a_complete_exam_carries_each_breasts_composition_and_the_exams(complete):
    _, path = complete
    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (ds.VerificationFlag, ds.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    found = groups(ds)
    assert set(found) == {"breast L", "breast R", "exam"}
    assert composition(found["breast L"]) == sr.COMPOSITION["B"].value == "129717001"
    assert composition(found["breast R"]) == sr.COMPOSITION["D"].value == "129719003"
    assert composition(found["exam"]) == "129719003"
    assert [laterality(found[g]) for g in ("breast L", "breast R", "exam")] == ["7771000", "24028007", "51440002"]
    p_dense = next(c for c in found["breast R"].ContentSequence if code(c) == "p_dense")
    assert float(p_dense.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.9)


def test_the_report_references_every_source_image_and_copies_the_identity(complete):
    rows, path = complete
    ds = dcmread(path)
    evidence = {
        ref.ReferencedSOPInstanceUID: ref.ReferencedSOPClassUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == dict.fromkeys(rows[labels.SOP_UID], "1.2.840.10008.5.1.4.1.1.1.2")
    images = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content(ds) if i.ValueType == "IMAGE"}
    assert images == set(rows[labels.SOP_UID])
    assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == (
        "P-42",
        "Doe^Jane",
        "19700101",
        "F",
    )
    assert (ds.StudyInstanceUID, ds.AccessionNumber) == (rows[labels.STUDY_UID][0], "ACC-7")
    assert path.name == f"{ds.StudyInstanceUID}.sr.dcm"


def test_the_model_is_the_observer_device_and_the_contributing_equipment(complete):
    _, path = complete
    ds = dcmread(path)
    texts = {code(i): i.TextValue for i in content(ds) if i.ValueType == "TEXT"}
    assert texts["121013"] == MODEL.name  # Device Observer Name
    assert texts["121015"] == MODEL.version  # Device Observer Model Name
    assert texts["121016"] == SHA  # Device Observer Serial Number
    uids = {code(i): i.UID for i in content(ds) if i.ValueType == "UIDREF"}
    assert uids["121012"] == MODEL.device_uid  # Device Observer UID
    equipment = ds.ContributingEquipmentSequence[0]
    assert (equipment.Manufacturer, equipment.DeviceSerialNumber) == ("dens", SHA)
    assert equipment.SoftwareVersions == MODEL.version


def test_the_same_exam_gives_the_same_instance(complete, tmp_path):
    rows, path = complete
    again = sr.write_reports(rows, tmp_path / "again", MODEL)[0]
    assert dcmread(again).SOPInstanceUID == dcmread(path).SOPInstanceUID


def test_an_incomplete_exam_gets_no_call_and_says_which_views_are_missing(tmp_path):
    rows = make_exam(tmp_path / "exam", views=VIEWS[:3])
    ds = dcmread(sr.write_reports(rows, tmp_path / "sr", MODEL)[0])
    assert ds.CompletionFlag == "PARTIAL"
    found = groups(ds)
    assert set(found) == {"breast L", "breast R"}
    assert all(composition(g) is None for g in found.values())
    assert not [i for i in content(ds) if code(i) in ("129715009", "p_dense")]
    comments = [i.TextValue for i in content(ds) if code(i) == "121106"]
    assert comments and all("R-MLO" in c for c in comments)


@pytest.mark.parametrize(
    ("uid", "safe"),
    [("1.2.840.5", True), ("../../etc/passwd", False), ("1.2/3", False), ("1..2", False), ("", False)],
)
def test_file_names_from_uids_never_hold_path_characters(uid, safe):
    name = sr.uid_filename(uid, ".dcm")
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert (name == f"{uid}.dcm") is safe


def dciodvfy_errors(path: Path) -> list[str]:
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; `make test` installs it as root")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_error_in_complete_and_incomplete_reports(complete, tmp_path):
    _, path = complete
    partial = sr.write_reports(make_exam(tmp_path / "p", views=VIEWS[1:]), tmp_path / "sr-partial", MODEL)[0]
    assert dciodvfy_errors(path) == []
    assert dciodvfy_errors(partial) == []


def test_dsrdump_reads_the_report(complete):
    if not shutil.which("dsrdump"):
        pytest.skip("dsrdump (Debian package dcmtk) is not installed; `make test` installs it as root")
    _, path = complete
    out = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Breast composition" in out.stdout and "Extremely dense breast" in out.stdout
    assert "Comprehensive 3D SR" in out.stdout


def test_reports_on_the_real_samples_are_valid(real_mammo, tmp_path):
    rows = []
    for name in REAL_FILES:
        ds = dcmread(real_mammo / name, stop_before_pixels=True)
        rows.append(
            {
                labels.PATH: str(real_mammo / name),
                labels.STATUS: "ok",
                labels.PATIENT_ID: str(ds.get("PatientID", "")),
                labels.ACCESSION: str(ds.get("AccessionNumber", "")),
                labels.STUDY_UID: str(ds.get("StudyInstanceUID", "")),
                labels.SOP_UID: str(ds.SOPInstanceUID),
                labels.LATERALITY: str(ds.get("ImageLaterality", ds.get("Laterality", ""))),
                labels.VIEW: str(ds.get("ViewPosition", "")),
                **prediction_cells(np.array(PROBS["L"])),
                labels.MODEL_SHA256: SHA,
            }
        )
    written = sr.write_reports(pd.DataFrame(rows).astype(str), tmp_path / "sr", MODEL)
    assert written
    for path in written:
        assert dciodvfy_errors(path) == [], path.name


def test_dens_infer_sr_writes_one_report_per_exam_with_the_exam_csvs_calls(synthetic_cohort, onnx_model, tmp_path):
    out, folder = tmp_path / "preds.csv", tmp_path / "sr"
    done = subprocess.run(
        [
            *DENS_INFER,
            str(synthetic_cohort()),
            "--model",
            str(onnx_model),
            "--out",
            str(out),
            "--sr",
            str(folder),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    calls = pd.read_csv(tmp_path / "preds.exam.csv", dtype=str, keep_default_na=False)
    reports = sorted(folder.glob("*.sr.dcm"))
    assert len(reports) == len(calls) and f"wrote {len(calls)} density SRs" in done.stdout
    for path in reports:
        ds = dcmread(path)
        call = calls[calls[labels.STUDY_UID] == ds.StudyInstanceUID].iloc[0]
        assert call["incomplete"] == "false"
        found = groups(ds)
        assert composition(found["exam"]) == sr.COMPOSITION[call[labels.DENSITY]].value
        assert composition(found["breast L"]) == sr.COMPOSITION[call["density_L"]].value
        assert dciodvfy_errors(path) == [] if shutil.which("dciodvfy") else True
