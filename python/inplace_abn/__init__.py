"""In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018) with fused CPU kernels.

BatchNorm + an invertible activation in one in-place operation that keeps only its output for
backward: about half the training activation memory of BatchNorm + activation.
"""

from ._version import __version__
from .abn import ABN, InPlaceABN, InPlaceABNSync
from .functions import inplace_abn, inplace_abn_sync
from .group import active_group, set_active_group

__all__ = [
    "ABN",
    "InPlaceABN",
    "InPlaceABNSync",
    "__version__",
    "active_group",
    "inplace_abn",
    "inplace_abn_sync",
    "set_active_group",
]
