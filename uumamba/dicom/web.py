"""A DICOMweb client for ``uumamba pacs``: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Built on dicomweb-client (PS3.18 §10.4 QIDO-RS "Search for series", §10.4 WADO-RS "Retrieve
series", §10.5 STOW-RS "Store instances"). Every request has a timeout; the server's and the
network's failures become one-line :class:`~uumamba.errors.UserError` messages naming the
server and what was asked: 404 (study or series not found), 401 / 403 (credentials), other
HTTP statuses, connection refused, timeouts, and a STOW-RS response listing failed instances
(PS3.18 §10.5.3: Failed SOP Sequence).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from uumamba.data.dicom_series import DicomLimits
from uumamba.errors import UserError

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_uid(uid: object, what: str) -> str:
    """``uid`` when it follows the DICOM UID grammar (PS3.5 §9.1: digits and dots, at most
    64 characters), before it is used in a request or a path.

    Raises:
        UserError: anything else (``what`` says where it came from; the value is shown
            truncated and escaped).
    """
    text = uid if isinstance(uid, str) else ""
    if not text or len(text) > 64 or not _UID_RE.fullmatch(text):
        shown = repr(uid)[:70] + ("..." if len(repr(uid)) > 70 else "")
        raise UserError(f"{what} {shown} is not a DICOM UID (digits and dots, at most 64 "
                        "characters; PS3.5 9.1)")
    return text


def uid_folder(uid: str) -> str:
    """A folder name for a (checked) UID: a short hash, whatever the server sent."""
    return "series_" + hashlib.sha256(uid.encode()).hexdigest()[:16]


#: Modalities of series that hold no image to segment (PS3.3 §C.7.3.1.1.1).
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "REG"})


class PacsClient:
    """DICOMweb access to one server.

    Args:
        url: the DICOMweb root (e.g. ``http://127.0.0.1:8042/dicom-web``).
        user / password: HTTP basic credentials, or None.
        timeout: seconds for connecting and for each read.
        limits: caps on the instances one retrieve may bring (file count and bytes).
    """

    def __init__(self, url: str, user: str | None = None, password: str | None = None,
                 timeout: float = 60.0, limits: DicomLimits | None = None) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        if not url.startswith(("http://", "https://")):
            raise UserError(f"--url {url}: expected an http:// or https:// DICOMweb root")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.limits = limits or DicomLimits()
        session = requests.Session()
        if user is not None:
            session.auth = (user, password or "")
        self._client = DICOMwebClient(self.url, session=session, timeout=(timeout, timeout))
        # dicomweb-client retries every failed request (refused connections and timeouts
        # included) 5 times with exponential back-off (2 + 4 + 8 + 16 s); one attempt each
        # keeps failures prompt and the timeout what --timeout says.
        self._client.set_http_retry_params(retry=False)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn requests' and dicomweb-client's exceptions into one-line UserErrors."""
        import requests

        try:
            yield
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 404:
                raise UserError(f"{self.url}: {what}: not found on the server (HTTP 404)") from None
            if status in (401, 403):
                raise UserError(f"{self.url}: {what}: access denied (HTTP {status}); check "
                                "--user / --password") from None
            raise UserError(f"{self.url}: {what}: the server answered HTTP {status}") from None
        except requests.Timeout:
            raise UserError(f"{self.url}: {what}: no answer within {self.timeout:g} s") from None
        except requests.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
            raise UserError(f"{self.url}: {what}: {reason}") from None
        except requests.RequestException as exc:
            if isinstance(exc, ValueError):  # requests.JSONDecodeError: a malformed answer
                raise UserError(f"{self.url}: {what}: the server's answer is not valid "
                                "DICOMweb (JSONDecodeError)") from None
            raise UserError(f"{self.url}: {what}: {type(exc).__name__}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # dicomweb-client parsing a malformed answer (multipart, JSON, DICOM)
            raise UserError(f"{self.url}: {what}: the server's answer is not valid DICOMweb "
                            f"({type(exc).__name__})") from None

    def image_series(self, study: str) -> list[str]:
        """SeriesInstanceUIDs of the study's image series (SEG, SR, ... left out).

        Raises:
            UserError: the study does not exist or the request failed.
        """
        study = check_uid(study, "study")
        with self._errors(f"search series of study {study}"):
            found = self._client.search_for_series(study_instance_uid=study)
        if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
            raise UserError(f"{self.url}: search series of study {study}: the server's answer "
                            "is not a list of DICOM JSON objects")
        if not found:
            raise UserError(f"{self.url}: study {study}: not found on the server (no series)")
        uids = []
        for item in found:
            try:
                modality = (item.get("00080060", {}).get("Value") or [""])[0]
                uid = (item.get("0020000E", {}).get("Value") or [""])[0]
            except (AttributeError, TypeError, IndexError, KeyError):
                raise UserError(f"{self.url}: study {study}: the server's series list is not "
                                "valid DICOM JSON") from None
            if uid and modality not in NON_IMAGE_MODALITIES:
                uids.append(check_uid(uid, f"{self.url}: study {study}: the server's SeriesInstanceUID"))
        if not uids:
            raise UserError(f"{self.url}: study {study} has no image series to segment")
        return uids

    def retrieve_series(self, study: str, series: str, dest: Path) -> list[Path]:
        """Retrieve every instance of a series into ``dest`` (``NNNNNN.dcm``), streaming.

        Raises:
            UserError: not found, request failed, no instances, or more instances / bytes than
                ``limits`` allow.
        """
        study = check_uid(study, "study")
        series = check_uid(series, "series")
        dest.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        total = 0
        what = f"retrieve series {series} of study {study}"
        with self._errors(what):
            for k, ds in enumerate(self._client.iter_series(study, series)):
                if k >= self.limits.max_files:
                    raise UserError(f"{self.url}: {what}: more than {self.limits.max_files} instances")
                path = dest / f"{k:06d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                total += path.stat().st_size
                if total > self.limits.max_total_bytes:
                    raise UserError(f"{self.url}: {what}: more than {self.limits.max_total_bytes} bytes")
                written.append(path)
        if not written:
            raise UserError(f"{self.url}: {what}: the server returned no instances")
        return written

    def store(self, paths: Sequence[Path]) -> list[str]:
        """Store files in one STOW-RS request; return the stored SOPInstanceUIDs.

        Raises:
            UserError: the request failed or the server reports failed instances.
        """
        import pydicom

        datasets = [pydicom.dcmread(p) for p in paths]
        with self._errors(f"store {len(datasets)} instance(s)"):
            response = self._client.store_instances(datasets)
        failed = list(response.get("FailedSOPSequence", []) or []) if response is not None else []
        if failed:
            uids = ", ".join(str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed)
            raise UserError(f"{self.url}: the server refused {len(failed)} instance(s): {uids}")
        return [str(ds.SOPInstanceUID) for ds in datasets]
