"""A density report per exam as DICOM: a TID 1500 measurement report in a Comprehensive 3D SR (highdicom).

What one SR holds (one per exam, the exam as :mod:`dens.exams` defines it):

* per breast imaged, a measurement group whose finding site is the breast (SCT 76752008) with its laterality,
  the BI-RADS breast composition as a coded value (SCT 129715009 "Breast composition"; CID 6001: A 129716005,
  B 129717001, C 129718006, D 129719003), ``p_dense`` (P(C) + P(D)) as a numeric value, and the source images
  the call used;
* per exam, one more group (finding site: both breasts) with the exam's call (the denser breast's);
* the model as the observer device (its name, version and sha256) and as Contributing Equipment (IHE AI
  Results), the algorithm's name and version in every group, VerificationFlag UNVERIFIED;
* patient and study identity copied from the source images, every source image in the evidence and the image
  library.

Only a screening-complete exam (an ``ok`` image of each of L-CC, L-MLO, R-CC, R-MLO) gets a call. An incomplete
exam still gets its SR, so that the sender learns it was seen, but that SR carries no breast composition and
no ``p_dense``: each breast imaged has a group with its finding site, its source images and a comment naming
the missing views, and the document's CompletionFlag is PARTIAL.

The SR's SOP Instance UID is derived from the exam, the model and the set of source images, so writing the
same exam again (a restart, a retry) makes the same instance, which a PACS stores once.

torch-free; pydicom and highdicom load with this module, so dens-infer imports it only when ``--sr`` asks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pandas as pd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

import dens
from dens import exams, labels
from dens.files import atomic_write
from dens.flags import FlagRule, flag_dense

log = logging.getLogger(__name__)

# The coded concepts of the report (SNOMED CT unless said).
BREAST_COMPOSITION = CodedConcept("129715009", "SCT", "Breast composition")
COMPOSITION = {
    "A": CodedConcept("129716005", "SCT", "Almost entirely fatty breast"),
    "B": CodedConcept("129717001", "SCT", "Scattered areas of fibroglandular density"),
    "C": CodedConcept("129718006", "SCT", "Heterogeneously dense breast"),
    "D": CodedConcept("129719003", "SCT", "Extremely dense breast"),
}
BREAST = CodedConcept("76752008", "SCT", "Breast")
LATERALITY = {
    "L": CodedConcept("7771000", "SCT", "Left"),
    "R": CodedConcept("24028007", "SCT", "Right"),
    "B": CodedConcept("51440002", "SCT", "Right and left"),
}
SCREENING_MAMMOGRAPHY = CodedConcept("24623002", "SCT", "Screening mammography")
COMMENT = CodedConcept("121106", "DCM", "Comment")
# No standard concept names a model's probability of a dense breast: a local code, as DICOM allows (PS3.16 8.2).
P_DENSE = CodedConcept("p_dense", "99DENS", "Probability of dense breast (BI-RADS C or D)")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
SR_SERIES_NUMBER = 7001  # where a viewer lists dens's reports among a study's series
MANUFACTURER = "dens"
_UID_NAME = re.compile(r"^[0-9][0-9.]{0,63}$")


@dataclass(frozen=True)
class ModelIdentity:
    """Who made the calls: the model's name, version and sha256 (of its ONNX file), for the observer device
    context, the algorithm identification and the Contributing Equipment."""

    name: str
    version: str
    sha256: str

    @classmethod
    def from_metadata(cls, metadata: Mapping, sha256: str) -> ModelIdentity:
        """From an exported model's ``dens`` metadata (:mod:`dens.artifact.metadata`) and its file's sha256."""
        arch = str(metadata.get("arch", "model"))
        precision = str(metadata.get("precision", "fp32"))
        return cls(f"dens {arch} breast density", f"dens {dens.__version__}; {arch} {precision}", sha256)

    @property
    def device_uid(self) -> str:
        """A UID for the model as an observer device: the same for every report of one model file."""
        return generate_uid(entropy_srcs=["dens-model", self.sha256])


def uid_filename(uid: str, suffix: str = "") -> str:
    """A file name for ``uid`` that can never hold a path character: the UID itself when it is a well-formed
    UID (digits and dots), else ``x`` + the sha256 of what was given (a hostile or damaged header)."""
    uid = str(uid or "")
    name = (
        uid
        if _UID_NAME.match(uid) and ".." not in uid
        else "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()
    )
    return name + suffix


# The patient's and study's type 2 attributes (present, possibly empty) an SR copies from its sources; a source
# that lacks one (anonymised archives drop them) lends an empty value, never an invented one.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def read_headers(paths: Sequence[str | os.PathLike]) -> list[Dataset]:
    """The headers of the source images (their pixel data is never read), with the patient's and study's
    type 2 attributes an SR copies present (empty where the file has none)."""
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    for ds in headers:
        meta = getattr(ds, "file_meta", Dataset())
        for keyword, fallback in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if keyword not in ds and fallback in meta:  # a header that names itself only in its file meta
                setattr(ds, keyword, meta[fallback].value)
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return headers


def exam_report(
    images: pd.DataFrame,
    headers: Mapping[str, Dataset],
    model: ModelIdentity,
    rule: FlagRule = flag_dense,
    *,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """The SR of one exam. ``images``: its rows as preds.csv has them (one per image; only the ``ok`` ones are
    used), with ``path`` the file itself; ``headers``: each ``ok`` image's header, by path."""
    ok = images[images[labels.STATUS] == "ok"]
    if ok.empty:
        raise ValueError("an exam without an ok image has no report")
    breast_calls = exams.breasts(ok, rule)
    exam_call = exams.exams(breast_calls, rule).iloc[0]
    missing = [v for v in str(exam_call[exams.MISSING_VIEWS]).split(";") if v]
    sources = [headers[p] for p in ok[labels.PATH]]
    by_side = {side: [headers[p] for p in group[labels.PATH]] for side, group in ok.groupby(labels.LATERALITY)}
    algorithm = AlgorithmIdentification(name=model.name, version=model.version)
    groups = []
    for _, breast in breast_calls.iterrows():
        side = breast[labels.LATERALITY]
        groups.append(
            _group(
                f"breast {side or 'unknown'}",
                side,
                by_side.get(side, []),
                None if missing else breast,
                algorithm,
                missing,
            )
        )
    if not missing:
        groups.append(_group("exam", "B", sources, exam_call, algorithm, missing))
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=model.version,
            serial_number=model.sha256,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=SCREENING_MAMMOGRAPHY,
        imaging_measurements=groups,
        # The image library (TID 1600) describes each image from its PatientOrientation and ImagerPixelSpacing:
        # only when every source has both (the groups and the evidence reference every source regardless).
        referenced_images=sources if all(_describable(s) for s in sources) else None,
    )
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.sha256,
        contribution_description="BI-RADS breast composition by an automated model (not verified)",
    )
    study_uid = str(sources[0].StudyInstanceUID)
    uids = sorted(str(s.SOPInstanceUID) for s in sources)
    sr = Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=generate_uid(entropy_srcs=["dens-sr-series", study_uid, model.sha256]),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=["dens-sr", study_uid, model.sha256, *uids]),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=not missing,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
        series_description="dens breast density (not verified)",
    )
    _drop_invalid(sr)
    return sr


def _drop_invalid(sr: Dataset) -> None:
    """Remove the values the SR copied from its sources that their VR forbids (an archive's Patient's Age of
    ``732.0m``): a receiving PACS may refuse an SR with an invalid value, and a copied optional attribute is
    better absent than wrong. The source keeps its value; the log says what was dropped."""
    for element in list(sr):
        if element.VR == "SQ" or element.value in (None, ""):
            continue
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        try:
            for value in values:
                if isinstance(value, str):  # numbers and UIDs highdicom set itself are valid by construction
                    validate_value(element.VR, value, config.RAISE)
        except ValueError:
            log.info(
                "SR of study %s: %s %r is invalid for its VR %s; left out",
                sr.StudyInstanceUID,
                element.keyword,
                element.value,
                element.VR,
            )
            del sr[element.tag]


def _describable(image: Dataset) -> bool:
    return len(image.get("PatientOrientation") or []) == 2 and len(image.get("ImagerPixelSpacing") or []) == 2


def _group(
    name: str,
    side: str,
    sources: Sequence[Dataset],
    call: pd.Series | None,
    algorithm: AlgorithmIdentification,
    missing: Sequence[str],
) -> MeasurementsAndQualitativeEvaluations:
    """One measurement group: a breast (or both), its call when there is one, its source images."""
    site = FindingSite(BREAST, laterality=LATERALITY.get(side))
    evaluations, measurements = None, None
    if call is not None:
        evaluations = [QualitativeEvaluation(BREAST_COMPOSITION, COMPOSITION[call[labels.DENSITY]])]
        measurements = [Measurement(P_DENSE, float(call[labels.P_DENSE]), NO_UNITS, algorithm_id=algorithm)]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=name),
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(s.SOPClassUID, s.SOPInstanceUID) for s in sources] or None,
    )
    if call is None:
        comment = (
            f"Not assessed: incomplete screening exam, missing views {', '.join(missing)}; "
            "dens calls only exams with L-CC, L-MLO, R-CC and R-MLO"
        )
        group[0].ContentSequence.append(TextContentItem(name=COMMENT, value=comment, relationship_type="CONTAINS"))
    return group


def write_reports(
    preds: pd.DataFrame, out_dir: str | os.PathLike, model: ModelIdentity, rule: FlagRule = flag_dense
) -> list[Path]:
    """One SR per exam with an ``ok`` image among ``preds`` (preds.csv's rows, ``path`` the file itself), as
    ``out_dir/<StudyInstanceUID>.sr.dcm`` (a name made safe by :func:`uid_filename`), each written whole;
    their paths, in exam order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = preds[preds[labels.STATUS] == "ok"]
    keys = [exams.exam_key(r) for r in ok.to_dict("records")]
    written = []
    for _, images in ok.groupby(pd.Series(keys, index=ok.index), sort=True):
        headers = dict(zip(images[labels.PATH], read_headers(list(images[labels.PATH])), strict=True))
        sr = exam_report(images, headers, model, rule)
        written.append(save(sr, out_dir))
    return written


def save(sr: Dataset, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``sr`` whole (fsync'd) as ``out_dir/<name>``, by default ``<StudyInstanceUID>.sr.dcm``; its path."""
    path = Path(out_dir) / (name or uid_filename(str(sr.StudyInstanceUID), ".sr.dcm"))
    with atomic_write(path, "wb", fsync=True) as f:
        sr.save_as(f, enforce_file_format=True)
    return path
