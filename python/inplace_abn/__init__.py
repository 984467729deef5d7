"""In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018) with fused CPU kernels.

BatchNorm + an invertible activation in one in-place operation that keeps only its output for
backward: about half the training activation memory of BatchNorm + activation.
"""

import sys

try:
    import torch  # noqa: F401  (first: the native libraries resolve their symbols against torch's)
except ImportError as _error:
    raise ImportError(
        f"inplace_abn needs PyTorch >= 2.10, which cannot be imported in this environment ({sys.executable}): "
        f"{_error}. Fix: pip install torch (GPU builds: https://pytorch.org/get-started/locally/)"
    ) from _error

from ._version import __version__
from .abn import ABN, InPlaceABN, InPlaceABNSync
from .convert import Conversion, convert_sync_inplace_abn, convert_to_batchnorm, convert_to_inplace_abn
from .functions import inplace_abn, inplace_abn_sync
from .group import active_group, set_active_group

__all__ = [
    "ABN",
    "Conversion",
    "InPlaceABN",
    "InPlaceABNSync",
    "__version__",
    "active_group",
    "convert_sync_inplace_abn",
    "convert_to_batchnorm",
    "convert_to_inplace_abn",
    "inplace_abn",
    "inplace_abn_sync",
    "set_active_group",
]
