"""One run of an ablation, in its own process: train one fold of one cell and seed, predict its
validation cases, score them, write ``scores.json``.

``uumamba ablate`` starts it as ``python -m uumamba.ablation.child --config ... --set ...``
(:func:`uumamba.ablation.run.run_ablation`), with the threads of OpenMP, MKL, OpenBLAS and
numba set in the environment and ``torch.set_num_threads(--threads)``. It is not meant to be
called by hand, but it is an ordinary command: ``--help`` lists its flags.

Steps (:func:`run_one`):

1. the configuration is loaded as ``uumamba train`` loads it (``--config`` and the ``--set``
   overrides in order: the ablation's own, the cell's, ``train.time_limit_minutes`` and
   ``train.seed``);
2. :func:`uumamba.engine.loop.run_fold` trains the fold with ``resume=True``: an interrupted
   run continues from its checkpoint (its time budget summed over the sessions), a finished
   one trains nothing;
3. the iterations and seconds come from the fold's ``checkpoint_latest.pt`` (``iteration``,
   ``elapsed``: the wall time of every session, setup included);
4. :class:`~uumamba.inference.predict.Predictor` ``.from_model_dir(MODEL, folds=FOLD)``
   predicts the fold's validation cases (from the model folder's ``splits.json``, which the
   ablation wrote) and :func:`uumamba.inference.score.predict_and_score` scores them, raw and
   postprocessed, into ``MODEL/fold_K/predictions/``;
5. ``MODEL/fold_K/scores.json`` is written atomically and durably (temporary name, fsync,
   rename): its presence marks the run as done. It records the run's cell, seed, fold and
   :func:`~uumamba.ablation.scores.config_digest` of its configuration
   (:mod:`uumamba.ablation.scores` reads it back).

All of it holds ``MODEL/fold_K.lock`` (:mod:`uumamba.ablation.lock`): a second child of the
same run (one orphaned by a killed ``uumamba ablate`` and one of its rerun) is refused
instead of training the same fold folder at once.

Exit status: 0 done; 1 a :class:`~uumamba.errors.UserError` (one line ``error: ...`` on
stderr); 128 + signal number when SIGINT / SIGTERM stopped training (checkpoint saved); 130
when SIGINT arrives outside training (while the child starts, predicts or scores: one line
``stopped: ...`` on stderr, no traceback, no ``scores.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uumamba.ablation.scores import SCORES, check_json_size, config_digest

#: Folder of the fold's predicted validation masks (``raw/``, ``postprocessed/``).
PREDICTIONS = "predictions"


def per_case_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"case", "class", "dice", "hd95_mm"}]`` from an evaluation summary (NaN as None)."""
    import math

    labels = summary["labels"]
    rows = []
    for case in summary["metric_per_case"]:
        for value, m in case["metrics"].items():
            rows.append({"case": case["case"], "class": labels[str(value)],
                         "dice": None if math.isnan(m["Dice"]) else float(m["Dice"]),
                         "hd95_mm": None if math.isnan(m["HD95"]) else float(m["HD95"])})
    return rows


def lock_path(model_dir: Path, fold: int) -> Path:
    """``MODEL/fold_K.lock``: held by the child training that fold, for its whole run."""
    return Path(model_dir) / f"fold_{fold}.lock"


def run_one(config: Path | None, overrides: list[str], data: Path, model_dir: Path, fold: int,
            device: str, cell: str, seed: int) -> tuple[int | None, Path | None]:
    """Train (or resume) one fold, then predict and score its validation cases.

    Args:
        config / overrides: the run's configuration, loaded as ``uumamba train`` does.
        data: the dataset folder.
        model_dir: the run's model folder (``OUTPUT/cells/SLUG/seed_S``), with
            ``splits.json`` (and, for a shared plan, ``plans.json``) already written.
        fold: the fold to train and score.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        cell / seed: recorded in ``scores.json``.

    Returns:
        ``(signal, None)`` when a signal stopped training, else ``(None, scores.json path)``.

    Raises:
        UserError: another process holds ``MODEL/fold_K.lock`` (it trains this run), or the
            lock cannot be created; UserError / DataError / ConfigError: from loading the
            configuration, training, predicting or scoring (one line each).
    """
    from uumamba.ablation.lock import FileLock, LockBusy
    from uumamba.errors import UserError

    lock = FileLock(lock_path(model_dir, fold))
    try:
        lock.acquire()
    except LockBusy as busy:
        raise UserError(f"{busy.path}: another process trains this run ({busy.holder}); wait "
                        "for it to finish or stop it, then run uumamba ablate again") from None
    except OSError as exc:
        raise UserError(f"{lock.path}: cannot create the run's lock: "
                        f"{exc.strerror or exc}") from None
    try:
        return _run_locked(config, overrides, data, model_dir, fold, device, cell, seed)
    finally:
        lock.release()


def _run_locked(config: Path | None, overrides: list[str], data: Path, model_dir: Path,
                fold: int, device: str, cell: str, seed: int) -> tuple[int | None, Path | None]:
    from uumamba.config import load_config
    from uumamba.data import layouts
    from uumamba.data.splits import load_splits
    from uumamba.engine.loop import run_fold
    from uumamba.errors import UserError
    from uumamba.inference.predict import Predictor
    from uumamba.inference.score import predict_and_score
    from uumamba.model_folder import ModelFolder
    from uumamba.model_folder.checkpoints import LATEST, load_checkpoint
    from uumamba.model_folder.folder import SPLITS
    from uumamba.utils import atomic_path, json_safe

    cfg = load_config(config, overrides)
    digest = config_digest(cfg)  # of the configuration as loaded, as the report computes it
    result = run_fold(cfg, data, model_dir, fold=str(fold), resume=True, device=device,
                      progress=False)
    if result.signal is not None:
        return int(result.signal), None
    if not result.finished:
        raise UserError(f"{result.fold_dir}: training ended unfinished ({result.reason})")
    saved = load_checkpoint(result.fold_dir / LATEST, map_location="cpu")
    run_cfg = saved["config"]["train"]
    planned = int(run_cfg["epochs"]) * int(run_cfg["iterations_per_epoch"])
    iterations = int(saved["iteration"])

    folder = ModelFolder(model_dir)
    index = layouts.discover(data, layout=cfg.dataset.layout)
    check_json_size(folder.path(SPLITS))
    val_ids = load_splits(folder.path(SPLITS), index.cases)[fold]["val"]
    by_id = {c.id: c for c in index.cases}
    cases = [by_id[i] for i in val_ids]
    # the final weights: checkpoint_best.pt was chosen by the Dice of these very cases
    predictor = Predictor.from_model_dir(model_dir, folds=str(fold), device=device,
                                         checkpoint="latest")
    scored = predict_and_score(predictor, cases, result.fold_dir / PREDICTIONS,
                               predictor.labels, cfg.inference.nsd_tolerance_mm)
    raw, post = scored["raw"], scored["postprocessed"]
    record = {
        "cell": cell, "seed": seed, "fold": fold, "config_hash": digest,
        "model_dir": str(model_dir),
        "iterations": iterations, "planned_iterations": planned,
        "seconds": float(saved.get("elapsed", 0.0)),
        # what train.amp resolved to here (auto: bf16 on a CPU with AMX or AVX512-BF16); None from a
        # checkpoint older than the field
        "precision": saved.get("precision"),
        "stopped_by": "time_limit" if iterations < planned else "completed",
        "best_validation_dice": saved.get("best_metric"),
        "val_cases": list(val_ids),
        "classes": [name for value, name in sorted(predictor.labels.items()) if value != 0],
        "weights": "last",  # checkpoint_latest.pt (read_scores refuses any other)
        "scored": "raw: the network's masks without postprocessing",
        "foreground_mean_dice": raw["foreground_mean"]["Dice"],
        "postprocessed_foreground_mean_dice": post["foreground_mean"]["Dice"],
        "postprocessing": scored["postprocessing"],
        "per_case": per_case_rows(raw),
    }
    path = result.fold_dir / SCORES
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    return None, path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m uumamba.ablation.child",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cell", default="")
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    # SIGINT outside training's own handling (importing torch, predicting, scoring) raises
    # KeyboardInterrupt: a stop like any other, not a crash
    try:
        import torch

        from uumamba.errors import UserError
        from uumamba.logs import print_messages

        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        print_messages()
        try:
            signal, path = run_one(args.config, args.overrides, args.data, args.model,
                                   args.fold, args.device, args.cell, args.seed)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
    except KeyboardInterrupt:
        print("stopped: interrupted (SIGINT) outside training (while starting, predicting "
              "or scoring)", file=sys.stderr, flush=True)
        return 130
    if signal is not None:
        return 128 + signal
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
