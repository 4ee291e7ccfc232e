"""dens.sr: the density SR of an exam, read back with pydicom, and validated by dicom3tools' dciodvfy and
DCMTK's dsrdump (those tests skip, saying why, where the tools are absent: `make test` installs them as root).
An incomplete exam (three views, one breast, the real RSNA exam) gets one composition in preds.exam.csv, the SR
and the review page; dens-infer --sr with plain images reports the DICOM exams and goes on."""

from __future__ import annotations

import html
import re
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
from dens import exams, labels, sr
from dens.flags import prediction_cells
from dens.preds import aggregate
from dens.review import report

DENS_INFER = [sys.executable, "-c", "from dens.infer.cli import main; main()"]
SHA = "ab" * 32
MODEL = sr.ModelIdentity("dens resnet18 breast density", "dens 0.1.0; resnet18 fp32", SHA)
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
# The RSNA exam among the real samples: L CC, R CC and R MLO of one study (its L MLO is not in the set).
REAL_THREE_VIEWS = (
    "rsna-kaggle-train/462822612.dcm",
    "rsna-kaggle-train/1874946579.dcm",
    "rsna-kaggle-train/1864590858.dcm",
)
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
                labels.REASON: "",
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


def comments(group) -> list[str]:
    """The text of a group's comments."""
    return [c.TextValue for c in group.ContentSequence if code(c) == "121106"]


def test_a_three_view_exam_gets_each_breasts_composition_and_names_the_missing_view(tmp_path):
    rows = make_exam(tmp_path / "exam", views=VIEWS[:3])  # R-MLO missing
    ds = dcmread(sr.write_reports(rows, tmp_path / "sr", MODEL)[0])
    assert ds.CompletionFlag == "PARTIAL"  # fewer views than a screening exam, and said so
    found = groups(ds)
    assert set(found) == {"breast L", "breast R", "exam"}
    assert composition(found["breast L"]) == sr.COMPOSITION["B"].value
    assert composition(found["breast R"]) == composition(found["exam"]) == sr.COMPOSITION["D"].value
    assert laterality(found["exam"]) == sr.LATERALITY["B"].value
    assert comments(found["breast L"]) == []  # both its views
    assert any("missing R-MLO" in c for c in comments(found["breast R"]))
    assert any("missing R-MLO" in c for c in comments(found["exam"]))


def test_a_one_breast_exam_gets_that_breasts_composition_and_names_the_missing_side(tmp_path):
    rows = make_exam(tmp_path / "exam", views=VIEWS[2:])  # a right breast only (a left mastectomy)
    ds = dcmread(sr.write_reports(rows, tmp_path / "sr", MODEL)[0])
    assert ds.CompletionFlag == "PARTIAL"
    found = groups(ds)
    assert set(found) == {"breast R", "exam"}
    assert composition(found["breast R"]) == composition(found["exam"]) == sr.COMPOSITION["D"].value
    assert laterality(found["exam"]) == sr.LATERALITY["R"].value  # the exam's call is the right breast's
    assert comments(found["breast R"]) == []
    assert any("no left breast image" in c for c in comments(found["exam"]))


def check_one_composition(preds_csv: Path, reports: Path, missing: list[str], sides: set[str]) -> None:
    """preds.exam.csv, the SR and the review page give the one exam of ``preds_csv`` the same composition,
    each breast imaged its own, and say the same of what is missing."""
    preds = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    calls = pd.read_csv(exams.aggregate_paths(preds_csv)[1], dtype=str, keep_default_na=False)
    assert len(calls) == 1
    call = calls.iloc[0]
    assert call[labels.DENSITY] in labels.CLASSES
    assert (call[exams.INCOMPLETE], call[exams.MISSING_VIEWS]) == ("true", ";".join(missing))
    breasts = pd.read_csv(exams.aggregate_paths(preds_csv)[0], dtype=str, keep_default_na=False)
    assert set(breasts[labels.LATERALITY]) == sides
    for _, breast in breasts.iterrows():  # each breast called, flagged where its side lacks a view
        lacks = ";".join(v for v in missing if v[0] == breast[labels.LATERALITY])
        assert (breast[exams.INCOMPLETE], breast[exams.MISSING_VIEWS]) == ("true" if lacks else "false", lacks)
        assert breast[labels.DENSITY] == call[f"density_{breast[labels.LATERALITY]}"]
    [path] = sorted(reports.glob("*.sr.dcm"))
    ds = dcmread(path)
    assert ds.CompletionFlag == "PARTIAL"
    found = groups(ds)
    assert set(found) == {f"breast {s}" for s in sides} | {"exam"}
    assert composition(found["exam"]) == sr.COMPOSITION[call[labels.DENSITY]].value
    for side in sides:
        assert composition(found[f"breast {side}"]) == sr.COMPOSITION[call[f"density_{side}"]].value
    note = exams.describe_missing(missing)
    assert any(note in c for c in comments(found["exam"]))
    page = report.write_report(preds, preds_csv, {}, exam_calls=calls).read_text()
    cell = re.search(r'<td class="call" title="preds.exam.csv">(.*?)</td>', page, re.S)
    assert cell and cell.group(1).startswith(call[labels.DENSITY]) and html.escape(note) in cell.group(1)
    assert f'data-call="{call[labels.DENSITY]}"' in page


@pytest.mark.parametrize(
    ("views", "missing", "sides"),
    [(VIEWS[:3], ["R-MLO"], {"L", "R"}), (VIEWS[:2], ["R-CC", "R-MLO"], {"L"})],
    ids=["three-of-four-views", "one-breast"],
)
def test_an_incomplete_exam_gets_one_composition_in_the_csv_the_sr_and_the_page(tmp_path, views, missing, sides):
    rows = make_exam(tmp_path / "exam", views=views)
    preds_csv = tmp_path / "preds.csv"
    rows.to_csv(preds_csv, index=False)
    aggregate.write_aggregates(preds_csv)
    sr.write_reports(rows, tmp_path / "sr", MODEL)
    check_one_composition(preds_csv, tmp_path / "sr", missing, sides)


def test_the_real_three_view_exam_gets_one_composition_in_the_csv_the_sr_and_the_page(real_mammo, onnx_model, tmp_path):
    """The RSNA exam of the team's samples has L CC, R CC and R MLO (no L MLO): dens-infer calls it, both
    breasts included, in preds.exam.csv, in its SR and on the review page."""
    folder = tmp_path / "exam"
    folder.mkdir()
    for name in REAL_THREE_VIEWS:
        (folder / Path(name).name).symlink_to(real_mammo / name)
    out = tmp_path / "preds.csv"
    done = subprocess.run(
        [*DENS_INFER, str(folder), "--model", str(onnx_model), "--out", str(out), "--sr", str(tmp_path / "sr")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    check_one_composition(out, tmp_path / "sr", ["L-MLO"], {"L", "R"})


def test_images_without_a_call_are_named_with_their_reason(tmp_path):
    rows = make_exam(tmp_path / "exam")
    rows.loc[3, [labels.STATUS, labels.REASON]] = ["skipped", "for_processing: a raw image"]
    ds = dcmread(sr.write_reports(rows, tmp_path / "sr", MODEL)[0])
    notes = comments(groups(ds)["exam"])
    assert any("R-MLO" in c and rows.loc[3, labels.SOP_UID] in c and "for_processing" in c for c in notes)


def not_assessed(folder: Path) -> tuple[pd.DataFrame, Path]:
    """An exam none of whose images was usable, as dens-serve reports it: its rows and its SR."""
    rows = make_exam(folder / "exam", views=VIEWS[:2])
    rows[labels.STATUS] = ["skipped", "error"]
    rows[labels.REASON] = ["for_processing: a raw image", "corrupt_pixel_data: the codestream ends early"]
    headers = dict(zip(rows[labels.PATH], sr.read_headers(list(rows[labels.PATH])), strict=True))
    return rows, sr.save(sr.exam_report(rows, headers, MODEL), folder)


def test_an_exam_without_a_usable_image_gets_a_report_that_says_not_assessed_and_why(tmp_path):
    rows, path = not_assessed(tmp_path)
    ds = dcmread(path)
    assert ds.CompletionFlag == "PARTIAL"
    [group] = groups(ds).values()
    assert composition(group) is None and not [i for i in content(ds) if code(i) == "p_dense"]
    notes = comments(group)
    assert notes[0].startswith("Not assessed")
    for _, row in rows.iterrows():
        assert any(row[labels.SOP_UID] in n and row[labels.REASON].split(":")[0] in n for n in notes)
    assert set(library(ds)) == set(rows[labels.SOP_UID])  # the images it names, described and in the evidence
    assert dciodvfy(path) == []


def library(ds) -> dict[str, dict[str, str]]:
    """The image library's entries: SOP Instance UID -> {descriptor concept: its coded value (or text)}."""
    found = {}
    for item in content(ds):
        if item.ValueType == "CONTAINER" and code(item) == "111028":  # Image Library
            for entry in content(item):
                if entry.ValueType == "IMAGE":
                    found[entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = {
                        code(d): d.ConceptCodeSequence[0].CodeValue
                        if d.ValueType == "CODE"
                        else str(d.get("TextValue"))
                        for d in entry.ContentSequence
                    }
    return found


def test_every_source_image_is_described_with_its_laterality_and_view(complete):
    rows, path = complete
    entries = library(dcmread(path))
    assert set(entries) == set(rows[labels.SOP_UID])
    views = {"CC": "399162004", "MLO": "399368009"}  # SCT, CID 4014 View for Mammography
    for _, row in rows.iterrows():
        described = entries[row[labels.SOP_UID]]
        assert described["111027"] == sr.LATERALITY[row[labels.LATERALITY]].value  # Image Laterality
        assert described["111031"] == views[row[labels.VIEW]]  # Image View


def test_the_composition_s_text_carries_the_bi_rads_letter(complete):
    _, path = complete
    found = groups(dcmread(path))
    for name, letter in (("breast L", "B"), ("breast R", "D"), ("exam", "D")):
        item = next(c for c in found[name].ContentSequence if code(c) == "129715009")
        assert f"BI-RADS {letter}" in item.ConceptCodeSequence[0].CodeMeaning


def test_the_private_coding_scheme_is_identified(complete):
    _, path = complete
    ds = dcmread(path)
    schemes = {item.CodingSchemeDesignator: item for item in ds.CodingSchemeIdentificationSequence}
    assert sr.P_DENSE.scheme_designator in schemes
    assert schemes[sr.P_DENSE.scheme_designator].CodingSchemeName


@pytest.mark.parametrize(
    ("uid", "safe"),
    [("1.2.840.5", True), ("../../etc/passwd", False), ("1.2/3", False), ("1..2", False), ("", False)],
)
def test_file_names_from_uids_never_hold_path_characters(uid, safe):
    name = sr.uid_filename(uid, ".dcm")
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert (name == f"{uid}.dcm") is safe


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's errors and warnings about ``path``."""
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; `make test` installs it as root")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def dciodvfy_errors(path: Path) -> list[str]:
    return [line for line in dciodvfy(path) if line.startswith("Error")]


def test_dciodvfy_finds_no_error_in_complete_and_incomplete_reports_and_warns_only_of_the_private_scheme(
    complete, tmp_path
):
    """dciodvfy knows a fixed list of coding schemes and warns of any other, a private one identified in the
    Coding Scheme Identification Sequence included (dicom3tools' attrvrfy.cc): 99DENS is the one it may name."""
    _, path = complete
    partial = sr.write_reports(make_exam(tmp_path / "p", views=VIEWS[1:]), tmp_path / "sr-partial", MODEL)[0]
    one_breast = sr.write_reports(make_exam(tmp_path / "o", views=VIEWS[2:]), tmp_path / "sr-one", MODEL)[0]
    for report_path in (path, partial, one_breast):
        found = dciodvfy(report_path)
        assert [line for line in found if not line.startswith("Warning - Unrecognized defined term <99DENS>")] == []


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


def test_dens_infer_sr_with_plain_images_reports_the_dicom_exams_and_goes_on(synthetic_cohort, onnx_model, tmp_path):
    """A folder of DICOM exams and a PGM, read with --plain-images: the DICOM exams get their SRs, the PGM's row
    is left out of them (a log line says so), and Grad-CAM and the review page run."""
    import cv2

    folder = tmp_path / "studies"
    shutil.copytree(synthetic_cohort(), folder)
    cv2.imwrite(str(folder / "scan.pgm"), (synthetic_breast(96, 72) >> 4).astype(np.uint8))
    out, reports, cams = tmp_path / "preds.csv", tmp_path / "sr", tmp_path / "cams"
    options = [
        "--plain-images",
        "--sr",
        str(reports),
        "--gradcam",
        str(cams),
        "--checkpoint",
        str(onnx_model.parent / "best.pt"),
    ]
    done = subprocess.run(
        [*DENS_INFER, str(folder), "--model", str(onnx_model), "--out", str(out), *options],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    preds = pd.read_csv(out, dtype=str, keep_default_na=False)
    plain = preds[preds[labels.PATH].str.endswith(".pgm")]
    assert list(plain[labels.STATUS]) == ["ok"]
    dicom_exams = {r[labels.STUDY_UID] for _, r in preds.iterrows() if r[labels.STATUS] == "ok" and r[labels.STUDY_UID]}
    assert {dcmread(p).StudyInstanceUID for p in reports.glob("*.sr.dcm")} == dicom_exams
    assert "1 plain-image row" in done.stderr and "left out of the SRs" in done.stderr
    assert report.report_path(out).is_file()


def test_a_side_imaged_in_no_standard_view_is_named_by_its_views_not_as_missing():
    # A plain image with a side but no view (or an exam of only a spot view) has that breast: the page and the
    # SR name the views it lacks, never "no left breast image".
    from dens.exams import describe_missing

    lacks = ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    assert describe_missing(lacks, ["L"]) == "no right breast image; missing L-CC, L-MLO"
    assert describe_missing(lacks) == "no left breast image; no right breast image"
    assert describe_missing(["R-MLO"], ["L", "R"]) == "missing R-MLO"
    assert describe_missing([]) == ""
