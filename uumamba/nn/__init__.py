"""uumamba.nn: the selective scan, the Mamba block and the U-Mamba networks.

Public API (see docs/architecture.md):

- :func:`selective_scan`, :func:`resolve_scan_backend` — the S6 recurrence on the cuda / cpu /
  torch backends (``uumamba.nn.ops.selective_scan``);
- :class:`Mamba` — the Mamba block, parameter-compatible with ``mamba_ssm.Mamba``;
  :func:`network_scan_backend` — the backend a network's Mamba layers run on a device, with
  the reason when it is not mamba-ssm's kernels on a GPU;
- :class:`SpatialMamba` — Mamba over the voxels of a feature map (U-Mamba's MambaLayer);
- :class:`UMamba`, :class:`UMambaBot`, :class:`UMambaEnc`, :func:`build_network` — networks.

Importing this package never imports mamba-ssm or causal-conv1d; they load lazily on the CUDA
path.
"""

from uumamba.nn.blocks import SpatialMamba
from uumamba.nn.mamba import Mamba, network_scan_backend
from uumamba.nn.ops.selective_scan import resolve_scan_backend, selective_scan
from uumamba.nn.umamba import UMamba, UMambaBot, UMambaEnc, build_network

__all__ = [
    "Mamba",
    "SpatialMamba",
    "UMamba",
    "UMambaBot",
    "UMambaEnc",
    "build_network",
    "network_scan_backend",
    "resolve_scan_backend",
    "selective_scan",
]
