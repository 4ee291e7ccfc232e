"""What one synthetic image is: the acquisition unit that takes it and every draw that fixes its file.

The cohort plan (:mod:`dens.synth.cohort`) fills these in; the phantom (:mod:`dens.synth.phantom`) and the
file writer (:mod:`dens.synth.image`) read them. Keeping them here lets both sides share them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def generator(*entropy: int) -> np.random.Generator:
    """The random generator for one stream of draws, keyed by up to four integers (seed, patient, ...)."""
    # A fixed-length key: numpy's SeedSequence pads short keys with zeros, so [s, p] would equal [s, p, 0].
    return np.random.default_rng(list(entropy) + [0] * (4 - len(entropy)))
