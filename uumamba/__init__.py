"""uumamba: UU-Mamba cardiovascular segmentation.

Implements *UU-Mamba: Uncertainty-aware U-Mamba for Cardiovascular Segmentation*
(Tsai et al., 2024): a U-Mamba network (CNN encoder-decoder with Mamba state-space layers)
trained with sharpness-aware minimisation and an uncertainty-weighted composite loss.

Subpackages: ``nn`` (scan kernels, Mamba layer, networks), ``losses``, ``optim``, ``data``,
``engine`` (training), ``inference``, ``evaluation``, ``export``; the REST service is the
separate package ``uumamba_service``.
"""

__version__ = "0.1.0"
