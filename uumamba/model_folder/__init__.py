"""uumamba.model_folder: the trained-model folder (layout, reading, writing, checkpoints).

- :class:`ModelFolder` (module ``folder``): create / validate / load config, plans, labels,
  splits, postprocessing; find fold checkpoints; describe them (SHA-256);
- module ``checkpoints``: the checkpoint file (names, required keys, atomic save, safe load).
"""

from uumamba.model_folder.checkpoints import (
    BEST,
    CHECKPOINT_KEYS,
    LATEST,
    load_checkpoint,
    save_checkpoint,
)
from uumamba.model_folder.folder import (
    CHECKPOINT_CHOICES,
    CHECKPOINT_NAMES,
    POSTPROCESSING,
    ModelFolder,
    WeightsDigest,
    load_postprocessing,
    parse_folds,
    save_postprocessing,
    sha256_file,
)

__all__ = ["BEST", "CHECKPOINT_CHOICES", "CHECKPOINT_KEYS", "CHECKPOINT_NAMES", "LATEST", "POSTPROCESSING",
           "ModelFolder", "WeightsDigest", "load_checkpoint", "load_postprocessing", "parse_folds",
           "save_checkpoint", "save_postprocessing", "sha256_file"]
