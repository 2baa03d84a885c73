"""uumamba: UU-Mamba cardiovascular segmentation.

Implements *UU-Mamba: Uncertainty-aware U-Mamba for Cardiovascular Segmentation*
(Tsai et al., 2024): a U-Mamba network (CNN encoder-decoder with Mamba state-space layers)
trained with sharpness-aware minimisation and an uncertainty-weighted composite loss.

Subpackages: ``nn`` (scan kernels, Mamba layer, networks), ``losses``, ``optim``, ``data``,
``engine`` (training), ``inference``, ``evaluation``, ``export``; the REST service is the
separate package ``uumamba_service``.
"""

import os as _os

# OpenMP threads that busy-wait between parallel regions steal the few cores of a CPU machine
# from each other (torch's and numba's pools, DataLoader workers, other processes): measured
# here, one 2D U-Mamba training step took 4.9 s with the default policy and 0.73 s with
# PASSIVE on a shared 2-core machine. Set before torch loads its OpenMP runtime; an explicit
# user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging as _logging  # noqa: E402
import warnings as _warnings  # noqa: E402

# MONAI (1.5) warns twice on every import of monai.data when pydicom is installed but NVIDIA's
# nvImageCodec GPU decoder is not (every CPU machine): a UserWarning and a log record of its
# pydicom-plugin module. uumamba reads DICOM with pydicom's own decoders, so both only add
# noise to every command's output; nothing else of MONAI's is silenced.
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)

__version__ = "0.1.0"
