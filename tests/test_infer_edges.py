"""dens-infer at the edges: every row identified, hostile names and header values, two runs on one output,
plain images, formulas in cells, error rows on --resume, unwritable and full outputs, bad options, SIGTERM,
and the model's preprocessing recorded in every row."""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import synthetic_breast, write_dicom
from dens import exams, labels
from dens.commands import EXIT_NOTHING_SCORED
from dens.infer import EXIT_ERRORS, EXIT_FAILED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE
from dens.infer.cli import main as infer_main
from dens.infer.runner import InferConfig, InferError, run
from dens.preds.cells import escape_text, path_cell, raw_cell, raw_path, text_cell
from dens.preds.columns import COLUMNS, OLDER_COLUMNS, make_row, preprocess_cell
from dens.preds.lock import lock_path, output_lock
from dens.preds.writer import PredsWriter, read_existing
from dens.route import preprocess
from dens.route.config import PreprocessConfig

S = 32
CLEAVAGE = {"ViewPosition": "CV"}  # an excluded view: skipped, after its header was read


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, model.onnx): a random resnet18 at S=32."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("edge-model")
    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, build_model("resnet18"), PreprocessConfig(size=S))
    return checkpoint, export_onnx(checkpoint, root / "model.onnx")


def mammogram(path: Path, *, seed: int = 0, **tags) -> Path:
    """A small presentation mammogram (left breast, CC unless ``tags`` say otherwise) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = {"ImageLaterality": "L", "ViewPosition": "CC", **tags}
    return write_dicom(path, synthetic_breast(seed=seed), bits_stored=12, **tags)


def infer(studies: Path, out: Path, model: Path, **options):
    return run(InferConfig(studies, out, model=model, workers=1, batch_size=2, progress=False, **options))


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def records(path: Path) -> list[list[str]]:
    """The CSV's records by the csv module (strict: a stray quote or a torn row raises)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, strict=True))


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """dens-infer in its own process; stdout and stderr decoded as they are (no newline translation)."""
    command = [sys.executable, "-c", "from dens.infer.cli import main; main()", *map(str, args), "--no-progress"]
    done = subprocess.run(command, capture_output=True, timeout=300)
    done.stdout, done.stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    return done


# --- every row identified ----------------------------------------------------------------------------------


def test_skipped_rows_keep_the_identity_the_header_gave(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "cc.dcm", PatientID="P-7", Manufacturer="ACME", ManufacturerModelName="M 1")
    mammogram(studies / "cleavage.dcm", PatientID="P-SPOT", AccessionNumber="ACC9", **CLEAVAGE)
    infer(studies, tmp_path / "preds.csv", model[1])
    preds = read(tmp_path / "preds.csv").set_index(labels.PATH)
    ok, skipped = preds.loc[str(studies / "cc.dcm")], preds.loc[str(studies / "cleavage.dcm")]
    assert (ok[labels.STATUS], ok["laterality_source"], ok["manufacturer"], ok["manufacturer_model"]) == (
        "ok",
        "tag",
        "ACME",
        "M 1",
    )
    assert skipped[labels.STATUS] == "skipped" and skipped[labels.REASON].startswith("excluded_view")
    assert (skipped[labels.PATIENT_ID], skipped[labels.ACCESSION]) == ("P-SPOT", "ACC9")
    assert skipped[labels.SOP_UID] and skipped[labels.STUDY_UID] and skipped[labels.LATERALITY] == "L"


def test_an_exam_missing_standard_views_is_marked_incomplete():
    probs = [0.1, 0.2, 0.3, 0.4]
    rows = [
        make_row(
            f"/d/{i}.dcm",
            status="ok",
            info={labels.STUDY_UID: study, labels.LATERALITY: side, labels.VIEW: view},
            probs=probs,
            model_sha256="f",
        )
        for i, (study, side, view) in enumerate(
            [("S1", "L", "CC"), ("S1", "L", "MLO"), ("S1", "R", "CC"), ("S1", "R", "MLO"), ("S2", "L", "CC")]
        )
    ]
    rows.append(
        make_row(
            "/d/x.dcm", status="error", reason="corrupt_pixel_data: x", info={labels.STUDY_UID: "S2"}, model_sha256="f"
        )
    )
    exam = exams.exam_calls(pd.DataFrame(rows)).set_index(exams.EXAM)
    complete, partial = exam.loc["study_uid:S1"], exam.loc["study_uid:S2"]
    assert (complete[exams.INCOMPLETE], complete[exams.MISSING_VIEWS]) == ("false", "")
    assert (partial[exams.INCOMPLETE], partial[exams.MISSING_VIEWS]) == ("true", "L-MLO;R-CC;R-MLO")


# --- hostile names and header values ---------------------------------------------------------------------


def test_carriage_returns_in_names_and_header_values_keep_one_row_per_line(model, tmp_path):
    studies = tmp_path / "in"
    study = {"StudyInstanceUID": "1.2.3.4"}
    mammogram(studies / "a\rb.dcm", PatientID="A\rB", seed=1, **study)
    mammogram(studies / "new\nline.dcm", PatientID="C\nD", ImageLaterality="R", seed=2, **study)
    (studies / "tab\tand\x1b[2J.txt").write_text("not an image\n")
    out = tmp_path / "preds.csv"
    summary = infer(studies, out, model[1])
    assert b"\r" not in out.read_bytes() and out.read_bytes().count(b"\n") == 4  # the header and 3 rows
    rows = records(out)[1:]
    assert sorted(r[0] for r in rows) == sorted(
        path_cell(str(studies / n)) for n in ("a\rb.dcm", "new\nline.dcm", "tab\tand\x1b[2J.txt")
    )
    preds = read(out)
    assert set(preds[labels.PATIENT_ID]) == {"A\\rB", "C\\nD", ""}
    assert {raw_path(p) for p in preds[labels.PATH]} == {str(p) for p in studies.iterdir()}
    assert len(read(summary.breast_csv)) == 2 and len(read(summary.exam_csv)) == 1
    again = infer(studies, out, model[1], resume=True)
    assert (again.files, again.already_done, len(read(out))) == (0, 3, 3)


def test_a_file_name_that_is_not_utf8_is_written_escaped_and_resumed(model, tmp_path):
    studies = tmp_path / "in"
    studies.mkdir()
    name = os.fsencode(studies) + b"/\xff\xfe-scan.dcm"
    mammogram(Path(os.fsdecode(name)))
    (studies / "plain.dcm").write_bytes(Path(os.fsdecode(name)).read_bytes())
    out = tmp_path / "preds.csv"
    summary = infer(studies, out, model[1])
    out.read_bytes().decode("utf-8")  # the file stays UTF-8
    cell = path_cell(os.fsdecode(name))
    assert cell.endswith("/\\xff\\xfe-scan.dcm") and os.fsencode(raw_path(cell)) == name
    assert summary.ok == 2 and cell in set(read(out)[labels.PATH])
    again = infer(studies, out, model[1], resume=True)
    assert (again.files, again.already_done) == (0, 2)


def test_cells_escape_control_characters_and_guard_formulas():
    for value in ('=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(A1)", "'quoted", "plain", ""):
        cell = text_cell(value)
        assert not cell.startswith(("=", "+", "-", "@")) and raw_cell(cell) == value
    assert text_cell("\t=1+1") == "\\t=1+1" and text_cell("\r=1") == "\\r=1"
    assert escape_text("a\x00b\x7fc\u2028d\x85") == "a\\x00b\\x7fc\\u2028d\\u0085"
    for path in ("/d/a\\x41.dcm", "/d/\udcff\udc80\x85\r\\.dcm", "/d/=x.dcm", "-rel"):
        assert raw_path(path_cell(path)) == path
    assert len({path_cell(p) for p in ("/a\\xff", "/a\udcff", "/a\xff")}) == 3  # injective


def test_formulas_in_header_values_are_neutralised_in_every_csv(model, tmp_path):
    studies = tmp_path / "in"
    formula = '=HYPERLINK("http://evil","open")'
    mammogram(studies / "1.dcm", PatientID=formula, AccessionNumber="@SUM(1)", StudyInstanceUID="1.2.3")
    mammogram(studies / "2.dcm", PatientID=formula, AccessionNumber="@SUM(1)", StudyInstanceUID="1.2.3", seed=3)
    summary = infer(studies, tmp_path / "preds.csv", model[1])
    for path in (summary.out, summary.breast_csv, summary.exam_csv):
        table = read(path)
        assert set(table[labels.PATIENT_ID]) == {"'" + formula}, path
        assert set(table[labels.ACCESSION]) == {"'@SUM(1)"}, path
        assert {raw_cell(v) for v in table[labels.PATIENT_ID]} == {formula}


# --- two runs, one output ------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_is_refused(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    out = tmp_path / "preds.csv"
    with output_lock(out):
        with pytest.raises(InferError, match=r"another dens-infer run .* is writing"):
            infer(studies, out, model[1])
        (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
        with pytest.raises(InferError, match="another dens-infer run"):  # the same output, spelt otherwise
            infer(studies, tmp_path / "link" / "preds.csv", model[1], overwrite=True)
        result = cli(studies, "--out", out, "--model", model[1], "--resume")
        assert result.returncode == EXIT_FAILED and "another dens-infer run" in result.stderr
        assert "Traceback" not in result.stderr
    assert not out.exists()
    infer(studies, out, model[1])
    assert not lock_path(out).exists()  # released and removed


def test_outputs_inside_studies_are_not_read_back(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    infer(studies, studies / "preds.csv", model[1])
    again = infer(studies, studies / "preds.csv", model[1], overwrite=True)
    assert list(read(studies / "preds.csv")[labels.PATH]) == [str(studies / "1.dcm")] and again.files == 1


# --- plain images ----------------------------------------------------------------------------------------


def test_plain_images_are_read_only_when_asked(model, tmp_path):
    import cv2

    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    (studies / "gradcam").mkdir()  # a Grad-CAM folder inside the archive
    cv2.imwrite(str(studies / "gradcam" / "map.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(studies / "scan.PNG"), (synthetic_breast() >> 4).astype(np.uint8))
    summary = infer(studies, tmp_path / "preds.csv", model[1])
    preds = read(tmp_path / "preds.csv").set_index(labels.PATH)
    for name in ("gradcam/map.png", "scan.PNG"):
        row = preds.loc[str(studies / name)]
        assert (row[labels.STATUS], row[labels.REASON].split(":")[0]) == ("skipped", "plain_image_not_requested")
        assert row[labels.DENSITY] == ""
    assert summary.exit_code == EXIT_OK
    infer(studies, tmp_path / "asked.csv", model[1], plain_images=True)
    assert read(tmp_path / "asked.csv").set_index(labels.PATH).loc[str(studies / "scan.PNG"), labels.STATUS] == "ok"


# --- error rows and --resume ------------------------------------------------------------------------------


def test_resume_exits_3_while_error_rows_remain_and_retry_errors_does_them_again(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    (studies / "2.dcm").touch()  # empty: an error row
    out = tmp_path / "preds.csv"
    assert infer(studies, out, model[1]).exit_code == EXIT_ERRORS
    resumed = infer(studies, out, model[1], resume=True)
    assert (resumed.files, resumed.already_errors, resumed.exit_code) == (0, 1, EXIT_ERRORS)
    mammogram(studies / "2.dcm", seed=4)  # the file is fixed
    retried = infer(studies, out, model[1], retry_errors=True)
    assert (retried.files, retried.ok, retried.retried, retried.exit_code) == (1, 1, 1, EXIT_OK)
    preds = read(out)
    assert sorted(preds[labels.PATH]) == [str(studies / "1.dcm"), str(studies / "2.dcm")]
    assert (preds[labels.STATUS] == "ok").all()


def test_an_older_preds_csv_is_carried_over_on_resume(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    mammogram(studies / "2.dcm", seed=5)
    out = tmp_path / "preds.csv"
    infer(studies, out, model[1])
    older = read(out)[list(OLDER_COLUMNS)].iloc[:1]
    older.to_csv(out, index=False, lineterminator="\n")
    summary = infer(studies, out, model[1], resume=True)
    assert (summary.already_done, summary.files) == (1, 1)
    assert records(out)[0] == list(COLUMNS) and len(read(out)) == 2


# --- outputs that cannot be written --------------------------------------------------------------------


def test_an_unwritable_output_folder_is_a_message(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    if os.geteuid() == 0:  # root writes anywhere a mode allows nobody; sysfs refuses even root
        folder = Path("/sys")
        if not folder.is_dir():
            pytest.skip("no /sys here, and root ignores folder modes")
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
    result = cli(studies, "--out", folder / "preds.csv", "--model", model[1])
    assert result.returncode == EXIT_FAILED, result.stderr
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_a_full_disk_stops_the_run_with_whole_rows_and_resume_finishes_it(model, tmp_path):
    studies = tmp_path / "in"
    for i in range(4):
        mammogram(studies / f"{i}.dcm", seed=i)
    out = tmp_path / "preds.csv"
    reference = tmp_path / "reference.csv"
    infer(studies, reference, model[1])
    first_row = reference.read_bytes().index(b"\n") + 1
    row = len(reference.read_bytes().splitlines(keepends=True)[1])
    limit = first_row + row + row // 2  # room for the header and one and a half rows

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-c", "from dens.infer.cli import main; main()", studies, "--out", out]
    command += ["--model", model[1], "--batch-size", "1", "--workers", "1", "--no-progress"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert result.returncode == EXIT_FAILED, result.stderr
    assert "writing" in result.stderr and "--resume" in result.stderr and "Traceback" not in result.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and len(data) <= limit
    assert not read_existing(out).torn and len(read_existing(out).rows) == 1
    summary = infer(studies, out, model[1], resume=True)
    assert (summary.already_done, summary.files) == (1, 3)
    assert sorted(read(out)[labels.PATH]) == sorted(read(reference)[labels.PATH])


# --- bad input on the command line -------------------------------------------------------------------


def test_an_empty_studies_folder_is_a_message(model, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        infer_main, [str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv"), "--model", str(model[1])]
    )
    assert result.exit_code == EXIT_FAILED and "no files under" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_a_pytorch_checkpoint_as_model_names_dens_export(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    result = CliRunner().invoke(infer_main, [str(studies), "--out", str(tmp_path / "p.csv"), "--model", str(model[0])])
    assert result.exit_code == EXIT_FAILED
    assert "PyTorch checkpoint" in result.output and "dens-export --onnx" in result.output


@pytest.mark.parametrize(
    "options",
    [["--flag", "bogus"], ["--flag", "p_X>0.5"], ["--resume", "--overwrite"], ["--retry-errors", "--overwrite"]],
)
def test_bad_options_are_usage_errors(model, tmp_path, options):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    result = CliRunner().invoke(
        infer_main, [str(studies), "--out", str(tmp_path / "p.csv"), "--model", str(model[1]), *options]
    )
    assert result.exit_code == EXIT_USAGE, result.output
    assert not (tmp_path / "p.csv").exists()


def test_resume_through_a_symlinked_spelling_of_the_folder_redoes_nothing(model, tmp_path):
    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    mammogram(studies / "sub" / "2.dcm", seed=6)
    (tmp_path / "alias").symlink_to(studies, target_is_directory=True)
    out = tmp_path / "preds.csv"
    infer(studies, out, model[1])
    again = infer(tmp_path / "alias", out, model[1], resume=True)
    assert (again.files, again.already_done, len(read(out))) == (0, 2, 2)


def test_sigterm_stops_with_the_resume_hint(model, tmp_path):
    studies = tmp_path / "in"
    for i in range(30):
        mammogram(studies / f"{i:02d}.dcm", seed=i)
    out = tmp_path / "preds.csv"
    command = [sys.executable, "-c", "from dens.infer.cli import main; main()", studies, "--out", out]
    command += ["--model", model[1], "--batch-size", "1", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, stderr
    assert "terminated" in stderr and "--resume" in stderr and "Traceback" not in stderr
    written = len(read_existing(out).rows)
    assert 1 <= written < 30 and not read_existing(out).torn
    assert not lock_path(out).exists()


def test_verbose_log_lines_carry_no_control_characters(model, tmp_path):
    studies = tmp_path / "in"
    studies.mkdir()
    (studies / "evil\x1b[2J\rname.txt").write_text("not an image\n")
    result = cli(studies, "--out", tmp_path / "p.csv", "--model", model[1], "-v")
    assert result.returncode == EXIT_NOTHING_SCORED, result.stderr  # its one file is no image
    assert "evil\\x1b[2J\\rname.txt" in result.stderr and "\x1b" not in result.stderr and "\r" not in result.stderr


# --- Grad-CAM -------------------------------------------------------------------------------------------


def test_two_runs_sharing_a_gradcam_folder_keep_their_own_maps_quietly(model, tmp_path):
    """Two runs whose preds.csv share a folder and whose maps share one Grad-CAM folder: each keeps its own
    maps and its own review page (named after its preds.csv), with no warning on the terminal."""
    studies = tmp_path / "in"
    hostile = {"SOPInstanceUID": "../../etc/passwd", "StudyInstanceUID": "1.2.x-y"}  # pydicom warns on reading
    with warnings.catch_warnings():  # writing them warns too
        warnings.simplefilter("ignore")
        mammogram(studies / "1.dcm", **hostile)
    cams, maps = tmp_path / "cams", {}
    for run_name in ("a", "b"):
        out = tmp_path / "runs" / f"{run_name}.csv"
        result = cli(
            studies, "--out", out, "--model", model[1], "--checkpoint", model[0], "--flag", "p_A>=0", "--gradcam", cams
        )
        assert result.returncode == EXIT_OK, result.stderr
        assert "UserWarning" not in result.stderr and "pydicom" not in result.stderr, result.stderr
        maps[run_name] = (out.parent / read(out).loc[0, labels.GRADCAM]).resolve()
    assert maps["a"] != maps["b"] and maps["a"].parent == maps["b"].parent == cams.resolve()
    assert maps["a"].is_file() and maps["b"].is_file()
    pages = {run_name: tmp_path / "runs" / f"{run_name}.report.html" for run_name in ("a", "b")}
    assert all(page.is_file() for page in pages.values())
    assert pages["a"].read_text() != pages["b"].read_text()  # each page is its own run's


# --- the model's preprocessing, visible in every row ------------------------------------------------------


def test_every_row_records_the_preprocessing_of_the_model_that_made_it(model, tmp_path):
    import onnx

    studies = tmp_path / "in"
    mammogram(studies / "1.dcm")
    infer(studies, tmp_path / "preds.csv", model[1])
    row = read(tmp_path / "preds.csv").iloc[0]
    assert row["preprocess"] == preprocess_cell(PreprocessConfig(size=S))
    assert "crop=true" in row["preprocess"].split(";") and "orient=true" in row["preprocess"].split(";")

    edited = onnx.load(str(model[1]))  # the metadata edited: crop and orientation off
    prop = next(p for p in edited.metadata_props if p.key == "dens")
    meta = json.loads(prop.value)
    meta["preprocess"].update(crop=False, orient=False)
    prop.value = json.dumps(meta)
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    # An edited model is refused unless allowed (tests/test_model_signature.py); allowed, its rows say so.
    infer(studies, tmp_path / "edited.csv", tmp_path / "edited.onnx", allow_modified_model=True)
    changed = read(tmp_path / "edited.csv").iloc[0]
    assert "crop=false" in changed["preprocess"] and "orient=false" in changed["preprocess"]
    assert changed["model_sha256"] != row["model_sha256"]


# --- the writer --------------------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "preds.csv"
    with PredsWriter(path) as writer:
        writer.write([make_row("/d/1.dcm", status="skipped", reason="not_dicom: x", model_sha256="f")])
        before = path.read_bytes()
        limit = len(before) + 10
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
        try:
            with pytest.raises(OSError):
                writer.write(
                    [make_row("/d/2.dcm", status="skipped", reason="not_dicom: a longer reason", model_sha256="f")]
                )
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before and before.count(b"\n") == 2


# --- acquisition families --------------------------------------------------------------------------------


def test_rows_say_which_family_line_mapped_them_and_the_summary_warns_of_unseen_ones(tmp_path):
    """A model fitted on one maker's images: its images take their family's line, another maker's the pooled
    line, and preds.csv and the summary say so."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.route import families

    studies = tmp_path / "in"
    seen = mammogram(studies / "seen.dcm", Manufacturer="Maker A", WindowCenter=2048, WindowWidth=4096)
    mammogram(studies / "unseen.dcm", seed=1, Manufacturer="Maker B", WindowCenter=2048, WindowWidth=4096)
    key = preprocess.load(seen, PreprocessConfig(size=S))[1].family
    fitted = PreprocessConfig(size=S, families=((key, 0.3, 0.8), (families.POOLED, 0.2, 0.9)))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", build_model("resnet18"), fitted)
    summary = infer(studies, tmp_path / "preds.csv", export_onnx(tmp_path / "best.pt", tmp_path / "model.onnx"))
    rows = read(tmp_path / "preds.csv").set_index(labels.PATH)
    assert rows.loc[str(seen), "harmonisation"] == "family" and rows.loc[str(seen), "family"] == key
    unseen = rows.loc[str(studies / "unseen.dcm")]
    assert unseen["harmonisation"] == "fallback" and unseen["family"].startswith("Maker B/")
    assert unseen["preprocess"].endswith("families=2")  # the lines themselves are in the model's metadata
    assert summary.unseen_families == 1 and summary.warnings()[0].startswith(
        "1 of 2 images are of acquisition families"
    )


def test_the_summary_names_the_exit_status_the_run_ends_with(tmp_path, capsys):
    """Every file an error: the run exits 4 (nothing scored), and its message about the errors says 4, not 3."""
    from dens.infer.summary import Summary

    out = tmp_path / "p.csv"
    summary = Summary(out=out, breast_csv=out, exam_csv=out)
    summary.count("error", reason="unreadable: x")
    summary.print()
    assert summary.exit_code == EXIT_NOTHING_SCORED
    assert f"(exit status {EXIT_NOTHING_SCORED})" in capsys.readouterr().err
