"""``uumamba train``: refuse a model folder that would mix into the dataset, run one fold, and
turn a signal stop into the shell's exit status (128 + signal number)."""

from __future__ import annotations

from pathlib import Path

from uumamba.config import Config
from uumamba.errors import UserError
from uumamba.utils import check_output_folder


def check_output_dir(data_dir: Path, output_dir: Path) -> None:
    """Refuse a model folder that is a file, the dataset folder or inside it: the run's
    ``dataset.json``, ``plans.json`` and ``fold_*`` would be mixed into the dataset (and a
    ``dataset.json`` there can change which layout is detected next time).

    Raises:
        UserError: naming ``--output`` and the reason.
    """
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    check_output_folder(output_dir)
    out, data = output_dir.resolve(), data_dir.resolve()
    if out == data or data in out.parents:
        raise UserError(f"--output {output_dir} is inside the dataset folder {data_dir}: the model "
                        "files would be written into the dataset; choose a folder outside it")


def train_from_cli(cfg: Config, data_dir: Path, output_dir: Path, fold: str, resume: bool,
                   device: str) -> None:
    """Run :func:`uumamba.engine.loop.run_fold` with the progress bar.

    With ``--resume`` and no ``--config`` the CLI reads ``OUTPUT/config.yaml`` (the run's own
    settings) before the ``--set`` overrides; a setting that differs from the checkpoint's in
    a key that may not change on resume is refused (see :mod:`uumamba.engine.resume`).

    Raises:
        UserError: propagated to the CLI (one line, exit status 1); ConfigError for settings
            that differ from the resumed run's.
        SystemExit: 130 after SIGINT, 143 after SIGTERM (checkpoint saved).
    """
    check_output_dir(data_dir, output_dir)
    from uumamba.engine.train import run_fold

    result = run_fold(cfg, data_dir, output_dir, fold, resume, device)
    if result.signal is not None:
        raise SystemExit(128 + int(result.signal))
