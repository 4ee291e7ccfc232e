"""Synthetic screening cohort: real DICOM files plus an RSNA-style ``train.csv``, so every stage runs with no data.

Each patient has one screening exam (about 15% have a second, a year or two later) of four views, L/R x
CC/MLO, written as ``OUT/<patient_id>/<study_uid>/<sop_uid>.dcm``. An image shows a breast against the
chest wall, a skin line, a nipple, the pectoral muscle on MLO and fibroglandular tissue whose amount and
texture follow the density class; neighbouring classes overlap, as they do between human readers.
Headers and encodings mix what real archives mix (transfer syntaxes, MONOCHROME1/2, 12/14/16 bits stored,
missing orientation or laterality tags) so that readers meet the variety, not one format.

Every random draw comes from a generator seeded by (seed, patient, image), never from the clock: the same
seed gives the same bytes whatever the worker count.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import cv2
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from tqdm import tqdm

import dens
from dens import labels, phantom, show_progress
from dens.dicom import MAMMO_FOR_PRESENTATION
from dens.labels import CLASSES

SIZES = ("small", "full")
MAX_SEED = 2**32 - 1  # the seed is part of every UID, which may not exceed 64 characters
# RSNA screening prior, in CLASSES order.
DENSITY_PRIOR = (0.10, 0.42, 0.40, 0.08)
# Fibroglandular share of the breast per class: means far enough apart to learn, spread wide enough that
# neighbouring classes overlap.
_FRACTION_MEAN = (0.12, 0.28, 0.48, 0.70)
_FRACTION_SD = 0.08
_SYNTAXES = (JPEG2000Lossless, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless)
_SYNTAX_SHARE = (0.6, 0.2, 0.1, 0.1)
_ORIENTATION = {("L", "CC"): ["A", "R"], ("L", "MLO"): ["A", "F"], ("R", "CC"): ["P", "L"], ("R", "MLO"): ["P", "F"]}
_VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
COLUMNS = (
    "site_id", labels.PATIENT_ID, labels.IMAGE_ID, labels.LATERALITY, labels.VIEW, "age", "cancer", "biopsy",
    "invasive", "BIRADS", "implant", labels.DENSITY, "machine_id", "difficult_negative_case",
    labels.STUDY_UID, labels.PATH,
)  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """A fake acquisition unit: one per patient, it fixes the image size and bits stored."""

    machine_id: int
    site_id: int
    manufacturer: str
    model: str
    full: tuple[int, int]  # rows, cols of real vendors' detectors
    small: tuple[int, int]
    bits: int
    share: float


MACHINES = (
    Machine(49, 1, "Northwind Medical", "Lumen 24", (3328, 2560), (832, 640), 12, 0.30),
    Machine(29, 1, "Kestrel Imaging", "KX-3000", (4096, 3328), (1024, 832), 14, 0.25),
    Machine(93, 2, "Halcyon Systems", "Mira DR", (2294, 1914), (574, 478), 12, 0.20),
    Machine(216, 2, "Orbis Radiology", "Tomo 5", (2294, 1914), (574, 478), 16, 0.15),
    Machine(170, 2, "Orbis Radiology", "Tomo 6", (5355, 4915), (1339, 1229), 16, 0.10),
)


@dataclass(frozen=True)
class ImageSpec:
    """Everything one worker needs to write one file, drawn up front so that workers share no state."""

    key: tuple[int, int, int]  # (seed, patient index, image index): seeds this image's generators
    path: str  # relative to OUT
    patient_id: str
    accession: str
    study_uid: str
    series_uid: str
    sop_uid: str
    laterality: str
    view: str
    density: str
    fraction: float  # fibroglandular share of the breast
    size: float  # breast extent relative to the detector
    age: int
    study_date: str
    machine: Machine
    rows: int
    cols: int
    syntax: str
    photometric: str
    orientation_tag: bool
    laterality_tag: bool


def _rng(*entropy: int) -> np.random.Generator:
    # A fixed-length key: numpy's SeedSequence pads short keys with zeros, so [s, p] would equal [s, p, 0].
    return np.random.default_rng(list(entropy) + [0] * (4 - len(entropy)))


def _plan_patient(seed: int, index: int, size: str) -> list[tuple[ImageSpec, dict]]:
    """The images of one patient with their train.csv rows; ids and UIDs derive from (seed, index)."""
    rng = _rng(seed, index, 0)
    machine = MACHINES[rng.choice(len(MACHINES), p=[m.share for m in MACHINES])]
    rows, cols = machine.full if size == "full" else machine.small
    patient_id = str(10000 + index)
    age = int(np.clip(rng.normal(58, 10), 35, 89))
    density = int(rng.choice(len(CLASSES), p=DENSITY_PRIOR))
    implant = int(rng.random() < 0.02)
    day = np.datetime64("2014-01-01") + int(rng.integers(0, 5 * 365))
    planned = []
    for exam in range(2 if rng.random() < 0.15 else 1):
        if exam:  # density seldom changes between screening rounds, and by one class at most
            gap = int(rng.integers(365, 800))
            day, age = day + gap, age + gap // 365
            if rng.random() < 0.15:
                density = int(np.clip(density + rng.choice((-1, 1)), 0, len(CLASSES) - 1))
        study_uid = f"{PYDICOM_ROOT_UID}{seed}.{index}.{exam + 1}"
        photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
        exam_fraction = rng.normal(_FRACTION_MEAN[density], _FRACTION_SD)
        for side, laterality in enumerate("LR"):
            fraction = float(np.clip(exam_fraction + rng.normal(0, 0.02), 0.03, 0.95))
            breast_size = float(rng.uniform(0.6, 0.95))
            cancer = int(rng.random() < 0.02)
            biopsy = int(cancer or rng.random() < 0.03)
            birads = 0 if cancer else rng.choice([1, 0, 2, np.nan], p=[0.55, 0.12, 0.08, 0.25])
            for v, view in enumerate(("CC", "MLO")):
                k = exam * 4 + side * 2 + v
                image_id = index * 10 + k
                series_uid = f"{study_uid}.{side * 2 + v + 1}"
                sop_uid = f"{series_uid}.{image_id}"
                spec = ImageSpec(
                    key=(seed, index, k),
                    path=f"{patient_id}/{study_uid}/{sop_uid}.dcm",
                    patient_id=patient_id,
                    accession=f"{seed % 1000:03d}{index + 1:07d}{exam + 1}",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=sop_uid,
                    laterality=laterality,
                    view=view,
                    density=CLASSES[density],
                    fraction=fraction,
                    size=breast_size,
                    age=age,
                    study_date=str(day).replace("-", ""),
                    machine=machine,
                    rows=rows,
                    cols=cols,
                    syntax=str(_SYNTAXES[rng.choice(len(_SYNTAXES), p=_SYNTAX_SHARE)]),
                    photometric=photometric,
                    orientation_tag=bool(rng.random() >= 0.3),
                    laterality_tag=bool(rng.random() >= 0.1),
                )
                row = dict(zip(COLUMNS, (
                    machine.site_id, int(patient_id), image_id, laterality, view, age, cancer, biopsy,
                    int(cancer and rng.random() < 0.6), birads, implant, CLASSES[density], machine.machine_id,
                    bool(biopsy and not cancer), study_uid, spec.path,
                ), strict=True))  # fmt: skip
                planned.append((spec, row))
    return planned


# --- pixels ------------------------------------------------------------------------------------------


def _pixels(spec: ImageSpec) -> tuple[np.ndarray, tuple[float, float]]:
    """Stored values at full size (uint16 within BitsStored) and a sensible (center, width) window."""
    seed, index, k = spec.key
    rng = _rng(seed, index, 1, k)
    drawn = phantom.render(rng, spec)
    if rng.random() < 0.6:
        phantom.add_marker(rng, drawn.image, drawn.breast)
    unit = drawn.image if spec.laterality == "L" else drawn.image[:, ::-1]  # right breast: chest wall right
    unit = cv2.resize(np.ascontiguousarray(unit), (spec.cols, spec.rows), interpolation=cv2.INTER_CUBIC)
    maxval = (1 << spec.machine.bits) - 1
    floor, span = rng.uniform(0.005, 0.03), rng.uniform(0.55, 0.9)
    value = floor + span * np.clip(unit, 0.0, 1.0)
    # Quantum noise: its spread grows with the square root of the signal.
    value += rng.uniform(0.003, 0.008) * np.sqrt(value) * rng.standard_normal(value.shape, dtype=np.float32)
    stored = np.clip(np.rint(value * maxval), 0, maxval).astype(np.uint16)
    lo, hi = np.percentile(drawn.image[drawn.breast], [1.0, 99.5])
    center = (floor + span * (lo + hi) / 2) * maxval * rng.uniform(0.97, 1.03)
    width = span * (hi - lo) * maxval * rng.uniform(1.0, 1.3)
    if spec.photometric == "MONOCHROME1":
        stored, center = maxval - stored, maxval - center
    return stored, (center, width)


# --- files -------------------------------------------------------------------------------------------


def _dataset(spec: ImageSpec, window: tuple[float, float], rng: np.random.Generator) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = spec.sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MAMMO_FOR_PRESENTATION, spec.sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = spec.study_uid, spec.series_uid
    ds.PatientID, ds.PatientName, ds.PatientSex = spec.patient_id, f"SYNTH^{spec.patient_id}", "F"
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.AccessionNumber, ds.StudyID = spec.accession, spec.accession[-8:]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.SeriesNumber, ds.InstanceNumber = int(spec.series_uid.rsplit(".", 1)[1]), 1
    ds.Modality, ds.BodyPartExamined = "MG", "BREAST"
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.Manufacturer, ds.ManufacturerModelName = spec.machine.manufacturer, spec.machine.model
    ds.ViewPosition = spec.view
    if rng.random() < 0.7:
        item = Dataset()
        item.CodeValue, item.CodeMeaning = _VIEW_CODES[spec.view]
        item.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = [item]
    if spec.laterality_tag:
        ds.ImageLaterality = ds.Laterality = spec.laterality
    if spec.orientation_tag:
        ds.PatientOrientation = _ORIENTATION[spec.laterality, spec.view]
    ds.Rows, ds.Columns, ds.SamplesPerPixel = spec.rows, spec.cols, 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, spec.machine.bits, spec.machine.bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    center, width = round(window[0]), max(2, round(window[1]))
    # Some vendors list alternative windows after the default one; readers must take the first.
    multi = rng.random() < 0.25
    ds.WindowCenter = [center, round(center * 0.97)] if multi else center
    ds.WindowWidth = [width, round(width * 0.8)] if multi else width
    ds.VOILUTFunction = "SIGMOID" if rng.random() < 0.15 else "LINEAR"
    return ds


def _write(job: tuple[str, ImageSpec]) -> None:
    """Render, encode and save one image (runs in a worker process)."""
    out, spec = job
    stored, window = _pixels(spec)
    seed, index, k = spec.key
    ds = _dataset(spec, window, _rng(seed, index, 2, k))
    if spec.syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
    else:
        plugin = "pylibjpeg" if spec.syntax == RLELossless else ""  # pydicom's own RLE encoder is slow
        ds.compress(spec.syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)
    path = Path(out) / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; threads would only fight over the cores


def _prepare(out: Path, patients: int, size: str, seed: int, workers: int | None, overwrite: bool) -> None:
    if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or patients < 1:
        raise ValueError(f"patients must be a whole number >= 1, got {patients!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number in 0..{MAX_SEED}, got {seed!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the cohort")
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose an empty folder or pass --overwrite")
    if entries:
        # Only ever delete what looks like an earlier cohort: train.csv and patient folders.
        foreign = [e.name for e in entries if not (e.name == "train.csv" or (e.is_dir() and e.name.isdigit()))]
        if foreign:
            raise FileExistsError(f"{out} holds files dens-synth did not write ({', '.join(foreign[:3])}); "
                                  "choose an empty folder")  # fmt: skip
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def generate(
    out_dir: str | Path,
    patients: int,
    size: str = "small",
    seed: int = 0,
    workers: int | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Write a synthetic screening cohort under ``out_dir`` and return its ``train.csv`` rows.

    ``size`` is ``"small"`` (detector sizes / 4) or ``"full"``; ``workers`` defaults to all CPUs and does
    not change the output. ``overwrite`` replaces an earlier cohort in ``out_dir`` (and nothing else).
    ``train.csv`` is written last, so its presence means the cohort is complete. Workers are started by
    a fork server, so a script that calls this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    out = Path(out_dir)
    _prepare(out, patients, size, seed, workers, overwrite)
    patients, seed = int(patients), int(seed)
    planned = [item for index in range(patients) for item in _plan_patient(seed, index, size)]
    jobs = [(str(out), spec) for spec, _ in planned]
    workers = min(workers or dens.usable_cores(), len(jobs))
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(jobs), unit="img", desc="dens-synth", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                _write(job)
                bar.update()
        else:
            # Not fork: a parent that already ran OpenCV (a test, a notebook) leaves its thread pool
            # locked in forked children. A fork server starts clean and imports this module once.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with context.Pool(workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_write, jobs):
                    bar.update()
    table = pd.DataFrame([row for _, row in planned], columns=list(COLUMNS))
    table.to_csv(out / "train.csv", index=False)
    return table


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--patients", type=click.IntRange(min=1), required=True, help="Number of patients.")
@click.option("--size", type=click.Choice(SIZES), default="small", show_default=True,
              help="full: real detector sizes; small: about 4x smaller on each side.")  # fmt: skip
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all CPUs].")
@click.option("--overwrite", is_flag=True, help="Replace an earlier cohort in OUT.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(out: Path, patients: int, size: str, seed: int, workers: int | None, overwrite: bool,
         progress: bool | None) -> None:  # fmt: skip
    """Write a synthetic screening cohort (DICOM files + train.csv) to OUT."""
    start = time.perf_counter()
    try:
        table = generate(out, patients, size=size, seed=seed, workers=workers, overwrite=overwrite,
                         progress=show_progress(progress))  # fmt: skip
    except (ValueError, FileExistsError) as exc:
        raise click.UsageError(str(exc)) from exc
    elapsed = time.perf_counter() - start
    click.echo(
        f"dens-synth: {len(table)} files, {patients} patients in {elapsed:.1f} s "
        f"({len(table) / elapsed:.1f} img/s); labels in {out / 'train.csv'}"
    )
