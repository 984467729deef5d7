#!/usr/bin/env bash
# Installs the CUDA compiler and static runtime of the variant's CUDA version in a manylinux_2_28
# (RHEL 8 family) container, from NVIDIA's package repository; nothing for the cpu variant. Run by
# cibuildwheel (before-all). /usr/local/cuda then points at it (CUDACXX=/usr/local/cuda/bin/nvcc).
set -euo pipefail
case ${INPLACE_ABN_VARIANT:?set INPLACE_ABN_VARIANT} in
  cpu) exit 0 ;;
  cu12) version=12-9 ;;
  cu13) version=13-0 ;;
  *) echo "install_cuda_linux.sh: unknown variant '$INPLACE_ABN_VARIANT'" >&2; exit 2 ;;
esac
dnf install -y dnf-plugins-core
dnf config-manager --add-repo https://developer.download.nvidia.com/compute/cuda/repos/rhel8/x86_64/cuda-rhel8.repo
packages=("cuda-nvcc-$version" "cuda-cudart-devel-$version" "cuda-cccl-$version" "cuda-cuobjdump-$version")
if [ "$version" = 13-0 ]; then packages+=("cuda-crt-$version"); fi  # CUDA 13 ships crt/ headers separately
dnf install -y "${packages[@]}"
ln -sfn "/usr/local/cuda-${version/-/.}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
