"""In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018) with fused CPU kernels.

BatchNorm + an invertible activation in one in-place operation that keeps only its output for
backward: about half the training activation memory of BatchNorm + activation.
"""

import sys

try:
    import torch  # noqa: F401  (first: the native libraries resolve their symbols against torch's)
except (ImportError, OSError) as _error:
    if sys.argv[0] == "-m" and sys.argv[1:2] == ["doctor"]:
        # `python -m inplace_abn doctor` (runpy sets argv[0] to "-m" while importing the package): report
        # the broken torch instead of a traceback.
        from .__main__ import torch_import_failed

        sys.exit(torch_import_failed(_error, sys.argv[2:]))
    raise ImportError(
        f"inplace_abn needs PyTorch >= 2.10, which cannot be imported in this environment ({sys.executable}): "
        f"{_error}. Fix: "
        + (
            "pip install torch (GPU builds: https://pytorch.org/get-started/locally/)"
            if isinstance(_error, ImportError)
            else 'torch is installed but its libraries fail to load: make `python -c "import torch"` work first '
            "(reinstall torch in a fresh environment; on Windows install the latest Visual C++ redistributable, "
            "see docs/windows.md)"
        )
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
