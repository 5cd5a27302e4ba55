"""The test side of `app.dicom.orthanc`: skip with the reason when Orthanc is absent, fail
under `CXR_REQUIRE_SERVICES=1` (`tests.conftest._missing`)."""

from __future__ import annotations

from pathlib import Path

from app.dicom.orthanc import INSTALL_HINT, Orthanc, OrthancMissingError, find_orthanc
from tests.conftest import _missing

__all__ = ["Orthanc", "orthanc_or_skip"]


def orthanc_or_skip() -> tuple[str, Path]:
    """The Orthanc binary and its DICOMweb plugin, or skip/fail saying how to install them."""
    try:
        return find_orthanc()
    except OrthancMissingError:
        _missing("Orthanc with its DICOMweb plugin", INSTALL_HINT)
        raise
