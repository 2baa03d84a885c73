"""``uumamba pacs``: retrieve a study's series from a PACS (DICOMweb), segment, store SEG back."""

from __future__ import annotations

import tempfile
from pathlib import Path

from uumamba.errors import UserError


def pacs_from_cli(url: str, study: str, model_dir: Path, output_dir: Path,
                  series: str | None = None, user: str | None = None,
                  password: str | None = None, timeout: float = 60.0,
                  frame: int | None = None, device: str = "auto") -> list[str]:
    """WADO-RS retrieve -> ``predict --format dcm`` -> one STOW-RS request with every SEG.

    The series (``series``, or every image series of ``study``) are retrieved into a
    temporary folder and segmented as :func:`uumamba.commands.predict.predict_from_cli`
    segments a DICOM folder; masks, SEG files and volumes land in ``output_dir``. Only when
    every series was segmented are the SEG objects stored, all in one request: a failure
    before that stores nothing.

    Returns:
        SOPInstanceUIDs of the stored SEG objects.

    Raises:
        UserError: a server / network failure (one line: 404, 401, refused, timeout), a
            series that cannot be segmented, or a refused store.
    """
    from uumamba.commands.predict import predict_from_cli
    from uumamba.dicom.web import PacsClient, check_uid, uid_folder

    study = check_uid(study, "--study")
    if series is not None:
        series = check_uid(series, "--series")
    client = PacsClient(url, user, password, timeout)
    uids = [series] if series else client.image_series(study)
    with tempfile.TemporaryDirectory(prefix="uumamba-pacs-") as work:
        retrieved = Path(work) / "retrieved"
        for uid in uids:
            files = client.retrieve_series(study, uid, retrieved / uid_folder(uid))
            print(f"retrieved series {uid}: {len(files)} instance(s)")
        written = predict_from_cli(model_dir, retrieved, Path(output_dir), out_format="dcm",
                                   frame=frame, device=device)
    segs = [p for p in written if p.name.endswith(".dcm")]
    if not segs:
        raise UserError(f"{url}: study {study}: nothing was segmented; nothing stored")
    stored = client.store(segs)
    print(f"stored {len(stored)} DICOM SEG object(s) on {url}: {', '.join(stored)}")
    return stored
