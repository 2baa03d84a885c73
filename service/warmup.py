"""Warm-up of a loaded predictor: one synthetic volume segmented before the first request,
so that one-time costs (numba compilation of the CPU scan, cuDNN autotuning) are not paid by
a client. Used by the API process (:mod:`uumamba_service.lifespan`) and by ``uumamba worker``
processes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from uumamba.model_folder import ModelFolder

from .observability import logger


def warm_up(predictor: Any, model_dir: Path, work_root: Path | None = None) -> None:
    """Segment one smooth-noise volume of the patch size at the target spacing (discarded).

    ``work_root``: folder for the temporary volume (``None``: a temporary folder).
    """
    if work_root is None:
        with tempfile.TemporaryDirectory(prefix="uumamba-warmup-") as scratch:
            return warm_up(predictor, model_dir, Path(scratch))
    import nibabel as nib
    import numpy as np

    plans = ModelFolder(model_dir).load_plans()
    shape = list(plans.patch_size)
    if plans.spatial_dims == 2:
        shape.insert(plans.slice_axis, 2)
    # smooth noise: image-like enough (neighbour correlation ~0.9) not to trip the input check
    from scipy.ndimage import gaussian_filter

    volume = gaussian_filter(np.random.default_rng(0).random(shape, dtype=np.float32), 2.0)
    path = work_root / "warmup.nii.gz"
    try:
        nib.save(nib.Nifti1Image(volume, np.diag([*plans.target_spacing, 1.0])), str(path))
        start = time.perf_counter()
        predictor.predict_file(path)
        logger.info("warm-up done", extra={"fields": {"seconds": round(time.perf_counter() - start, 3),
                                                       "shape": shape}})
    finally:
        path.unlink(missing_ok=True)
