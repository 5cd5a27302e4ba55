"""Run a private Orthanc (Debian `orthanc` + `orthanc-dicomweb`) from its own `config.json`.

Used by `cxr bench dicom` and the end-to-end tests: free ports, its own storage and index
directories, DICOMweb enabled, the modalities it may send to; stopped (and restartable on the
same ports and storage, to play a PACS that goes away and comes back). Not for production: a
real deployment points at the hospital's PACS, or the compose `pacs` profile.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Orthanc", "OrthancMissingError", "find_orthanc"]

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
INSTALL_HINT = "install it with `apt-get install orthanc orthanc-dicomweb`"


class OrthancMissingError(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed."""


def find_orthanc() -> tuple[str, Path]:
    """The Orthanc binary and its DICOMweb plugin; OrthancMissingError saying how to install."""
    binary = shutil.which("Orthanc")
    plugin = next(
        (
            d / "libOrthancDicomWeb.so"
            for d in PLUGIN_DIRS
            if (d / "libOrthancDicomWeb.so").exists()
        ),
        None,
    )
    if binary is None or plugin is None:
        raise OrthancMissingError(
            f"Orthanc with its DICOMweb plugin is not installed: {INSTALL_HINT}"
        )
    return binary, plugin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Orthanc:
    """One Orthanc process. `modalities`: name -> (AET, host, port) it may send to."""

    def __init__(self, root: Path, *, modalities: dict[str, tuple[str, str, int]] | None = None):
        self.binary, self.plugin = find_orthanc()
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = "ORTHANC"
        self.modalities = modalities or {}
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def _config(self) -> Path:
        config = {
            "Name": "cxr-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 60,
            "StableAge": 1,
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "DicomModalities": {name: list(m) for name, m in self.modalities.items()},
        }
        path = self.root / "config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 60.0) -> Orthanc:
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, str(self._config())], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited; see {self.root / 'orthanc.log'}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    # -- REST ----------------------------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=60, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, data: bytes) -> str:
        """Store a DICOM file; its Orthanc instance id."""
        response = httpx.post(f"{self.url}/instances", content=data, timeout=60)
        response.raise_for_status()
        return str(response.json()["ID"])

    def send_to_modality(self, modality: str, instance_id: str) -> Any:
        """Orthanc C-STOREs the instance to a configured modality (synchronously)."""
        response = httpx.post(
            f"{self.url}/modalities/{modality}/store",
            json={"Resources": [instance_id], "Synchronous": True},
            timeout=300,
        )
        return response

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Tags of every instance of the study (empty when Orthanc does not know it)."""
        found = httpx.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            timeout=60,
        ).json()
        return [
            {**self.get(f"/instances/{i['ID']}/simplified-tags").json(), "ID": i["ID"]}
            for i in found
        ]

    def file(self, instance_id: str) -> bytes:
        return bytes(self.get(f"/instances/{instance_id}/file").content)

    def qido_instances(self, study_uid: str, **query: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.dicomweb_url}/studies/{study_uid}/instances",
            params=query,
            headers={"Accept": "application/dicom+json"},
            timeout=60,
        )
        response.raise_for_status()
        return response.json() if response.content else []
