"""One synthetic image as a DICOM file: the phantom on a detector (stored values, a window) and its header.

Headers and encodings mix what real archives mix (transfer syntaxes, MONOCHROME1/2, 12/14/16 bits stored,
single and multiple windows, LINEAR and SIGMOID VOI, view codes or not) so that readers meet the variety,
not one format. Every draw comes from generators keyed by the image's (seed, patient, image), so a file's
bytes do not depend on which worker writes it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dens.route.dicom import MAMMO_FOR_PRESENTATION
from dens.synth.phantom import add_marker, render
from dens.synth.spec import ImageSpec, generator

_ORIENTATION = {("L", "CC"): ["A", "R"], ("L", "MLO"): ["A", "F"], ("R", "CC"): ["P", "L"], ("R", "MLO"): ["P", "F"]}
_VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}


def stored_pixels(spec: ImageSpec) -> tuple[np.ndarray, tuple[float, float]]:
    """Stored values at full size (uint16 within BitsStored) and a sensible (center, width) window."""
    seed, index, k = spec.key
    rng = generator(seed, index, 1, k)
    drawn = render(rng, spec)
    if rng.random() < 0.6:
        add_marker(rng, drawn.image, drawn.breast)
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


def write_image(out: str | Path, spec: ImageSpec) -> None:
    """Render, encode and save one image as ``out / spec.path`` (runs in a worker process)."""
    stored, window = stored_pixels(spec)
    seed, index, k = spec.key
    ds = _dataset(spec, window, generator(seed, index, 2, k))
    if spec.syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
    else:
        plugin = "pylibjpeg" if spec.syntax == RLELossless else ""  # pydicom's own RLE encoder is slow
        ds.compress(spec.syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)
    path = Path(out) / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
