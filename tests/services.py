"""The real outside parts some tests need: an Orthanc PACS (DICOMweb) and dciodvfy (dicom3tools).

Under CI (`REGIONKD_CI=1`, which `.ci/run` sets) every one of them must be there: a test that
needs one and cannot find or reach it FAILS with a message saying what is missing, so a skipped
test never passes for a missing service. Elsewhere such a test is skipped with that message.

Orthanc: `.ci/run` starts one on a loopback port with a throwaway storage folder and passes its
address as REGIONKD_ORTHANC_URL (e.g. http://127.0.0.1:8042). Without that variable the tests
start a private Orthanc themselves (`Orthanc` on the PATH: Debian packages orthanc and
orthanc-dicomweb) for the session. Each test that uses it starts from an empty store (`clear()`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def under_ci() -> bool:
    return os.environ.get("REGIONKD_CI", "") not in ("", "0", "false", "no")


def need(message: str):
    """A required outside part is missing: fail under CI, skip elsewhere (with the same message)."""
    if under_ci():
        pytest.fail(f"REGIONKD_CI is set and {message}", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(storage: Path, port: int) -> dict:
    """An Orthanc on 127.0.0.1:`port` storing into `storage`, with DICOMweb at /dicom-web/, no DICOM port."""
    return {"Name": "regionkd-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": False, "HttpCompressionEnabled": False, "StableAge": 1,
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}


class Orthanc:
    """A running Orthanc: its REST root `url` and DICOMweb root `dicomweb`."""

    def __init__(self, url: str, process: subprocess.Popen | None = None):
        self.url = url.rstrip("/")
        self.dicomweb = self.url + "/dicom-web"
        self.process = process

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read().decode())

    def delete(self, path: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + path, method="DELETE"), timeout=30).read()

    def reachable(self) -> bool:
        try:
            return "Version" in self.get("/system")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def clear(self) -> None:
        """Delete everything stored: each test starts from an empty PACS."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")
        stats = self.get("/statistics")
        assert stats["CountInstances"] == 0, f"Orthanc at {self.url} still holds {stats['CountInstances']} instances"

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def start_orthanc(folder: Path) -> Orthanc:
    """Start a private Orthanc (its storage in `folder`) and wait until it answers."""
    binary = shutil.which("Orthanc")
    if binary is None or not Path(DICOMWEB_PLUGIN).is_file():
        need("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb), and "
             "REGIONKD_ORTHANC_URL names no running one")
    port = free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True)
    config = folder / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(storage, port)))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    server = Orthanc(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            need(f"Orthanc exited at start ({process.returncode}); see {folder / 'orthanc.log'}")
        if server.reachable():
            return server
        time.sleep(0.2)
    server.stop()
    need(f"Orthanc did not answer within 60 s on port {port}; see {folder / 'orthanc.log'}")


def dciodvfy(path) -> tuple[list[str], list[str], str]:
    """(errors, warnings, full output) of dicom3tools' dciodvfy on a DICOM file."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        need("dciodvfy is not installed (apt-get install dicom3tools)")
    proc = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    lines = [line.strip() for line in text.splitlines()]
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")], text
