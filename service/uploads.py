"""Receive one uploaded volume: stream a multipart body to a temporary file under a size limit.

The body is ``multipart/form-data`` (RFC 7578) with the volume in the field ``file``, what
``curl -F file=@case.nii.gz`` and ``requests``/``httpx`` ``files=`` send; optionally a second
phase of the same patient in ``file_es`` (``file`` is then ED), for the clinical indices. Both
files together are held to the one size limit, and each is checked like the first.

The body is parsed while it arrives (``python-multipart``'s streaming parser), so an oversize
upload is refused after at most ``max_bytes`` have been written to disk and nothing is held in
memory beyond one network chunk. The client's file name only decides the *format* (its
extension, checked against an allow-list); the file on disk always gets a generated name.

Errors are :class:`UploadRejected` with the HTTP status to answer: 413 (too large: the file
part, or the whole body of any transfer encoding, chunked included), 415 (not multipart,
unknown extension, or content that is not the format the extension names), 422 (malformed
form, no ``file`` field, empty file, too many parts; part headers are capped by
python-multipart's ``max_header_size`` / ``max_header_count``), 408 (the body did not arrive
within the upload deadline), 400 (client disconnected).
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

#: Extensions accepted for upload, longest first so ``.nii.gz`` wins over ``.gz``; ``.zip``
#: holds one DICOM series (unpacked by :func:`uumamba.dicom.cases.materialize_upload`).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nrrd", ".nii", ".mha", ".zip")

#: Allowance for the multipart envelope (boundaries, part headers) on top of the file limit.
FORM_OVERHEAD_BYTES = 64 * 1024

_FIELD_LIMIT_BYTES = 4096
#: Multipart fields that carry a volume: the (ED) phase and an optional ES phase.
_FILE_FIELDS = ("file", "file_es")
_MAX_PARTS = 16


class UploadRejected(Exception):
    """An upload that cannot be accepted; ``status_code`` is the HTTP answer, ``detail`` says why."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class ReceivedUpload:
    """A validated upload on disk.

    Attributes:
        path: generated file name inside the request's work folder, ending in ``suffix``.
        suffix: the accepted extension (``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``).
        size_bytes: bytes of the file part.
        stem: the client's file stem reduced to ``[A-Za-z0-9._-]`` (for download names only;
            never a path), ``"volume"`` when nothing is left.
        es: the second volume (field ``file_es``, the ES phase) when one was sent.
    """

    path: Path
    suffix: str
    size_bytes: int
    stem: str
    es: ReceivedUpload | None = None


def image_suffix(filename: str) -> str:
    """Return the allowed extension of ``filename`` (case-insensitive).

    Raises:
        UploadRejected: 415 when the name ends in none of :data:`IMAGE_SUFFIXES`.
    """
    lowered = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    allowed = ", ".join(IMAGE_SUFFIXES)
    raise UploadRejected(415, f"unsupported file extension of {safe_stem(filename)!r}: expected one of {allowed}")


def safe_stem(filename: str) -> str:
    """The base name of ``filename`` without image extension, keeping only ``[A-Za-z0-9._-]``."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    lowered = base.lower()
    for suffix in IMAGE_SUFFIXES:
        if lowered.endswith(suffix):
            base = base[: len(base) - len(suffix)]
            break
    kept = "".join(c for c in base if c.isascii() and (c.isalnum() or c in "._-")).strip(".")
    return kept[:100] or "volume"


class _FormSink:
    """Multipart parser callbacks: the ``file`` part goes to ``dest``, small fields are dropped."""

    def __init__(self, dest_dir: Path, max_bytes: int) -> None:
        self.dest_dir = dest_dir
        self.max_bytes = max_bytes
        self.upload: ReceivedUpload | None = None
        self.upload_es: ReceivedUpload | None = None
        self._field = ""
        self._total = 0
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._suffix = ""
        self._stem = ""
        self._size = 0
        self._field_size = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._parts = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._field_size = 0
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise UploadRejected(422, f"multipart body has more than {_MAX_PARTS} parts")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if name not in _FILE_FIELDS:
            if b"filename" in options:
                raise UploadRejected(422, f"file part is named {safe_stem(name)!r}; send the volume in the field 'file' (and a second phase in 'file_es')")
            return  # an ordinary form field; its value is ignored
        if (self.upload if name == "file" else self.upload_es) is not None or self._field == name:
            raise UploadRejected(422, f"multipart body has more than one {name!r} part; upload one volume per field")
        if b"filename" not in options:
            raise UploadRejected(422, f"multipart part {name!r} has no filename; send it as a file upload")
        client_name = options[b"filename"].decode("utf-8", errors="replace")
        self._field = name
        self._suffix = image_suffix(client_name)
        self._stem = safe_stem(client_name)
        self._size = 0
        self._path = self.dest_dir / (f"upload{self._suffix}" if name == "file"
                                      else f"upload_es{self._suffix}")
        self._file = open(self._path, "wb")  # closed in _on_part_end / close()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._file is None:
            self._field_size += n
            if self._field_size > _FIELD_LIMIT_BYTES:
                raise UploadRejected(422, f"a form field is longer than {_FIELD_LIMIT_BYTES} bytes")
            return
        self._size += n
        self._total += n  # both files together are held to the one limit
        if self._total > self.max_bytes:
            raise UploadRejected(413, f"upload is larger than the limit of {_mib(self.max_bytes)}")
        self._file.write(data[start:end])

    def _on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            received = ReceivedUpload(self._path, self._suffix, self._size, self._stem)
            if self._field == "file":
                self.upload = received
            else:
                self.upload_es = received
            self._field = ""

    def close(self) -> None:
        """Close a half-written file (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / (1024 * 1024):g} MiB"


def check_content_length(request: Request, max_bytes: int) -> None:
    """Refuse a body whose declared ``Content-Length`` already exceeds the limit (413).

    Raises:
        UploadRejected: 413 when too large, 400 when the header is not an integer.
    """
    declared = request.headers.get("content-length")
    if declared is None:
        return  # chunked transfer: counted while streaming
    try:
        length = int(declared)
    except ValueError:
        raise UploadRejected(400, f"Content-Length {declared!r} is not an integer") from None
    if length > max_bytes + FORM_OVERHEAD_BYTES:
        raise UploadRejected(413, f"upload of {_mib(length)} is larger than the limit of {_mib(max_bytes)}")


async def receive_upload(request: Request, dest_dir: Path, max_bytes: int,
                         timeout_s: float | None = None) -> ReceivedUpload:
    """Stream the multipart field ``file`` of ``request`` into ``dest_dir`` and sniff its format.

    Args:
        request: a ``multipart/form-data`` request with one file part named ``file``.
        dest_dir: an existing private folder; the file is written as ``upload<suffix>``.
        max_bytes: largest accepted file size in bytes; the whole body may be at most
            ``max_bytes + FORM_OVERHEAD_BYTES`` whatever its transfer encoding.
        timeout_s: seconds the whole body may take to arrive (``None``: no deadline).

    Returns:
        The :class:`ReceivedUpload` (file closed, format checked by :func:`sniff_format`).

    Raises:
        UploadRejected: 413 / 415 / 422 / 400 as described in the module docstring. The
            caller removes ``dest_dir``; a partly written file is closed first.
    """
    check_content_length(request, max_bytes)
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UploadRejected(415, "request body must be multipart/form-data with the volume in the field 'file'")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRejected(422, "multipart/form-data Content-Type has no boundary")

    sink = _FormSink(dest_dir, max_bytes)
    parser = MultipartParser(boundary, sink.callbacks())
    body_cap = max_bytes + FORM_OVERHEAD_BYTES

    async def pump() -> None:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_cap:
                raise UploadRejected(413, f"upload is larger than the limit of {_mib(max_bytes)}")
            parser.write(chunk)
        parser.finalize()

    try:
        if timeout_s is None:
            await pump()
        else:
            await asyncio.wait_for(pump(), timeout=timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise UploadRejected(408, f"upload did not complete within {timeout_s:g} s") from None
    except MultipartParseError as exc:
        raise UploadRejected(422, f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise UploadRejected(400, "client disconnected during the upload") from None
    finally:
        sink.close()
    if sink.upload is None:
        raise UploadRejected(422, "multipart body has no complete file part named 'file'")
    if sink.upload.size_bytes == 0:
        raise UploadRejected(422, "uploaded file is empty")
    sniff_format(sink.upload.path, sink.upload.suffix)
    if sink.upload_es is not None:
        if sink.upload_es.size_bytes == 0:
            raise UploadRejected(422, "uploaded file 'file_es' is empty")
        sniff_format(sink.upload_es.path, sink.upload_es.suffix)
        return replace(sink.upload, es=sink.upload_es)
    return sink.upload


def sniff_format(path: Path, suffix: str) -> None:
    """Check that the first bytes of ``path`` are what its extension says.

    NIfTI-1/2 (``sizeof_hdr`` 348 / 540 and the single-file ``n+1`` / ``n+2`` magic), gzip
    (``1f 8b``) wrapping NIfTI, NRRD (``NRRD000`` magic line), MetaImage ``.mha`` (text header
    with ``NDims`` and ``ElementDataFile``).

    Raises:
        UploadRejected: 415 when the content is another format; 422 when a ``.nii.gz`` is
            gzip but too short or corrupt to hold a NIfTI header.
    """
    with open(path, "rb") as f:
        head = f.read(65536)
    if suffix == ".nii.gz":
        if head[:2] != b"\x1f\x8b":
            raise UploadRejected(415, "file named .nii.gz is not gzip-compressed")
        try:
            with gzip.open(path, "rb") as g:
                header = g.read(548)
        except (OSError, EOFError, zlib.error) as exc:
            raise UploadRejected(422, f"gzip stream of the .nii.gz upload is unreadable or truncated: {exc}") from None
        if len(header) < 348:
            raise UploadRejected(422, f"truncated NIfTI: only {len(header)} bytes after decompression")
        if not _is_nifti(header):
            raise UploadRejected(415, "gzip content of the .nii.gz upload is not a NIfTI image")
    elif suffix == ".nii":
        if len(head) >= 348 and not _is_nifti(head):
            raise UploadRejected(415, "file named .nii is not a NIfTI image (bad header magic)")
        if len(head) < 348:
            raise UploadRejected(422, f"truncated NIfTI: only {len(head)} bytes")
    elif suffix == ".nrrd":
        if not head.startswith(b"NRRD000"):
            raise UploadRejected(415, "file named .nrrd does not start with the NRRD magic line")
    elif suffix == ".mha":
        if b"NDims" not in head or b"ElementDataFile" not in head:
            raise UploadRejected(415, "file named .mha has no MetaImage header (NDims, ElementDataFile)")
    elif suffix == ".zip":
        if not head.startswith(b"PK\x03\x04"):
            raise UploadRejected(415, "file named .zip is not a zip archive (no local file header)")


def _is_nifti(header: bytes) -> bool:
    size_le = int.from_bytes(header[:4], "little")
    size_be = int.from_bytes(header[:4], "big")
    if 348 in (size_le, size_be):
        return header[344:348] == b"n+1\x00"
    if 540 in (size_le, size_be) and len(header) >= 12:
        return header[4:8] == b"n+2\x00"
    return False
