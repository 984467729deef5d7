#!/usr/bin/env bash
# Builds, repairs, checks and tests the wheel with cibuildwheel (configured in pyproject.toml
# [tool.cibuildwheel]; its hooks are the scripts of this folder). Run by the GitHub workflows on Linux
# (in a manylinux_2_28 container) and Windows (CUDA and MSVC set up beforehand by
# install_cuda_windows.ps1 and msvc_env.ps1). Docker is needed on Linux, so it does not run on the CI
# machines of this repository, which run build.sh instead: the same hooks, outside a container.
#   INPLACE_ABN_CUDA_MAJOR     12 | 13: build the CUDA library of that major (nvcc 12.9 / 13.0) with the
#                              CPU library; empty: CPU library only
#   INPLACE_ABN_PREBUILT_CUDA  folders (inside the project) holding CUDA libraries of other majors built
#                              before, put into this wheel too (cmake/PrebuiltCuda.cmake): the release
#                              wheel is the CUDA 13 build plus the CUDA 12 build's library
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
major=${INPLACE_ABN_CUDA_MAJOR:-}
# The torch to compile against: the oldest supported (the stable ABI makes the result load in newer
# ones), a CUDA build of the library's CUDA major from PyTorch's index.
case $major in
  "") index=cpu cuda=OFF ;;
  12) index=cu126 cuda=ON ;;
  13) index=cu130 cuda=ON ;;
  *) echo "cibuildwheel.sh: INPLACE_ABN_CUDA_MAJOR='$major' (expected 12, 13 or empty)" >&2; exit 2 ;;
esac
export TORCH_SPEC=${TORCH_SPEC:-torch==2.10.*}
export TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$index}
defines="INPLACE_ABN_CUDA=$cuda"
majors=$major
for dir in ${INPLACE_ABN_PREBUILT_CUDA//;/ }; do
  defines+=";INPLACE_ABN_PREBUILT_CUDA=${INPLACE_ABN_PREBUILT_CUDA}"
  for library in "$dir"/inplace_abn_cuda*.*; do
    library=$(basename "$library")
    majors+=" ${library//[!0-9]/}"
  done
  break  # one define lists them all
done
export SKBUILD_CMAKE_DEFINE=$defines
# check.sh (the repair step) requires exactly these CUDA libraries in the wheel.
INPLACE_ABN_CUDA_MAJORS=$(tr ' ' '\n' <<< "$majors" | sed '/^$/d' | sort -n | tr '\n' ' ')
export INPLACE_ABN_CUDA_MAJORS
if [ "$major" = 12 ]; then
  # CUDA 12.9 accepts GCC <= 14: name the host compiler instead of trusting the image's default
  # (install_cuda_linux.sh installs gcc-toolset-14 for it).
  export CIBW_ENVIRONMENT_LINUX="CUDACXX=/usr/local/cuda/bin/nvcc CUDAHOSTCXX=/opt/rh/gcc-toolset-14/root/usr/bin/g++ PATH=/usr/local/cuda/bin:\$PATH"
fi
echo "cibuildwheel.sh: CUDA major '${major:-none}', defines $defines, wheel must carry CUDA libraries: ${INPLACE_ABN_CUDA_MAJORS:-none}"
python -m pip install --disable-pip-version-check "cibuildwheel==4.3.5"
python -m cibuildwheel --output-dir wheelhouse "$here/../.."
