"""Shared fixtures: the real-mammogram folder, a DICOM writer, a synthetic breast and synthetic cohorts."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

# The Ray engine's fixtures (tests/ray_cases.py), shared by its two test modules.
pytest_plugins = ["ray_cases"]

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
# The real mammograms are never in the repository (their terms forbid redistribution): DENS_REAL_MAMMO names
# a folder of them. The default is where CI keeps them, beside the checkout.
REAL_MAMMO_ENV = "DENS_REAL_MAMMO"
REAL_MAMMO = Path(os.environ.get(REAL_MAMMO_ENV) or Path(__file__).resolve().parents[2] / "shared/data/real-mammo")


# The real files the tests read, by their path in that folder: every JPEG 2000 one, then the JPEG Extended copy.
REAL_J2K = [
    "rsna-kaggle-train/462822612.dcm",
    "rsna-kaggle-train/1874946579.dcm",
    "rsna-kaggle-train/1864590858.dcm",
    "rsna-kaggle-test/1591370361.dcm",
    "rsna-kaggle-test/361203119.dcm",
    "rsna-kaggle-test/68070693.dcm",
    "rsna-kaggle-test/736471439.dcm",
    "wg04-nema-MG1/MG1_J2KI",
]
REAL_FILES = [*REAL_J2K, "wg04-nema-MG1/MG1_JPLY"]


@pytest.fixture(scope="session")
def real_mammo() -> Path:
    """The real DICOM samples, kept outside the repository (their terms forbid redistribution)."""
    if not REAL_MAMMO.is_dir():
        pytest.skip(f"no real mammograms at {REAL_MAMMO}: set {REAL_MAMMO_ENV} to a folder of them")
    return REAL_MAMMO


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    syntax: str = ExplicitVRLittleEndian,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    sop_class: str = MAMMO_FOR_PRESENTATION,
    modality: str = "MG",
    frame: bytes | None = None,
    **tags,
) -> Path:
    """Write a grayscale DICOM file holding ``pixels`` (uint8/uint16/int16 [rows, cols]) as stored values.

    ``syntax`` picks the transfer syntax: uncompressed ones are written as they are (values above
    BitsStored survive, on purpose), compressed ones through ``Dataset.compress``, or from ``frame``, an
    already encoded frame, when given. ``pixels=None`` writes no image at all (an SR, say); a 3-D array
    writes a multi-frame file. ``tags`` are DICOM keywords set last, so they override the defaults.
    """
    syntax = UID(syntax)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.AccessionNumber = "P0001", "A0001"
    ds.Modality = modality
    if pixels is not None:
        pixels = np.ascontiguousarray(pixels)
        allocated = pixels.dtype.itemsize * 8
        ds.PresentationIntentType = "FOR PRESENTATION"
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = allocated
        ds.BitsStored = bits_stored or allocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        if frame is not None:
            ds.PixelData = encapsulate([frame])
        elif syntax.is_compressed:
            ds.compress(syntax, pixels, generate_instance_uid=False)
        else:
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def make_dicom(tmp_path) -> Callable[..., Path]:
    """``make_dicom(pixels, name=None, **write_dicom_kwargs) -> Path`` in this test's tmp_path."""
    counter = itertools.count()

    def make(pixels: np.ndarray, *, name: str | None = None, **kwargs) -> Path:
        return write_dicom(tmp_path / (name or f"image{next(counter)}.dcm"), pixels, **kwargs)

    return make


def synthetic_breast(rows: int = 300, cols: int = 240, *, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A left breast as stored values (uint16, MONOCHROME2): dark noisy background, a bright textured
    half-disc leaning on the left edge, vertically centred, clear of the top and bottom edges."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    radius = 0.42 * rows
    dist = np.hypot(yy - rows / 2, xx) / radius
    inside = dist < 1.0
    # Fibroglandular texture: blurred noise of a few scales, on tissue brighter towards the chest wall.
    texture = sum(
        cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), s) * s for s in (2, 5, 11)
    )
    texture = (texture - texture.mean()) / (texture.std() + 1e-6)
    tissue = top * (0.55 + 0.25 * (1.0 - dist) + 0.08 * texture)
    background = top * 0.03 + rng.normal(0.0, top * 0.005, (rows, cols))
    image = np.where(inside, tissue, background)
    return np.clip(np.rint(image), 0, top).astype(np.uint16)


@pytest.fixture(scope="session")
def breast() -> Callable[..., np.ndarray]:
    """``breast(rows=300, cols=240, bits=12, seed=0)``: see :func:`synthetic_breast`."""
    return synthetic_breast


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory) -> Callable[..., Path]:
    """``synthetic_cohort(patients=3, seed=5) -> Path``: a small dens-synth cohort, made once per session and
    shared by every test that asks for the same one (a cohort takes seconds to make; a copy, milliseconds).
    Treat it as read-only: a test that adds files copies it first (``shutil.copytree``)."""
    from dens import synth

    made: dict[tuple[int, int], Path] = {}

    def get(patients: int = 3, seed: int = 5) -> Path:
        if (patients, seed) not in made:
            out = tmp_path_factory.mktemp(f"cohort-{patients}p-seed{seed}") / "cohort"
            synth.generate(out, patients, size="small", seed=seed, workers=2, progress=False)
            made[patients, seed] = out
        return made[patients, seed]

    return get


CODEC_FAULTS = Path(__file__).resolve().parent / "codec_faults"


@pytest.fixture
def codec_fault(monkeypatch) -> Callable[[str, str], None]:
    """``codec_fault("crash" | "hang", base_name)``: decode workers started afterwards SIGSEGV on, or hang on,
    files of that base name, as a codec would on a hostile file (``tests/codec_faults/sitecustomize.py``,
    which the spawned workers load at start-up through ``PYTHONPATH``)."""

    def arm(kind: str, name: str) -> None:
        if kind not in ("crash", "hang"):
            raise ValueError(f"kind must be crash or hang, got {kind!r}")
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(CODEC_FAULTS), os.environ.get("PYTHONPATH", "")]))
        )
        monkeypatch.setenv(f"DENS_TEST_{kind.upper()}_ON", name)

    return arm


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory) -> Path:
    """A random resnet18 at S=64, exported: calls that mean nothing, through the real pipeline (the SR and
    dens-serve tests)."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.route.config import PreprocessConfig

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_checkpoint(root / "best.pt", build_model("resnet18"), PreprocessConfig(size=64))
    return export_onnx(root / "best.pt", root / "model.onnx")
