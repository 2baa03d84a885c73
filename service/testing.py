"""A tiny trained model folder for the service's tests and benchmark (seconds on a CPU).

Not for real use: the network is a few thousand parameters trained for a handful of
iterations on synthetic data (:func:`uumamba.data.synthetic.write_synthetic_dataset`), enough
for the service to load real checkpoints, run the real predictor and write real masks.
"""

from __future__ import annotations

from pathlib import Path

#: ``--set`` overrides (from the defaults) for a 3D U-Mamba-Bot of three tiny stages trained
#: for two iterations. The 128 x 128 x 8 patch with 25 % overlap keeps sliding-window inference
#: to a few windows (small uploads fit in one; an ACDC volume needs about 12).
TINY_OVERRIDES: tuple[str, ...] = (
    "dataset.labels={0: background, 1: RV, 2: MYO, 3: LV}",
    "model.name=umamba_bot",
    "model.spatial_dims=3",
    "model.features=[4, 8, 16]",
    "model.d_state=4",
    "model.expand=1",
    "plan.patch_size=[128, 128, 8]",
    "plan.batch_size=1",
    "optim.name=sgd",
    "train.epochs=1",
    "train.iterations_per_epoch=2",
    "train.val_every=100",
    "train.n_folds=2",
    "train.cache=none",
    "train.num_workers=0",
    'train.amp="off"',
    "train.augmentation.p_spatial=0.0",
    "inference.sw_batch_size=4",
    "inference.overlap=0.25",
)


def build_tiny_model(root: str | Path, n_cases: int = 4, seed: int = 0) -> Path:
    """Write a synthetic dataset under ``root/data`` and train ``root/model`` (fold ``all``).

    A model already finished under ``root`` is reused, so test modules of one session can
    share it.

    Args:
        root: a scratch folder (created).
        n_cases: synthetic cases (96 x 96 x 8 voxels, 1.5 x 1.5 x 8 mm).
        seed: dataset and training seed.

    Returns:
        The model folder (``config.yaml``, ``plans.json``, ``fold_all/checkpoint_*.pt``).
    """
    from uumamba.config import load_config
    from uumamba.data.synthetic import write_synthetic_dataset
    from uumamba.engine.train import train_fold

    root = Path(root)
    model_dir = root / "model"
    if (model_dir / "fold_all" / "checkpoint_latest.pt").is_file():
        return model_dir
    data = write_synthetic_dataset(root / "data", n_cases=n_cases, seed=seed, shape=(96, 96, 8),
                                   spacing=(1.5, 1.5, 8.0))
    cfg = load_config(None, [*TINY_OVERRIDES, f"train.seed={seed}"])
    train_fold(cfg, data, model_dir, fold="all", device="cpu")
    return model_dir
