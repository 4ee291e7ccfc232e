"""dens-serve's answer to a study it cannot call: a study whose every image was skipped or failed gets an SR that
says it was not assessed and why, image by image, sent to the PACS like any other. Orthanc is the PACS, started
as tests/test_serve.py starts it (its node, Orthanc and helpers are shared from there); a test whose program is
missing skips, naming it."""

from __future__ import annotations

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import synthetic_breast, write_dicom
from dens import labels
from test_serve import (  # the node and Orthanc fixtures, shared
    compositions,
    content,
    dciodvfy_errors,
    node,  # noqa: F401
    orthanc,  # noqa: F401
    ports,  # noqa: F401
    preds,
    referenced,
    rest,
    send_from_orthanc,
    srs_in_orthanc,
    wait_for,
)

FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"  # Digital Mammography X-Ray Image Storage - For Processing
COMMENT = "121106"


def test_a_study_without_a_usable_image_gets_a_not_assessed_sr_at_the_pacs(node, orthanc, tmp_path):  # noqa: F811
    study, patient = generate_uid(), {"PatientID": "P-NONE", "PatientName": "Doe^Jane", "StudyDate": "20260101"}
    files = [
        write_dicom(  # a raw image: skipped (for_processing)
            tmp_path / "raw.dcm",
            synthetic_breast(128, 96, seed=3),
            sop_class=FOR_PROCESSING,
            PresentationIntentType="FOR PROCESSING",
            ImageLaterality="L",
            ViewPosition="CC",
            StudyInstanceUID=study,
            **patient,
        ),
        write_dicom(  # a header that claims 60000 x 60000 pixels: an error row
            tmp_path / "huge.dcm",
            np.zeros((64, 64), np.uint16),
            Rows=60000,
            Columns=60000,
            ImageLaterality="R",
            ViewPosition="MLO",
            StudyInstanceUID=study,
            **patient,
        ),
    ]
    job = send_from_orthanc(orthanc, study, files)
    assert job["InstancesCount"] == 2 and job["FailedInstancesCount"] == 0
    found = wait_for("the not-assessed SR in Orthanc", lambda: srs_in_orthanc(orthanc, study))
    assert len(found) == 1
    path = tmp_path / "sr.dcm"
    path.write_bytes(rest(f"{orthanc}/instances/{found[0]}/file"))
    report = dcmread(path)
    assert report.PatientID == "P-NONE" and report.CompletionFlag == "PARTIAL"
    assert compositions(report) == {}  # no composition: nothing was assessed
    notes = [
        i.TextValue
        for i in content(report)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == COMMENT
    ]
    assert any(n.startswith("Not assessed") for n in notes)
    rows = preds(node.state).query(f"{labels.STUDY_UID} == @study")
    assert sorted(rows[labels.STATUS]) == ["error", "skipped"]
    for _, row in rows.iterrows():  # each image named, with its reason
        reason = row[labels.REASON].split(":")[0]
        assert any(row[labels.SOP_UID] in n and reason in n for n in notes), (reason, notes)
    assert referenced(report) == {dcmread(f).SOPInstanceUID for f in files}
    assert dciodvfy_errors(path) == []
    answer = node.answered(study)
    assert answer["sr_uid"] == report.SOPInstanceUID and not answer["density"]
