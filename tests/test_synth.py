"""dens-synth: a deterministic, readable and varied synthetic cohort whose pixels carry the density class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from dens import labels, synth
from dens.synth import phantom
from dens.synth.cli import main
from dens.synth.cohort import plan_patient
from dens.synth.image import stored_pixels

VIEWS = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
# RSNA convention: a left breast points right (row direction anterior), a right breast is its mirror.
ORIENTATION = {("L", "CC"): ["A", "R"], ("L", "MLO"): ["A", "F"], ("R", "CC"): ["P", "L"], ("R", "MLO"): ["P", "F"]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame, list[pydicom.Dataset]]:
    """20 patients, each file read once (pydicom caches the decoded pixels on the dataset)."""
    out = tmp_path_factory.mktemp("cohort")
    table = synth.generate(out, 20, seed=3, workers=2, progress=False)
    return out, table, [pydicom.dcmread(out / p) for p in table[labels.PATH]]


def test_same_seed_gives_same_bytes_whatever_the_worker_count(tmp_path):
    one = synth.generate(tmp_path / "one", 3, seed=7, workers=1, progress=False)
    synth.generate(tmp_path / "two", 3, seed=7, workers=2, progress=False)
    other = synth.generate(tmp_path / "other", 3, seed=8, workers=1, progress=False)
    assert (tmp_path / "one/train.csv").read_bytes() == (tmp_path / "two/train.csv").read_bytes()
    for path in one[labels.PATH]:
        assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "two" / path).read_bytes(), path
    assert not one.equals(other)
    first = [
        pydicom.dcmread(tmp_path / name / t[labels.PATH].iloc[0]).pixel_array
        for name, t in (("one", one), ("other", other))
    ]
    assert first[0].shape != first[1].shape or not np.array_equal(first[0], first[1])


def test_files_match_the_csv_and_decode_back_exactly(cohort):
    out, table, headers = cohort
    assert list(table.columns) == list(synth.COLUMNS)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm")) == sorted(table[labels.PATH])
    assert table[labels.IMAGE_ID].is_unique
    assert set(table[labels.DENSITY]) <= set(labels.CLASSES)
    checked = set()
    for (_, row), ds in zip(table.iterrows(), headers, strict=True):
        assert row[labels.PATH] == f"{ds.PatientID}/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert str(row[labels.PATIENT_ID]) == ds.PatientID and ds.ViewPosition == row[labels.VIEW]
        assert all(UID(u).is_valid for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.SOPClassUID, ds.Modality, ds.PresentationIntentType) == (
            "1.2.840.10008.5.1.4.1.1.1.2",
            "MG",
            "FOR PRESENTATION",
        )
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.uint16
        assert int(pixels.max()) <= (1 << ds.BitsStored) - 1
        if "ImageLaterality" in ds:
            assert ds.ImageLaterality == ds.Laterality == row[labels.LATERALITY]
        else:
            assert "Laterality" not in ds
        if "PatientOrientation" in ds:
            assert list(ds.PatientOrientation) == ORIENTATION[row[labels.LATERALITY], row[labels.VIEW]]
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax not in checked:  # lossless: the decoded file is exactly what was generated
            spec = next(
                s
                for s, r in plan_patient(3, int(ds.PatientID) - 10000, "small")
                if r[labels.IMAGE_ID] == row[labels.IMAGE_ID]
            )
            assert np.array_equal(pixels, stored_pixels(spec)[0])
            checked.add(syntax)
    exams = table.assign(study=table[labels.PATH].str.split("/").str[1]).groupby("study")
    for _, exam in exams:
        assert sorted(zip(exam[labels.LATERALITY], exam[labels.VIEW], strict=True)) == VIEWS
        assert exam[labels.DENSITY].nunique() == 1
    assert (table.groupby(labels.PATIENT_ID).size() == 8).any()  # some patients come back for a second exam


def test_cohort_mixes_what_archives_mix(cohort):
    headers = cohort[2]
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in headers}
    assert syntaxes == {JPEG2000Lossless, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless}
    assert {ds.PhotometricInterpretation for ds in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {ds.BitsStored for ds in headers} == {12, 14, 16}
    assert {ds.VOILUTFunction for ds in headers} == {"LINEAR", "SIGMOID"}
    assert any(ds["WindowCenter"].VM > 1 for ds in headers)
    assert any("PatientOrientation" not in ds for ds in headers)
    assert any("ImageLaterality" not in ds for ds in headers)


def test_chest_wall_is_on_the_side_of_the_laterality(cohort):
    _, table, headers = cohort
    seen = set()
    for (_, row), ds in zip(table.iterrows(), headers, strict=True):
        pixels = ds.pixel_array.astype(np.float64)
        maxval = (1 << ds.BitsStored) - 1
        far_edge = pixels[:, -1] if row[labels.LATERALITY] == "L" else pixels[:, 0]
        if ds.PhotometricInterpretation == "MONOCHROME1":  # background bright
            assert np.median(far_edge) > 0.8 * maxval
            continue
        assert np.median(far_edge) < 0.1 * maxval
        half = pixels.shape[1] // 2
        left, right = pixels[:, :half].sum(), pixels[:, -half:].sum()
        assert (left > 1.5 * right) if row[labels.LATERALITY] == "L" else (right > 1.5 * left), row[labels.PATH]
        seen.add(row[labels.LATERALITY])
    assert seen == {"L", "R"}


def test_tissue_grows_with_density_but_mean_brightness_does_not_give_the_class_away():
    fraction: dict[str, list[float]] = {c: [] for c in labels.CLASSES}
    brightness: dict[str, list[float]] = {c: [] for c in labels.CLASSES}
    for index in range(400):
        spec = plan_patient(0, index, "small")[0][0]
        if len(fraction[spec.density]) >= 25:
            continue
        drawn = phantom.render(np.random.default_rng(index), spec, rows=96)
        fraction[spec.density].append(drawn.gland.sum() / drawn.region.sum())
        brightness[spec.density].append(float(drawn.image[drawn.breast].mean()))
    assert all(len(v) >= 15 for v in fraction.values())
    means = [np.mean(fraction[c]) for c in labels.CLASSES]
    assert means == sorted(means) and means[0] < 0.2 and means[-1] > 0.6
    for low, high in zip(labels.CLASSES, labels.CLASSES[1:], strict=False):
        # Neighbouring classes overlap, in tissue share and in mean brightness inside the breast.
        assert max(fraction[low]) > min(fraction[high]), (low, high)
        assert max(brightness[low]) > min(brightness[high]), (low, high)


def test_bad_options_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        synth.generate(tmp_path / "a", 0)
    with pytest.raises(ValueError, match="size"):
        synth.generate(tmp_path / "a", 1, size="huge")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        synth.generate(tmp_path / "busy", 1)
    with pytest.raises(FileExistsError, match="did not write"):
        synth.generate(tmp_path / "busy", 1, overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").exists()


def test_cli_writes_a_cohort_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "cohort"
    run = CliRunner().invoke(main, [str(out), "--patients", "2", "--workers", "1"])
    assert run.exit_code == 0, run.output
    assert "2 patients" in run.output and str(out / "train.csv") in run.output
    again = CliRunner().invoke(main, [str(out), "--patients", "1", "--workers", "1"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    replaced = CliRunner().invoke(main, [str(out), "--patients", "1", "--seed", "5", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    table = pd.read_csv(out / "train.csv")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm")) == sorted(table[labels.PATH])


def test_progress_bars_only_on_a_terminal_unless_asked(tmp_path):
    # A batch job's log (stderr not a terminal) gets the summary line, not a bar redrawn with carriage returns.
    quiet = CliRunner().invoke(main, [str(tmp_path / "a"), "--patients", "1", "--workers", "1"])
    shown = CliRunner().invoke(main, [str(tmp_path / "b"), "--patients", "1", "--workers", "1", "--progress"])
    assert quiet.exit_code == shown.exit_code == 0
    assert "img/s]" not in quiet.output and "dens-synth: 4 files" in quiet.output
    assert "img/s]" in shown.output
