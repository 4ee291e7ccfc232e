"""Who is in the synthetic cohort and which images each patient has: the plan drawn before any pixel.

Each patient has one screening exam (about 15% have a second, a year or two later) of four views, L/R x
CC/MLO, written as ``OUT/<patient_id>/<study_uid>/<sop_uid>.dcm``. The plan fixes every header choice
(ids and UIDs, machine, transfer syntax, MONOCHROME1/2, missing orientation or laterality tags) and the
``train.csv`` row of each image, so that workers only render and encode.
"""

from __future__ import annotations

import numpy as np
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from dens import labels
from dens.labels import CLASSES
from dens.synth.spec import MACHINES, ImageSpec, generator

# RSNA screening prior, in CLASSES order.
DENSITY_PRIOR = (0.10, 0.42, 0.40, 0.08)
# Fibroglandular share of the breast per class: means far enough apart to learn, spread wide enough that
# neighbouring classes overlap.
_FRACTION_MEAN = (0.12, 0.28, 0.48, 0.70)
_FRACTION_SD = 0.08
_SYNTAXES = (JPEG2000Lossless, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless)
_SYNTAX_SHARE = (0.6, 0.2, 0.1, 0.1)
COLUMNS = (
    "site_id",
    labels.PATIENT_ID,
    labels.IMAGE_ID,
    labels.LATERALITY,
    labels.VIEW,
    "age",
    "cancer",
    "biopsy",
    "invasive",
    "BIRADS",
    "implant",
    labels.DENSITY,
    "machine_id",
    "difficult_negative_case",
    labels.STUDY_UID,
    labels.PATH,
)


def plan_patient(seed: int, index: int, size: str) -> list[tuple[ImageSpec, dict]]:
    """The images of one patient with their train.csv rows; ids and UIDs derive from (seed, index).

    ``size`` is ``"full"`` (the machine's detector) or ``"small"``.
    """
    rng = generator(seed, index, 0)
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
                row = dict(
                    zip(
                        COLUMNS,
                        (
                            machine.site_id,
                            int(patient_id),
                            image_id,
                            laterality,
                            view,
                            age,
                            cancer,
                            biopsy,
                            int(cancer and rng.random() < 0.6),
                            birads,
                            implant,
                            CLASSES[density],
                            machine.machine_id,
                            bool(biopsy and not cancer),
                            study_uid,
                            spec.path,
                        ),
                        strict=True,
                    )
                )
                planned.append((spec, row))
    return planned
