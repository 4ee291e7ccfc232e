"""A density report per exam as DICOM: a TID 1500 measurement report in a Comprehensive 3D SR (highdicom).

What one SR holds (one per exam, the exam as :mod:`dens.exams` defines it, and its rule):

* per breast with an ``ok`` image, a measurement group whose finding site is the breast (SCT 76752008) with its
  laterality, the BI-RADS breast composition as a coded value (SCT 129715009 "Breast composition"; CID 6001: A
  129716005, B 129717001, C 129718006, D 129719003, the meaning ending with its letter: "... (BI-RADS C)"),
  ``p_dense`` (P(C) + P(D)) as a numeric value, and the source images the call used;
* per exam, one more group with the exam's call (the denser breast's), its finding site both breasts, or the one
  breast an exam of one breast has;
* the model as the observer device (its name, version and sha256) and as Contributing Equipment (IHE AI
  Results), the algorithm's name and version in every group, VerificationFlag UNVERIFIED;
* patient and study identity copied from the source images, every source image in the evidence and in the image
  library with its laterality and view (SCT, CID 4014), and ``p_dense``'s private coding scheme (99DENS) in the
  Coding Scheme Identification Sequence.

An incomplete exam (a standard view, or a whole side, without an ``ok`` image) gets its calls by the same rule
as a complete one, as preds.exam.csv gives them: its CompletionFlag is PARTIAL and comments name what is missing
(:func:`dens.exams.describe_missing`), on each breast that lacks a view and on the exam. The images of an exam
without a call (skipped, failed) are named in the exam's comments with their reasons. An exam none of whose
images could be used (dens-serve answers every study it receives) gets a not-assessed SR: no composition, a
comment that says so and one per image with its reason, its images in the evidence, PARTIAL.

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
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

import dens
from dens import exams, labels
from dens.files import atomic_write
from dens.flags import FlagRule, flag_dense
from dens.sources import is_plain_image

log = logging.getLogger(__name__)

# The coded concepts of the report (SNOMED CT unless said).
BREAST_COMPOSITION = CodedConcept("129715009", "SCT", "Breast composition")
# A reader sees the meaning, not the code: it ends with the category's letter, as a radiologist writes it.
COMPOSITION = {
    letter: CodedConcept(code, "SCT", f"{meaning} (BI-RADS {letter})")
    for letter, code, meaning in (
        ("A", "129716005", "Almost entirely fatty breast"),
        ("B", "129717001", "Scattered areas of fibroglandular density"),
        ("C", "129718006", "Heterogeneously dense breast"),
        ("D", "129719003", "Extremely dense breast"),
    )
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
# Its scheme, identified in the Coding Scheme Identification Sequence. dciodvfy still warns "Unrecognized defined
# term <99DENS>": it knows a fixed list of schemes and identifies no other, however the instance names it.
P_DENSE_SCHEME = {
    "CodingSchemeDesignator": P_DENSE.scheme_designator,
    "CodingSchemeName": "dens breast density model outputs",
    "CodingSchemeResponsibleOrganization": "dens",
}
NO_UNITS = CodedConcept("1", "UCUM", "no units")
PIXELS = CodedConcept("{pixels}", "UCUM", "Pixels")
SOURCE = CodedConcept("260753009", "SCT", "Source")
MAMMOGRAPHY = CodedConcept("MG", "DCM", "Mammography")
# A view as dens names it (dens.route.dicom) -> its code in CID 4014 View for Mammography.
VIEW_CODES = {
    "CC": codes.cid4014.CranioCaudal,
    "MLO": codes.cid4014.MedioLateralObliqueProjection,
    "ML": codes.cid4014.MedioLateralProjection,
    "LM": codes.cid4014.LateroMedial,
    "XCCL": codes.cid4014.CranioCaudalExaggeratedLaterally,
    "XCCM": codes.cid4014.CranioCaudalExaggeratedMedially,
    "LMO": codes.cid4014.LateroMedialOblique,
    "FB": codes.cid4014.CaudoCranial,
    "SIO": codes.cid4014.SuperolateralToInferomedialOblique,
    "ISO": codes.cid4014.InferomedialToSuperolateralOblique,
}
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


class InvalidStudyUID(ValueError):
    """An exam whose images carry no valid StudyInstanceUID: its SR is refused, never written without one."""


def valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a non-empty, valid DICOM UID (VR UI)."""
    try:
        validate_value("UI", uid, config.RAISE)
    except ValueError:
        return False
    return bool(uid)


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
    type 2 attributes an SR copies present (empty where the file has none). ValueError, naming the file, for a
    file that is no longer the DICOM file it was when it was scored."""
    headers = []
    for p in paths:
        try:
            headers.append(dcmread(p, stop_before_pixels=True))
        except InvalidDicomError as exc:
            raise ValueError(f"{p} cannot be read as DICOM ({exc})") from exc
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
    """The SR of one exam. ``images``: its rows as preds.csv has them (one per image, whatever its status), with
    ``path`` the file itself; ``headers``: by path, the header of each ``ok`` image, or, for an exam without
    one (a not-assessed SR), of each image whose header could be read."""
    ok = images[images[labels.STATUS] == "ok"]
    unused = [_unused_note(r) for r in images[images[labels.STATUS] != "ok"].to_dict("records")]
    algorithm = AlgorithmIdentification(name=model.name, version=model.version)
    if ok.empty:
        cited = images[images[labels.PATH].isin(list(headers))]
        if cited.empty:
            raise ValueError("an exam without an ok image or a readable header has no report")
        sides = {str(s) for s in cited[labels.LATERALITY]} & {"L", "R"}
        note = "Not assessed: no image of this study could be used for a breast density call"
        groups = [_group("exam", "B" if len(sides) == 2 else "".join(sides), [], None, algorithm, [note, *unused])]
        complete = False
    else:
        cited = ok
        groups, complete = _calls(ok, headers, rule, algorithm, unused)
    sources = [headers[p] for p in cited[labels.PATH]]
    study_uid = str(sources[0].get("StudyInstanceUID") or "")
    if not valid_uid(study_uid):
        # Type 1, and the SR must join its images' study: a UID made up here would file it in another study.
        raise InvalidStudyUID(
            f"no density SR for study {study_uid!r}: its images' StudyInstanceUID is missing or not a valid UID "
            "(digits and dots, at most 64 characters); an SR needs its images' study UID. Fix the images' headers "
            "at the source and send them again"
        )
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
    )
    # The image library (TID 1600) goes before the measurements, as TID 1500 orders them.
    content = report[0].ContentSequence
    at = next(i for i, item in enumerate(content) if item.ValueType == "CONTAINER")
    content.insert(at, _image_library(cited, headers))
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.sha256,
        contribution_description="BI-RADS breast composition by an automated model (not verified)",
    )
    uids = sorted(str(s.SOPInstanceUID) for s in sources)
    sr = Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=generate_uid(entropy_srcs=["dens-sr-series", study_uid, model.sha256]),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=["dens-sr", study_uid, model.sha256, *uids]),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=complete,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
        series_description="dens breast density (not verified)",
    )
    if not ok.empty:  # the private scheme p_dense's concept uses, identified (PS3.3 C.12.1.1.4)
        sr.CodingSchemeIdentificationSequence = [Dataset()]
        for keyword, value in P_DENSE_SCHEME.items():
            setattr(sr.CodingSchemeIdentificationSequence[0], keyword, value)
    _drop_invalid(sr)
    return sr


def _calls(
    ok: pd.DataFrame,
    headers: Mapping[str, Dataset],
    rule: FlagRule,
    algorithm: AlgorithmIdentification,
    unused: Sequence[str],
) -> tuple[list[MeasurementsAndQualitativeEvaluations], bool]:
    """The groups of an exam with ``ok`` images (each breast's, then the exam's, by :mod:`dens.exams`' rule, as
    its CSVs give them), and whether the exam is complete."""
    breast_calls = exams.breasts(ok, rule)
    exam_call = exams.exams(breast_calls, rule).iloc[0]
    groups = []
    for _, breast in breast_calls.iterrows():
        side, lacks = breast[labels.LATERALITY], _split(breast[exams.MISSING_VIEWS])
        notes = []
        if lacks:
            views = ", ".join(_split(breast[exams.VIEWS])) or "of unknown view"
            notes.append(
                f"Incomplete breast ({exams.describe_missing(lacks, [side])}): its composition is from {views}"
            )
        sources = [headers[p] for p in ok[ok[labels.LATERALITY] == side][labels.PATH]]
        groups.append(_group(f"breast {side or 'unknown'}", side, sources, breast, algorithm, notes))
    missing = _split(exam_call[exams.MISSING_VIEWS])
    notes = []
    if missing:
        notes.append(
            f"Incomplete screening exam ({exams.describe_missing(missing, set(breast_calls[labels.LATERALITY]))}): "
            "the exam's composition is the denser "
            "breast's of those imaged"
        )
    # The exam's finding site: both breasts, or the one an exam of one breast has (a mastectomy).
    side = breast_calls[labels.LATERALITY].iloc[0] if len(breast_calls) == 1 else "B"
    sources = [headers[p] for p in ok[labels.PATH]]
    groups.append(_group("exam", side, sources, exam_call, algorithm, [*notes, *unused]))
    return groups, not missing


def _split(cell: str) -> list[str]:
    return [v for v in str(cell).split(";") if v]


def _unused_note(row: Mapping[str, str]) -> str:
    """The comment that names an image without a call and why."""
    name = f"{row.get(labels.LATERALITY) or '?'}-{row.get(labels.VIEW) or '?'}"
    reason = f": {row[labels.REASON]}" if row.get(labels.REASON) else ""
    return f"Not used: {name} image {row.get(labels.SOP_UID) or row.get(labels.PATH, '')}, {row[labels.STATUS]}{reason}"


def _image_library(images: pd.DataFrame, headers: Mapping[str, Dataset]) -> ContainerContentItem:
    """The image library (TID 1600): one group of mammograms, each source image with its descriptors (TID 1602):
    its laterality and view as dens read them, its size, and its orientation and spacing where its header has
    them."""
    context = "HAS ACQ CONTEXT"
    entries = []
    for row in images.to_dict("records"):
        ds = headers[row[labels.PATH]]
        described = []
        if row[labels.LATERALITY] in ("L", "R"):
            described.append(CodeContentItem(codes.DCM.ImageLaterality, LATERALITY[row[labels.LATERALITY]], context))
        view = _view_code(row[labels.VIEW], ds)
        if view is not None:
            described.append(CodeContentItem(codes.DCM.ImageView, view, context))
        for name, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
            if ds.get(keyword):
                described.append(NumContentItem(name, int(ds.get(keyword)), PIXELS, relationship_type=context))
        described += _geometry(ds)
        entry = ImageContentItem(SOURCE, ds.SOPClassUID, ds.SOPInstanceUID, relationship_type="CONTAINS")
        entry.ContentSequence = ContentSequence(described)
        entries.append(entry)
    group = ContainerContentItem(codes.DCM.ImageLibraryGroup, relationship_type="CONTAINS")
    group.ContentSequence = ContentSequence([CodeContentItem(codes.DCM.Modality, MAMMOGRAPHY, context), *entries])
    library = ContainerContentItem(codes.DCM.ImageLibrary, relationship_type="CONTAINS")
    library.ContentSequence = ContentSequence([group])
    return library


def _geometry(ds: Dataset) -> list:
    """An image's orientation and pixel spacing as TID 1603 describes them, where its header has both values of
    each (a header's damaged value is left out, as :func:`_drop_invalid` leaves out what the SR copies)."""
    context, described = "HAS ACQ CONTEXT", []
    value = ds.get("PatientOrientation")
    orientation = [str(v) for v in value] if isinstance(value, MultiValue) else []  # one value: no pair
    if len(orientation) == 2 and all(orientation):
        along_rows, along_columns = orientation
        described.append(TextContentItem(codes.DCM.PatientOrientationRow, along_rows, relationship_type=context))
        described.append(TextContentItem(codes.DCM.PatientOrientationColumn, along_columns, relationship_type=context))
    try:
        row, column = (float(v) for v in ds.get("ImagerPixelSpacing") or [])
    except (TypeError, ValueError):  # absent, one value, or not numbers
        return described
    for name, value in ((codes.DCM.HorizontalPixelSpacing, column), (codes.DCM.VerticalPixelSpacing, row)):
        described.append(NumContentItem(name, value, codes.UCUM.Millimeter, relationship_type=context))
    return described


def _view_code(view: str, ds: Dataset) -> CodedConcept | None:
    """An image's view as a code: dens's name for it in CID 4014, else the header's own ViewCodeSequence item."""
    if view in VIEW_CODES:
        found = VIEW_CODES[view]
        return CodedConcept(found.value, found.scheme_designator, found.meaning)
    try:
        return CodedConcept.from_dataset(ds.ViewCodeSequence[0])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


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


def _group(
    name: str,
    side: str,
    sources: Sequence[Dataset],
    call: pd.Series | None,
    algorithm: AlgorithmIdentification,
    notes: Sequence[str],
) -> MeasurementsAndQualitativeEvaluations:
    """One measurement group: a breast (or the exam), its call when there is one, its source images, and a
    comment per note."""
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
    for note in notes:
        group[0].ContentSequence.append(TextContentItem(name=COMMENT, value=note, relationship_type="CONTAINS"))
    return group


def write_reports(
    preds: pd.DataFrame, out_dir: str | os.PathLike, model: ModelIdentity, rule: FlagRule = flag_dense
) -> list[Path]:
    """One SR per exam with an ``ok`` DICOM image among ``preds`` (preds.csv's rows, ``path`` the file itself),
    as ``out_dir/<StudyInstanceUID>.sr.dcm`` (a name made safe by :func:`uid_filename`), each written whole;
    their paths, in exam order. A plain image (PNG, PGM, ...) has no DICOM identity for an SR to cite: its row
    is left out of the SRs, and a log line says how many were."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = preds[labels.PATH].map(is_plain_image).astype(bool)
    called = int((plain & (preds[labels.STATUS] == "ok")).sum())
    if called:
        log.info(
            "SRs: %d plain-image row%s (PNG/PGM/TIFF/JPEG) left out of the SRs: an SR cites DICOM images only; "
            "their calls are in preds.csv and its breast and exam CSVs",
            called,
            "s" * (called != 1),
        )
    dicom = preds[~plain]
    keys = [exams.exam_key(r) for r in dicom.to_dict("records")]
    written = []
    for _, images in dicom.groupby(pd.Series(keys, index=dicom.index), sort=True):
        ok = images[images[labels.STATUS] == "ok"]
        if ok.empty:
            continue
        headers = dict(zip(ok[labels.PATH], read_headers(list(ok[labels.PATH])), strict=True))
        try:
            report = exam_report(images, headers, model, rule)
        except InvalidStudyUID as exc:
            log.warning("SRs: %s", exc)
            continue
        written.append(save(report, out_dir))
    return written


def save(sr: Dataset, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``sr`` whole (fsync'd) as ``out_dir/<name>``, by default ``<StudyInstanceUID>.sr.dcm``; its path."""
    path = Path(out_dir) / (name or uid_filename(str(sr.StudyInstanceUID), ".sr.dcm"))
    with atomic_write(path, "wb", fsync=True) as f:
        sr.save_as(f, enforce_file_format=True)
    return path
