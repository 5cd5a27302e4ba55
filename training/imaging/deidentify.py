"""Make an upload safe to store: pixels and what decoding them needs, nothing else.

:func:`clean_for_storage` is the one function every path that writes an upload calls (reference
enrollment, the bulk import, stored prediction images). It keeps the format and the decoded
pixels exactly, and drops everything else:

* **DICOM** is rebuilt from an *allow-list* (stricter than the PS3.15 Annex E basic profile,
  which lists what to remove: a list of what to keep cannot miss an attribute nobody thought
  of, such as ClinicalTrialSubjectID or text deep in a ContentSequence). The new data set holds
  the image pixel module, the modality and VOI transforms, a few non-identifying acquisition
  facts (view position, pixel spacing), instance UIDs replaced by a salted one-way hash (the
  same image always gets the same UIDs, so duplicates stay recognisable), empty type-2 patient
  and study attributes, and the de-identification markers. The 128-byte preamble is zeroed and
  the file meta is rebuilt (no SourceApplicationEntityTitle, no PrivateInformation). Text burned
  into the pixels cannot be removed: a file that declares it (BurnedInAnnotation YES) is
  refused with :class:`~training.imaging.errors.DeidentificationError` (HTTP 422), never stored.
* **PNG** keeps its critical chunks (IHDR, PLTE, IDAT, IEND) plus tRNS and sBIT, which affect
  decoding; tEXt, zTXt, iTXt, eXIf, iCCP, tIME, animation chunks and trailing bytes go.
* **JPEG** keeps its coding segments; APPn and COM segments go, except a minimal JFIF APP0
  (no thumbnail), the Adobe APP14 colour-transform flag and, when the image is rotated, an EXIF
  block holding only the orientation (decoding honours it). Bytes after EOI (MPO) go.

:func:`find_identifying_content` is the independent checker: it lists whatever is left that
the allow-list does not permit; ``clean_for_storage`` runs it on its own output and refuses
rather than store a file it flags.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Callable
from typing import Any

from training.imaging.dicom import read_dicom
from training.imaging.errors import CorruptImageError, DeidentificationError, safe_message
from training.imaging.formats import ImageFormat, format_or_raise, read_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_KEPT_KEYWORDS",
    "clean_for_storage",
    "find_identifying_content",
]

#: Top-level DICOM attributes copied from the upload: what decoding the pixels needs, plus
#: acquisition facts that identify no one. Everything else is dropped.
DICOM_KEPT_KEYWORDS: frozenset[str] = frozenset(
    {
        "SOPClassUID",
        "Modality",
        "ImageType",
        "ViewPosition",
        "BodyPartExamined",
        "ImageLaterality",
        "PatientOrientation",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "PixelAspectRatio",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "NumberOfFrames",
        "PixelPaddingValue",
        "PixelPaddingRangeLimit",
        "PixelIntensityRelationship",
        "PixelIntensityRelationshipSign",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "PresentationLUTShape",
        "RedPaletteColorLookupTableDescriptor",
        "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        "BurnedInAnnotation",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
    }
)
#: Attributes allowed inside the items of the kept LUT sequences (LUTExplanation is free text).
_SEQUENCE_ITEM_KEYWORDS = frozenset({"LUTDescriptor", "LUTData", "ModalityLUTType"})
#: Instance UIDs re-derived by a salted one-way hash.
_HASHED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: Type-2 attributes of the patient, study and series modules: present, empty.
_EMPTY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
)
_MARKERS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
_MARKER_ITEM_KEYWORDS = frozenset({"CodeValue", "CodingSchemeDesignator", "CodeMeaning"})
_METHOD = "cxr allow-list: pixel module and display transforms"
#: What the rebuilt file meta holds.
_META_KEYWORDS = frozenset(
    {
        "FileMetaInformationGroupLength",
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    }
)
_ALLOWED_TOP = DICOM_KEPT_KEYWORDS | set(_HASHED_UIDS) | set(_EMPTY_TYPE2) | set(_MARKERS)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


_UID_SALT = "cxr-deidentify-v1"


def _new_uid(value: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_SALT, str(value)]))


def _visit(ds: Any, fn: Callable[[Any], None]) -> None:
    """Apply ``fn`` to ``ds`` and every nested sequence item."""
    fn(ds)
    for elem in list(ds):
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                _visit(item, fn)


def _copy_sequence(elem: Any) -> Any:
    """A kept LUT sequence with only LUT descriptor, data and type in each item."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    items = []
    for item in elem.value or []:
        clean = Dataset()
        for sub in item:
            if sub.keyword in _SEQUENCE_ITEM_KEYWORDS:
                clean.add(sub)
        items.append(clean)
    return Sequence(items)


def _clean_dicom(raw: bytes) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
    )

    source = read_dicom(raw, stop_before_pixels=False)
    if str(getattr(source, "BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DeidentificationError(
            "The DICOM file declares text burned into its pixels (BurnedInAnnotation YES), "
            "which cannot be removed here; export the image without annotations (or mask "
            "them) and upload it again."
        )
    ds = Dataset()
    for elem in source:
        keyword = elem.keyword
        if elem.tag.is_private or keyword not in DICOM_KEPT_KEYWORDS:
            continue
        if elem.VR == "SQ":
            ds[elem.tag] = type(elem)(elem.tag, "SQ", _copy_sequence(elem))
        else:
            ds.add(elem)
    pixels = source.get("PixelData") or source.get("FloatPixelData") or b""
    anchor = bytes(pixels[:4096]) if isinstance(pixels, bytes | bytearray) else b""
    for keyword in _HASHED_UIDS:
        original = str(getattr(source, keyword, "") or "")
        # No UID upstream: derive one from the pixels, still deterministic per image.
        ds[keyword] = _dicom_element(keyword, _new_uid(original or f"{keyword}:{anchor.hex()}"))
    for keyword in _EMPTY_TYPE2:
        setattr(ds, keyword, "" if keyword not in ("SeriesNumber", "InstanceNumber") else None)
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]

    source_meta = getattr(source, "file_meta", None)
    ts = getattr(source_meta, "TransferSyntaxUID", None) or ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # read_dicom hands back an inflated Deflated data set as Explicit VR Little Endian.
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXR_DEID_1"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dicom_element(keyword: str, value: Any) -> Any:
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    tag = tag_for_keyword(keyword)
    return DataElement(tag, dictionary_VR(tag), value)


def _dicom_findings(raw: bytes) -> list[str]:
    findings: list[str] = []
    if raw[128:132] == b"DICM" and raw[:128].strip(b"\x00"):
        findings.append("Preamble")
    ds = read_dicom(raw, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None)
    for elem in meta or []:
        if elem.keyword not in _META_KEYWORDS:
            findings.append(f"FileMeta.{elem.keyword or elem.tag}")
    for elem in ds:
        name = elem.keyword or str(elem.tag)
        if elem.tag.is_private or name not in _ALLOWED_TOP:
            if elem.value not in (None, "", b"") and not (elem.VR == "SQ" and not elem.value):
                findings.append(name)
            continue
        if name in _EMPTY_TYPE2 and elem.value not in (None, ""):
            findings.append(name)
        if elem.VR == "SQ":
            allowed = (
                _MARKER_ITEM_KEYWORDS
                if name == "DeidentificationMethodCodeSequence"
                else _SEQUENCE_ITEM_KEYWORDS
            )

            def check(item: Any, allowed: frozenset[str] = allowed, name: str = name) -> None:
                for sub in item:
                    if sub.keyword not in allowed and sub.value not in (None, "", b""):
                        findings.append(f"{name}.{sub.keyword or sub.tag}")

            for item in elem.value or []:
                _visit(item, check)
    return sorted(set(findings))


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Chunks that change the decoded pixels; every other chunk is metadata.
_PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"sBIT"})


def _png_chunks(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) up to IEND; CorruptImageError on a chunk that overruns."""
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(raw):
            raise CorruptImageError(
                "The PNG file is truncated inside a chunk; export the image again."
            )
        chunks.append((kind, raw[pos:end]))
        pos = end
        if kind == b"IEND":
            break
    return chunks


def _clean_png(raw: bytes) -> bytes:
    kept = [chunk for kind, chunk in _png_chunks(raw) if kind in _PNG_KEPT]
    return _PNG_SIGNATURE + b"".join(kept)


def _png_findings(raw: bytes) -> list[str]:
    chunks = _png_chunks(raw)
    found = [kind.decode("latin-1") for kind, _ in chunks if kind not in _PNG_KEPT]
    consumed = len(_PNG_SIGNATURE) + sum(len(chunk) for _, chunk in chunks)
    if consumed < len(raw):
        found.append("data after IEND")
    return sorted(set(found))


# --------------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------------

_RST = frozenset(range(0xD0, 0xD8))


def _jpeg_segments(raw: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """``[(marker, bytes)]`` from SOI to EOI (entropy-coded data attached to its SOS) and the
    offset just after EOI."""
    if not raw.startswith(b"\xff\xd8"):
        raise CorruptImageError("The JPEG file does not start with SOI; export it again.")
    segments: list[tuple[int, bytes]] = [(0xD8, b"\xff\xd8")]
    pos = 2
    n = len(raw)
    while pos < n:
        if raw[pos] != 0xFF:
            raise CorruptImageError("The JPEG file is damaged (no marker where one is due).")
        while pos + 1 < n and raw[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            break
        marker = raw[pos + 1]
        if marker == 0xD9:
            segments.append((marker, b"\xff\xd9"))
            return segments, pos + 2
        if marker in _RST or marker == 0x01:
            segments.append((marker, raw[pos : pos + 2]))
            pos += 2
            continue
        if pos + 4 > n:
            break
        (length,) = struct.unpack(">H", raw[pos + 2 : pos + 4])
        end = pos + 2 + length
        if marker == 0xDA:  # start of scan: the entropy-coded data runs to the next marker
            scan = end
            while scan + 1 < n:
                if raw[scan] == 0xFF and raw[scan + 1] != 0x00 and raw[scan + 1] not in _RST:
                    break
                scan += 1
            end = scan if scan + 1 < n else n
        segments.append((marker, raw[pos:end]))
        pos = end
    return segments, n  # no EOI: Pillow tolerated it; keep what was there


def _jpeg_orientation(raw: bytes) -> int:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: decoding ignores it too
        return 1


def _minimal_app(marker: int, segment: bytes, orientation: int) -> bytes | None:
    """The part of an APPn segment decoding needs, rebuilt; None to drop it."""
    payload = segment[4:]
    if marker == 0xE0 and payload.startswith(b"JFIF\x00") and len(payload) >= 14:
        body = payload[:12] + b"\x00\x00"  # version, units, density; no thumbnail
    elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
        body = payload[:12]  # version, flags, colour transform
    elif marker == 0xE1 and payload.startswith(b"Exif\x00\x00") and orientation != 1:
        from PIL import Image

        exif = Image.Exif()
        exif[0x0112] = orientation
        body = exif.tobytes()
    else:
        return None
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body


def _clean_jpeg(raw: bytes) -> bytes:
    orientation = _jpeg_orientation(raw)
    segments, _end = _jpeg_segments(raw)
    out = bytearray()
    exif_written = False
    for marker, segment in segments:
        if 0xE0 <= marker <= 0xEF:
            if marker == 0xE1 and exif_written:
                continue
            rebuilt = _minimal_app(marker, segment, orientation)
            if rebuilt is not None:
                exif_written = exif_written or marker == 0xE1
                out += rebuilt
            continue
        if marker == 0xFE:  # COM
            continue
        out += segment
    return bytes(out)


def _jpeg_findings(raw: bytes) -> list[str]:
    segments, end = _jpeg_segments(raw)
    found: list[str] = []
    for marker, segment in segments:
        if marker == 0xFE:
            found.append("COM")
        elif 0xE0 <= marker <= 0xEF:
            rebuilt = _minimal_app(marker, segment, _jpeg_orientation(raw))
            if rebuilt != segment:
                found.append(f"APP{marker - 0xE0}")
    if end < len(raw):
        found.append("data after EOI")
    return sorted(set(found))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def clean_for_storage(data: bytes) -> bytes:
    """The upload reduced to what decoding needs, in its own format (see the module doc).

    Deterministic (the same upload always gives the same bytes, so duplicates are found by
    hash) and pixel-exact (``decode_image`` gives the same array before and after).

    Raises:
        DeidentificationError: the file cannot be made safe (burned-in text), or the checker
            still finds identifying content after cleaning (HTTP 422; never store it).
        CorruptImageError / UnsupportedImageError: not a readable PNG, JPEG or DICOM.
    """
    raw = read_bytes(data)
    fmt = format_or_raise(raw)
    try:
        if fmt is ImageFormat.DICOM:
            cleaned = _clean_dicom(raw)
        elif fmt is ImageFormat.PNG:
            cleaned = _clean_png(raw)
        else:
            cleaned = _clean_jpeg(raw)
    except (DeidentificationError, CorruptImageError):
        raise
    except Exception as exc:
        raise DeidentificationError(
            f"The {fmt.name} file cannot be cleaned for storage ({exc.__class__.__name__}: "
            f"{safe_message(exc, 200)}); convert it to PNG and upload it again."
        ) from exc
    remaining = find_identifying_content(cleaned)
    if remaining:  # never store what we could not clean
        logger.warning("upload refused: content left after cleaning", extra={"found": remaining})
        raise DeidentificationError(
            f"The {fmt.name} file still holds content that may identify the patient after "
            f"cleaning ({', '.join(remaining[:10])}); convert the image to PNG and upload it "
            "again."
        )
    return cleaned


def find_identifying_content(data: bytes) -> list[str]:
    """Names of what ``data`` holds beyond what :func:`clean_for_storage` keeps (empty when
    clean): DICOM attributes outside the allow-list, file meta extras and a non-zero preamble;
    PNG ancillary chunks; JPEG COM and APPn segments beyond the minimal ones; trailing data."""
    raw = read_bytes(data)
    fmt = format_or_raise(raw)
    if fmt is ImageFormat.DICOM:
        return _dicom_findings(raw)
    if fmt is ImageFormat.PNG:
        return _png_findings(raw)
    return _jpeg_findings(raw)
