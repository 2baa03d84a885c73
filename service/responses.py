"""Result answers and the lifetime of their files.

A synchronous request's work folder (upload, mask) is removed once its answer is sent, or
once the worker still using it finishes (timeout); a job's result stays in the job's folder,
which the job store removes.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .models import OutputFormat
from .pipeline import MEDIA_TYPES, SegmentationOutput


class TempFileResponse(FileResponse):
    """A file download that removes its work folder once sent (or once sending failed)."""

    def __init__(self, path: Path, cleanup: Path | None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._cleanup is not None:
                shutil.rmtree(self._cleanup, ignore_errors=True)


def result_response(output: SegmentationOutput, stem: str, cleanup: Path | None) -> Response:
    """The answer for ``output``: the JSON summary, or the mask file named ``{stem}_seg.{fmt}``.

    Args:
        output: what the segmentation produced.
        stem: download name stem (already reduced to safe characters).
        cleanup: folder to remove once the answer is sent (``None``: keep it, e.g. a job's).
    """
    if output.format is OutputFormat.json:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        return JSONResponse(output.summary.model_dump(mode="json"))
    warnings = output.summary.warnings
    return TempFileResponse(
        output.path, cleanup, media_type=MEDIA_TYPES[output.format],
        filename=f"{stem}_seg.{output.format.value}",
        headers={"X-Input-Warnings": str(len(warnings))} if warnings else None,
    )


def remove_when_done(future: Future | None, folder: Path) -> None:
    """Remove ``folder`` now, or when the worker still using it finishes."""
    if future is None or future.done():
        shutil.rmtree(folder, ignore_errors=True)
    else:
        future.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))
