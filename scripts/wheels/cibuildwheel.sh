#!/usr/bin/env bash
# Builds, repairs, checks and tests the wheel of one variant with cibuildwheel (configured in
# pyproject.toml [tool.cibuildwheel]; its hooks are the scripts of this folder). Run by the GitHub
# workflows on Linux (in a manylinux_2_28 container) and Windows (CUDA and MSVC set up beforehand by
# install_cuda_windows.ps1 and msvc_env.ps1). Docker is needed on Linux, so it does not run on the
# CI machines of this repository, which run build.sh instead: the same hooks, outside a container.
#   INPLACE_ABN_VARIANT=cpu|cu12|cu13, INPLACE_ABN_LOCAL_VERSION=1|0 (0: PyPI's default wheel)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
variant=${INPLACE_ABN_VARIANT:?set INPLACE_ABN_VARIANT to cpu, cu12 or cu13}
# The torch to compile against: the oldest supported (the stable ABI makes the result load in newer
# ones), from PyTorch's index of the variant.
case $variant in
  cpu) index=cpu cuda=OFF ;;
  cu12) index=cu126 cuda=ON ;;
  cu13) index=cu130 cuda=ON ;;
  *) echo "cibuildwheel.sh: unknown variant '$variant'" >&2; exit 2 ;;
esac
export TORCH_SPEC=${TORCH_SPEC:-torch==2.10.*}
export TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$index}
export SKBUILD_CMAKE_DEFINE="INPLACE_ABN_CUDA=$cuda;INPLACE_ABN_VARIANT=$variant"
python -m pip install --disable-pip-version-check "cibuildwheel==4.3.5"
python -m cibuildwheel --output-dir wheelhouse "$here/../.."
