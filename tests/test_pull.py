"""dens-infer pulling studies from a real PACS: Orthanc (Debian package orthanc, and orthanc-dicomweb for its
DICOMweb plugin) on loopback ports, loaded with a small dens-synth cohort through its REST API. A DICOMweb
pull of a date range gives the rows and the SRs a folder run of the same files gives, and a rerun with
--resume fetches nothing; C-FIND with C-MOVE, and with C-GET, give the same rows; HTTP basic authentication
lets the right password in and stops the wrong one with a clear error. Each test skips, naming the package,
where Orthanc or its plugin is not installed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from pydicom import dcmread

from dens import labels
from dens.commands import EXIT_NOTHING_SCORED
from dens.infer import EXIT_FAILED, EXIT_OK, InferConfig
from dens.infer.cli import main as infer_main
from dens.infer.runner import run
from pacs import free_port, need_dicomweb, orthanc, orthanc_holding, pacs_ports, rest

PROBABILITIES = [*labels.PROB_COLUMNS, labels.P_DENSE]
# InstanceCreationDate and Time, ContentDate and Time, ContributionDateTime; the Tracking UID (TID 1501).
SR_VOLATILE = {"00080012", "00080013", "00080023", "00080033", "0018A002", "0040A124"}


def read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, dtype=str, keep_default_na=False)


def headers(cohort: Path) -> pd.DataFrame:
    """Each file of the cohort with its study, date and patient, from its header."""
    found = []
    for path in sorted(cohort.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        found.append((path, ds.StudyInstanceUID, ds.StudyDate, ds.PatientID, ds.SOPInstanceUID))
    return pd.DataFrame(found, columns=["path", "study", "date", "patient", "sop"])


def assert_same_rows(pulled: pd.DataFrame, folder: pd.DataFrame) -> None:
    """The same rows but for their path, by SOP Instance UID: every cell equal, probabilities to float noise."""
    assert len(pulled) == len(folder) > 0
    a = pulled.set_index(labels.SOP_UID).sort_index().drop(columns=[labels.PATH])
    b = folder.set_index(labels.SOP_UID).sort_index().drop(columns=[labels.PATH])
    assert list(a.index) == list(b.index)
    pd.testing.assert_frame_equal(a.drop(columns=PROBABILITIES), b.drop(columns=PROBABILITIES))
    ok = a[labels.STATUS] == "ok"
    assert ok.all()
    np.testing.assert_allclose(a[PROBABILITIES].astype(float), b[PROBABILITIES].astype(float), atol=2e-6)


def sr_content(path: Path) -> dict:
    """An SR as DICOM JSON, without what differs between any two writes of it: the times it was written at and
    the tracking UIDs of its measurement groups (new for each write)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in SR_VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(dcmread(path).to_json_dict())


@pytest.fixture(scope="module")
def cohort(synthetic_cohort) -> Path:
    return synthetic_cohort(3, seed=5)


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return pacs_ports()


@pytest.fixture(scope="module")
def pacs(cohort, ports, tmp_path_factory) -> str:
    """Orthanc holding the cohort, with dens (AE title DENS, the test's move port) among its modalities."""
    with orthanc_holding(tmp_path_factory.mktemp("orthanc"), ports, sorted(cohort.rglob("*.dcm"))) as url:
        yield url


@pytest.fixture(scope="module")
def folder_run(cohort, onnx_model, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """A run over the cohort's folder, with its SRs: the rows a pull must give (and the SRs' folder)."""
    out = tmp_path_factory.mktemp("folder") / "preds.csv"
    summary = run(InferConfig(cohort, out, model=onnx_model, sr=out.parent / "sr", progress=False))
    assert summary.exit_code == EXIT_OK
    return read(out), out.parent / "sr"


def test_a_dicomweb_pull_of_a_date_range_is_a_folder_run_and_a_resume_fetches_nothing(
    pacs, cohort, folder_run, onnx_model, tmp_path
):
    need_dicomweb()
    files = headers(cohort)
    dates = sorted(set(files["date"]))
    assert len(dates) >= 2, "the cohort needs studies of two dates for the range to leave one out"
    taken = files[files["date"] <= dates[-2]]  # the range leaves the latest date's studies out
    out = tmp_path / "preds.csv"
    cfg = InferConfig(
        f"{pacs}/dicom-web", out, model=onnx_model, study_date=f"{dates[0]}-{dates[-2]}", sr=tmp_path / "sr",
        progress=False,
    )  # fmt: skip
    summary = run(cfg)
    rows, (folder, folder_sr) = read(out), folder_run
    assert summary.exit_code == EXIT_OK
    assert set(rows[labels.STUDY_UID]) == set(taken["study"]) != set(files["study"])
    assert_same_rows(rows, folder[folder[labels.STUDY_UID].isin(taken["study"])])
    pulled = tmp_path / "preds.pulled"
    for row in rows.itertuples():
        assert Path(row.path) == pulled / row.study_uid / row.series_uid / f"{row.sop_uid}.dcm"
    originals = dict(zip(files["sop"], files["path"], strict=True))
    for row in rows.itertuples():  # kept as the PACS stores them, byte for byte
        assert Path(row.path).read_bytes() == originals[row.sop_uid].read_bytes()
    pull = summary.pull
    assert (pull.studies, pull.instances, pull.fetched, pull.failed, pull.done) == (
        taken["study"].nunique(), len(taken), len(taken), 0, 0,
    )  # fmt: skip
    assert pull.bytes == sum(p.stat().st_size for p in taken["path"])
    assert {p.name for p in (tmp_path / "sr").iterdir()} == {f"{s}.sr.dcm" for s in set(taken["study"])}
    for report in (tmp_path / "sr").iterdir():
        assert sr_content(report) == sr_content(folder_sr / report.name)

    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pulled.rglob("*.dcm")}
    again = run(dataclasses.replace(cfg, resume=True))
    assert (again.pull.instances, again.pull.done, again.pull.fetched, again.files) == (len(taken), len(taken), 0, 0)
    assert "nothing to fetch" in again.pull.line()
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pulled.rglob("*.dcm")} == kept
    pd.testing.assert_frame_equal(read(out), rows)
    assert again.exit_code == EXIT_OK


def test_a_c_find_c_move_pull_of_listed_studies_is_a_folder_run(pacs, ports, cohort, folder_run, onnx_model, tmp_path):
    studies = sorted(set(headers(cohort)["study"]))[:2]
    absent = "1.2.3.4.5.6.7.8.9"  # a study the PACS does not have: named in a warning
    cfg = InferConfig(
        f"dicom://ORTHANC@127.0.0.1:{ports['dicom']}", tmp_path / "preds.csv", model=onnx_model,
        study_uid=(*studies, absent), move_port=ports["move"], progress=False,
    )  # fmt: skip
    summary = run(cfg)
    rows, folder = read(tmp_path / "preds.csv"), folder_run[0]
    assert set(rows[labels.STUDY_UID]) == set(studies)
    assert_same_rows(rows, folder[folder[labels.STUDY_UID].isin(studies)])
    assert summary.pull.fetched == len(rows) and summary.pull.studies_missing == [absent]
    assert any(absent in warning for warning in summary.warnings())
    assert summary.exit_code == EXIT_OK
    for row in rows.itertuples():
        assert dcmread(row.path, stop_before_pixels=True).SOPInstanceUID == row.sop_uid


def test_a_c_get_pull_with_a_matching_key_is_a_folder_run(pacs, ports, cohort, folder_run, onnx_model, tmp_path):
    files = headers(cohort)
    patient = sorted(set(files["patient"]))[-1]
    cfg = InferConfig(
        f"dicom://ORTHANC@127.0.0.1:{ports['dicom']}", tmp_path / "preds.csv", model=onnx_model,
        since="20000d", query=(f"PatientID={patient}",), retrieve="get", progress=False,
    )  # fmt: skip
    summary = run(cfg)
    rows, folder = read(tmp_path / "preds.csv"), folder_run[0]
    assert set(rows[labels.PATIENT_ID]) == {patient}
    assert_same_rows(rows, folder[folder[labels.PATIENT_ID] == patient])
    assert summary.pull.fetched == len(rows) == (files["patient"] == patient).sum()
    assert summary.exit_code == EXIT_OK


@pytest.fixture(scope="module")
def locked_pacs(cohort, tmp_path_factory) -> tuple[str, str, tuple[str, str]]:
    """Orthanc asking for HTTP basic authentication, holding one study: (URL, the study, (user, password))."""
    need_dicomweb()
    user = ("dens", "s3cret-Pw")
    with orthanc(tmp_path_factory.mktemp("locked"), free_port(), free_port(), users=dict([user])) as url:
        files = headers(cohort)
        study = files["study"].iloc[0]
        for path in files[files["study"] == study]["path"]:
            rest(f"{url}/instances", path.read_bytes(), auth=user)
        yield url, study, user


def test_http_basic_authentication_right_and_wrong_password(locked_pacs, onnx_model, tmp_path, monkeypatch):
    url, study, (user, password) = locked_pacs
    args = [f"{url}/dicom-web", "--study-uid", study, "--model", str(onnx_model), "--no-progress"]
    args += ["--pull-user", user, "--pull-password-env", "DENS_TEST_PACS_PASSWORD"]
    monkeypatch.setenv("DENS_TEST_PACS_PASSWORD", "not-" + password)
    refused = CliRunner().invoke(infer_main, [*args, "--out", str(tmp_path / "refused" / "preds.csv")])
    assert refused.exit_code == EXIT_FAILED, refused.output
    assert "HTTP 401" in refused.output and "check the credentials" in refused.output
    assert password not in refused.output
    assert not (tmp_path / "refused" / "preds.csv").exists()

    monkeypatch.setenv("DENS_TEST_PACS_PASSWORD", password)
    done = CliRunner().invoke(infer_main, [*args, "--out", str(tmp_path / "preds.csv")])
    assert done.exit_code == EXIT_OK, done.output
    rows = read(tmp_path / "preds.csv")
    assert set(rows[labels.STUDY_UID]) == {study} and set(rows[labels.STATUS]) == {"ok"} and len(rows) == 4
    assert "4 fetched" in done.output and password not in done.output

    monkeypatch.delenv("DENS_TEST_PACS_PASSWORD")
    unset = CliRunner().invoke(infer_main, [*args, "--out", str(tmp_path / "unset.csv")])
    assert unset.exit_code == 2 and "DENS_TEST_PACS_PASSWORD is not set" in unset.output


def test_instances_a_retrieve_does_not_deliver_are_error_rows_and_retry_errors_fetches_them(
    pacs, ports, cohort, onnx_model, tmp_path
):
    """dens listening on another port than the one the PACS knows for it: the C-MOVE fails every instance with
    the PACS's status (error rows with their UIDs; nothing scored, so exit status 4); --retry-errors on the right
    port fetches them."""
    study = sorted(set(headers(cohort)["study"]))[0]
    cfg = InferConfig(
        f"dicom://ORTHANC@127.0.0.1:{ports['dicom']}", tmp_path / "preds.csv", model=onnx_model,
        study_uid=(study,), move_port=free_port(), progress=False,
    )  # fmt: skip
    failed = run(cfg)
    rows = read(tmp_path / "preds.csv")
    assert failed.exit_code == EXIT_NOTHING_SCORED and set(rows[labels.STATUS]) == {"error"} and len(rows) == 4
    assert all(reason.startswith("pull_failed: not received (C-MOVE") for reason in rows[labels.REASON])
    assert set(rows[labels.STUDY_UID]) == {study} and rows[labels.SOP_UID].str.len().gt(0).all()
    assert not any(Path(p).exists() for p in rows[labels.PATH])
    assert failed.pull.failed == 4 and failed.pull.fetched == 0

    retried = run(dataclasses.replace(cfg, move_port=ports["move"], retry_errors=True))
    rows = read(tmp_path / "preds.csv")
    assert retried.exit_code == EXIT_OK and retried.pull.fetched == 4 and retried.retried == 4
    assert set(rows[labels.STATUS]) == {"ok"} and len(rows) == 4
