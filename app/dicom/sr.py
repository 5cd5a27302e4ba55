"""Build the DICOM results of a prediction: a Structured Report and a secondary-capture overlay.

Both are built with highdicom from the prediction answer (`PredictionPublic`) and, for images
that came in as DICOM, the source data set: the results then join the source study (same
patient and study module, a new series each) and the SR references the source instance as
evidence, which is what lets a PACS show them next to the image (IHE AI Results).

For predictions of uploads (`GET /predictions/{id}/sr`) there is no source data set at rest, so
the SR gets an empty patient module and a study of its own: nothing identifying is invented or
kept. All UIDs are derived from the prediction id, so building the same result twice gives the
same instance (a PACS that receives it twice overwrites it instead of filing a copy).

The content tree uses the private coding scheme `99CXR` for the service's own concepts (class,
mean distances, unknown flag, nearest references, versions); `read_sr` parses it back.
"""

from __future__ import annotations

import base64
import io
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from app.schemas_predict import PredictionPublic

logger = logging.getLogger(__name__)
# highdicom logs the source instance's UIDs at INFO while it copies the patient module: those
# identify a patient's image and must not reach the logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)

__all__ = [
    "DISCLAIMER",
    "MANUFACTURER",
    "SCHEME",
    "SrSummary",
    "build_overlay",
    "build_sr",
    "derived_uid",
    "read_sr",
    "to_bytes",
]

SCHEME = "99CXR"
MANUFACTURER = "cxr"
DISCLAIMER = (
    "Not a diagnosis: this result was produced by software comparing the image with enrolled "
    "reference images. It supports, and does not replace, a clinician's reading."
)
_UID_NAMESPACE = uuid.UUID("5b0f8e0e-3c1a-4d3e-9a57-6c7872657375")  # cxr results, v1
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902

_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
_CLASS = hd.sr.CodedConcept("CLASS", SCHEME, "Predicted class")
_CONFIDENCE = hd.sr.CodedConcept("CONF", SCHEME, "Confidence")
_UNKNOWN = hd.sr.CodedConcept("UNKNOWN", SCHEME, "Unlike every enrolled class")
_DISTANCES = hd.sr.CodedConcept("DISTS", SCHEME, "Mean distance to each enrolled class")
_NEIGHBOR = hd.sr.CodedConcept("NEIGHBOR", SCHEME, "Nearest reference")
_OUTLIER = hd.sr.CodedConcept("OUTLIER", SCHEME, "Outlier score")
_OUTLIER_THRESHOLD = hd.sr.CodedConcept("OUTLIERT", SCHEME, "Outlier threshold")
_MODEL = hd.sr.CodedConcept("MODEL", SCHEME, "Model version")
_INDEX = hd.sr.CodedConcept("INDEX", SCHEME, "Reference index version")
_PREDICTION = hd.sr.CodedConcept("PREDID", SCHEME, "Prediction id")
_DISCLAIMER = hd.sr.CodedConcept("DISCLAIM", SCHEME, "Disclaimer")
_SOURCE = hd.sr.CodedConcept("SOURCE", SCHEME, "Source image")
_OVERLAY = hd.sr.CodedConcept("OVERLAY", SCHEME, "Grad-CAM overlay")
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
_YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
_NO = hd.sr.CodedConcept("373067005", "SCT", "No")
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS

#: Patient and study attributes copied from the source into the results (and nothing else).
_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SpecificCharacterSet",
)


def derived_uid(prediction_id: str, purpose: str) -> str:
    """A UID that is a pure function of the prediction and the purpose (`2.25.` form)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{prediction_id}/{purpose}').int}"


def _class_code(label: str) -> hd.sr.CodedConcept:
    # Code values are at most 16 characters; the meaning keeps the full label.
    return hd.sr.CodedConcept(label[:16] or "-", SCHEME, label[:64] or "-")


def _study_of(source: Dataset | None, prediction_id: str, purpose: str) -> Dataset:
    """The evidence data set highdicom takes patient and study from: the source's own header
    when there is one, else an empty patient module in a study derived from the prediction."""
    study = Dataset()
    if source is not None:
        for keyword in _STUDY_KEYWORDS:
            if keyword in source:
                setattr(study, keyword, source[keyword].value)
        study.SOPClassUID = source.SOPClassUID
        study.SOPInstanceUID = source.SOPInstanceUID
        study.SeriesInstanceUID = source.get("SeriesInstanceUID", derived_uid(prediction_id, "s"))
    else:
        # highdicom wants evidence with instance UIDs even when it is not recorded
        # (`record_evidence=False`): a stand-in that never leaves this function.
        study.StudyInstanceUID = derived_uid(prediction_id, f"{purpose}-study")
        study.SeriesInstanceUID = derived_uid(prediction_id, f"{purpose}-source-series")
        study.SOPClassUID = SecondaryCaptureImageStorage
        study.SOPInstanceUID = derived_uid(prediction_id, f"{purpose}-source")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in study:
            setattr(study, keyword, None)
    for keyword in ("StudyID", "StudyDate", "StudyTime", "AccessionNumber"):
        if keyword not in study:
            setattr(study, keyword, None)
    return study


def build_sr(answer: PredictionPublic, *, source: Dataset | None = None) -> Dataset:
    """The prediction as a Comprehensive SR; in the source study when `source` is given.

    `source` is the received data set (header is enough); its patient and study attributes are
    copied and its instance is referenced. Without it (uploads), the patient module stays empty.
    """
    purpose = "sr" if source is not None else "api-sr"
    evidence = _study_of(source, answer.id, purpose)
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(_CLASS, _class_code(answer.label), relationship_type=_CONTAINS),
        hd.sr.NumContentItem(
            _CONFIDENCE, float(answer.confidence), _UNITLESS, relationship_type=_CONTAINS
        ),
        hd.sr.CodeContentItem(
            _UNKNOWN, _YES if answer.unknown else _NO, relationship_type=_CONTAINS
        ),
    ]
    distances = hd.sr.ContainerContentItem(_DISTANCES, relationship_type=_CONTAINS)
    distances.ContentSequence = [
        hd.sr.NumContentItem(
            _class_code(label), float(value), _UNITLESS, relationship_type=_CONTAINS
        )
        for label, value in sorted(answer.distances.items())
    ]
    items.append(distances)
    items += [
        hd.sr.TextContentItem(
            _NEIGHBOR,
            f"{n.reference_id} {n.label} {n.distance:.6f}"[:1024],
            relationship_type=_CONTAINS,
        )
        for n in answer.neighbors
    ]
    items += [
        hd.sr.NumContentItem(
            _OUTLIER, float(answer.outlier_score), _UNITLESS, relationship_type=_CONTAINS
        ),
        hd.sr.NumContentItem(
            _OUTLIER_THRESHOLD,
            float(answer.outlier_threshold),
            _UNITLESS,
            relationship_type=_CONTAINS,
        ),
        hd.sr.TextContentItem(_MODEL, answer.model_version, relationship_type=_CONTAINS),
        hd.sr.NumContentItem(
            _INDEX, float(answer.index_version), _UNITLESS, relationship_type=_CONTAINS
        ),
        hd.sr.TextContentItem(_PREDICTION, answer.id, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(_DISCLAIMER, DISCLAIMER, relationship_type=_CONTAINS),
    ]
    if source is not None:
        items.append(
            hd.sr.ImageContentItem(
                _SOURCE,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                relationship_type=_CONTAINS,
            )
        )
    root = hd.sr.ContainerContentItem(_REPORT)
    root.ContentSequence = items
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=derived_uid(answer.id, f"{purpose}-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(answer.id, purpose),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        record_evidence=source is not None,
        series_description="cxr AI result (not a diagnosis)",
    )
    return sr


def build_overlay(answer: PredictionPublic, *, source: Dataset) -> Dataset | None:
    """The Grad-CAM overlay of `answer` as an RGB secondary capture in the source study, or
    None when the answer has no overlay (explain off, or the label has no class mean)."""
    if answer.gradcam is None:
        return None
    png = base64.b64decode(answer.gradcam.overlay_png)
    with Image.open(io.BytesIO(png)) as img:
        pixels = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    evidence = _study_of(source, answer.id, "overlay")
    overlay = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=evidence.StudyInstanceUID,
        series_instance_uid=derived_uid(answer.id, "overlay-series"),
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=derived_uid(answer.id, "overlay"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_id=evidence.PatientID,
        patient_name=evidence.PatientName,
        patient_birth_date=evidence.PatientBirthDate,
        patient_sex=evidence.PatientSex,
        accession_number=evidence.AccessionNumber,
        study_id=evidence.StudyID,
        study_date=evidence.StudyDate,
        study_time=evidence.StudyTime,
        referring_physician_name=evidence.get("ReferringPhysicianName"),
        patient_orientation=("L", "F"),
        series_description=f"cxr Grad-CAM for {answer.gradcam.label} (not a diagnosis)",
    )
    overlay.BurnedInAnnotation = "NO"
    overlay.ImageComments = DISCLAIMER[:10240]
    return overlay


def to_bytes(ds: Dataset) -> bytes:
    """A data set as a DICOM Part 10 file (preamble and file meta)."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class SrSummary:
    """What `read_sr` finds in an SR built by `build_sr` (for tests, benches and clients)."""

    label: str | None = None
    confidence: float | None = None
    unknown: bool | None = None
    distances: dict[str, float] = field(default_factory=dict)
    neighbors: list[str] = field(default_factory=list)
    model_version: str | None = None
    index_version: int | None = None
    prediction_id: str | None = None
    disclaimer: str | None = None
    source_sop_instance_uid: str | None = None


def _name(item: Any) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodingSchemeDesignator), str(concept.CodeValue)


def _number(item: Any) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def read_sr(ds: Dataset) -> SrSummary:
    """Parse the content tree of an SR written by `build_sr` back into its values."""
    summary = SrSummary()
    for item in ds.ContentSequence:
        scheme, code = _name(item)
        if scheme != SCHEME:
            continue
        if code == "CLASS":
            summary.label = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif code == "CONF":
            summary.confidence = _number(item)
        elif code == "UNKNOWN":
            summary.unknown = str(item.ConceptCodeSequence[0].CodeValue) == _YES.value
        elif code == "DISTS":
            for child in item.ContentSequence:
                meaning = str(child.ConceptNameCodeSequence[0].CodeMeaning)
                summary.distances[meaning] = _number(child)
        elif code == "NEIGHBOR":
            summary.neighbors.append(str(item.TextValue).split(" ", 1)[0])
        elif code == "MODEL":
            summary.model_version = str(item.TextValue)
        elif code == "INDEX":
            summary.index_version = int(_number(item))
        elif code == "PREDID":
            summary.prediction_id = str(item.TextValue)
        elif code == "DISCLAIM":
            summary.disclaimer = str(item.TextValue)
        elif code == "SOURCE":
            summary.source_sop_instance_uid = str(
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            )
    return summary
