"""Talking to a PACS over DICOMweb (the `dicom` extra: dicomweb-client): QIDO-RS queries,
WADO-RS retrieval, STOW-RS storage. Every failure becomes a `PacsError` that names the PACS, what
was asked and what came back (not reachable, an HTTP status with the server's reason, an answer
that is not DICOM), so a scanner's log says what to fix.

    pacs = DicomwebPacs("http://pacs:8042/dicom-web")
    refs = pacs.ct_series(study_uid)            # [SeriesRef], the study's CT series (QIDO-RS)
    datasets = pacs.retrieve_series(refs[0])    # every instance, checked against the query's count (WADO-RS)
    pacs.store(seg_dataset, study_uid)          # STOW-RS; refused or failed instances are an error
    pacs.instances_of_series(study, series)     # QIDO-RS: SOPInstanceUIDs (e.g. to check a stored SEG)
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PacsError, require

# DICOM JSON tags (PS3.18 F.2)
MODALITY, SERIES_UID, SOP_UID, N_INSTANCES = "00080060", "0020000E", "00080018", "00201209"
SERIES_NUMBER, SERIES_DESCRIPTION = "00200011", "0008103E"
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"


@dataclass
class SeriesRef:
    """A series found by a QIDO-RS query."""
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instances: int | None           # NumberOfSeriesRelatedInstances, when the PACS gives it
    description: str = ""
    number: int | None = None


def _value(item: dict, tag: str, default=None):
    values = (item.get(tag) or {}).get("Value")
    return values[0] if values else default


class DicomwebPacs:
    """A DICOMweb service at `url` (its root, e.g. http://host:8042/dicom-web).

    timeout: seconds per HTTP request. retries: attempts after a 429/503/504 (0: fail at once)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 0, headers: dict | None = None):
        require("dicomweb_client", extra="dicom", purpose="DICOMweb (--dicomweb)")
        from dicomweb_client.api import DICOMwebClient

        if not str(url).startswith(("http://", "https://")):
            raise PacsError(f"DICOMweb URL {url!r}: must start with http:// or https://")
        self.url = str(url).rstrip("/")
        self.client = DICOMwebClient(self.url, timeout=timeout, headers=headers)
        self.client.set_http_retry_params(retry=retries > 0, max_attempts=max(1, int(retries) + 1),
                                          wait_exponential_multiplier=200)

    # ------------------------------------------------------------------ errors

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one DICOMweb call; turn whatever goes wrong into a PacsError naming `what`."""
        import requests

        try:
            return fn(*args, **kwargs)
        except PacsError:
            raise
        except requests.exceptions.HTTPError as exc:
            response = exc.response
            status = getattr(response, "status_code", "?")
            reason = getattr(response, "reason", "") or ""
            body = ""
            try:
                body = (response.text or "").strip().replace("\n", " ")[:200]
            except Exception:  # noqa: BLE001 - a body we cannot read is not worth a second error
                pass
            raise PacsError(f"PACS {self.url}: {what} failed: HTTP {status} {reason}" + (f" ({body})" if body else "")) \
                from exc
        except requests.exceptions.ConnectionError as exc:
            raise PacsError(f"PACS {self.url}: not reachable for {what} ({_short(exc)}); is the PACS running, and is "
                            "the URL its DICOMweb root?") from exc
        except requests.exceptions.Timeout as exc:
            raise PacsError(f"PACS {self.url}: no answer in time to {what} ({_short(exc)})") from exc
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"PACS {self.url}: {what} failed ({type(exc).__name__}: {_short(exc)})") from exc
        except Exception as exc:  # noqa: BLE001 - a malformed answer (not JSON, broken multipart, not DICOM)
            if type(exc).__name__ == "RetryError":
                raise PacsError(f"PACS {self.url}: {what} failed after retries ({_short(exc)})") from exc
            raise PacsError(f"PACS {self.url}: {what}: the answer could not be read ({type(exc).__name__}: "
                            f"{_short(exc)})") from exc

    # ------------------------------------------------------------------ QIDO-RS

    def series_of_study(self, study_instance_uid: str) -> list[SeriesRef]:
        """Every series of the study (QIDO-RS /studies/{uid}/series)."""
        found = self._call(f"QIDO-RS query of the series of study {study_instance_uid}",
                           self.client.search_for_series, study_instance_uid=study_instance_uid,
                           fields=["Modality", "NumberOfSeriesRelatedInstances", "SeriesNumber",
                                   "SeriesDescription"])
        out = []
        for item in found or []:
            n = _value(item, N_INSTANCES)
            number = _value(item, SERIES_NUMBER)
            out.append(SeriesRef(study_instance_uid, str(_value(item, SERIES_UID, "")), str(_value(item, MODALITY, "")),
                                 int(n) if n is not None else None, str(_value(item, SERIES_DESCRIPTION, "") or ""),
                                 int(number) if number not in (None, "") else None))
        return out

    def ct_series(self, study_instance_uid: str, series_instance_uids=None) -> list[SeriesRef]:
        """The CT series of a study to segment: those named (each must exist and be CT), or every CT
        series of the study. A study that is not there, or holds no CT series, is a PacsError."""
        all_series = self.series_of_study(study_instance_uid)
        if not all_series:
            raise PacsError(f"PACS {self.url}: study {study_instance_uid} not found (QIDO-RS found no series in it)")
        by_uid = {s.series_instance_uid: s for s in all_series}
        if series_instance_uids:
            chosen = []
            for uid in series_instance_uids:
                if uid not in by_uid:
                    raise PacsError(f"PACS {self.url}: study {study_instance_uid} has no series {uid} (it has "
                                    f"{len(all_series)}: {_listing(all_series)})")
                if by_uid[uid].modality != "CT":
                    raise PacsError(f"PACS {self.url}: series {uid} of study {study_instance_uid} is "
                                    f"{by_uid[uid].modality or 'of no modality'}, not CT; the models segment CT")
                chosen.append(by_uid[uid])
            return chosen
        chosen = [s for s in all_series if s.modality == "CT"]
        if not chosen:
            raise PacsError(f"PACS {self.url}: study {study_instance_uid} holds no CT series ({_listing(all_series)})")
        return chosen

    def instances_of_series(self, study_instance_uid: str, series_instance_uid: str) -> list[str]:
        """SOPInstanceUIDs of a series (QIDO-RS)."""
        found = self._call(f"QIDO-RS query of the instances of series {series_instance_uid}",
                           self.client.search_for_instances, study_instance_uid=study_instance_uid,
                           series_instance_uid=series_instance_uid, fields=["SOPInstanceUID"])
        return [str(_value(item, SOP_UID, "")) for item in found or []]

    # ------------------------------------------------------------------ WADO-RS

    def retrieve_series(self, ref: SeriesRef) -> list:
        """Every instance of the series (WADO-RS), as pydicom datasets. Fewer (or more) instances
        than the PACS reports for the series, or duplicates, are a PacsError: a partial series is
        never segmented."""
        expected = self.instances_of_series(ref.study_instance_uid, ref.series_instance_uid)
        datasets = self._call(f"WADO-RS retrieval of series {ref.series_instance_uid}", self.client.retrieve_series,
                              ref.study_instance_uid, ref.series_instance_uid)
        got = [str(ds.get("SOPInstanceUID", "")) for ds in datasets or []]
        if sorted(got) != sorted(expected) or len(set(got)) != len(got):
            missing = len(set(expected) - set(got))
            raise PacsError(f"PACS {self.url}: series {ref.series_instance_uid} is incomplete: the PACS lists "
                            f"{len(expected)} instance(s), WADO-RS returned {len(got)}" +
                            (f" ({missing} missing)" if missing else "") + "; nothing was segmented or stored")
        if ref.instances is not None and ref.instances != len(got):
            raise PacsError(f"PACS {self.url}: series {ref.series_instance_uid} reports {ref.instances} instance(s), "
                            f"WADO-RS returned {len(got)}; the series may still be arriving: try again later")
        return list(datasets)

    # ------------------------------------------------------------------ STOW-RS

    def store(self, dataset, study_instance_uid: str) -> str:
        """Store one instance into the study (STOW-RS); returns its SOPInstanceUID. A refusal (the
        response's FailedSOPSequence, or no ReferencedSOPSequence for it) is a PacsError."""
        uid = str(dataset.SOPInstanceUID)
        response = self._call(f"STOW-RS storage of instance {uid} into study {study_instance_uid}",
                              self.client.store_instances, [dataset], study_instance_uid=study_instance_uid)
        failed = list(response.get("FailedSOPSequence", []) or []) if response is not None else []
        stored = [str(item.get("ReferencedSOPInstanceUID", "")) for item in
                  (response.get("ReferencedSOPSequence", []) or [])] if response is not None else []
        if failed or uid not in stored:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed) or "not acknowledged"
            raise PacsError(f"PACS {self.url}: STOW-RS refused instance {uid} into study {study_instance_uid} "
                            f"(failure reason {reasons})")
        return uid


def _listing(series) -> str:
    return ", ".join(f"{s.modality or '?'} {s.series_instance_uid}" for s in series)


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."
