"""Where DICOM results go: `CXR_DICOM_DESTINATION=AET@host:port` (C-STORE) or `CXR_DICOMWEB_URL`
(STOW-RS). Parsed in one place so settings validation, the outbox and the CLI agree."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DicomNode", "parse_dicom_destination"]


@dataclass(frozen=True)
class DicomNode:
    """A DICOM application entity reachable over the network."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_dicom_destination(value: str) -> DicomNode:
    """`AET@host:port` as a `DicomNode`; ValueError saying the expected form otherwise."""
    form = "use the form AET@host:port, e.g. ORTHANC@pacs.example.org:4242"
    aet, sep, address = value.strip().partition("@")
    host, colon, port_text = address.rpartition(":")
    if not sep or not colon or not aet or not host:
        raise ValueError(f"CXR_DICOM_DESTINATION {value!r} is not valid: {form}")
    if len(aet) > 16 or not aet.isascii() or "\\" in aet:
        raise ValueError(f"AE title {aet!r} must be 1-16 ASCII characters without '\\': {form}")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"CXR_DICOM_DESTINATION port {port_text!r} is not a TCP port: {form}")
    return DicomNode(ae_title=aet, host=host.strip("[]"), port=port)
