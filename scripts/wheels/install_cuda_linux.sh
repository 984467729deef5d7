#!/usr/bin/env bash
# Installs the CUDA compiler, static runtime, CCCL headers and cuobjdump of the CUDA major being built
# (INPLACE_ABN_CUDA_MAJOR: 12 -> 12.9, 13 -> 13.0) in a manylinux_2_28 (RHEL 8 family) container, from
# NVIDIA's package repository; nothing for a CPU-only build. Run by cibuildwheel (before-all).
# /usr/local/cuda then points at it (CUDACXX=/usr/local/cuda/bin/nvcc, cuobjdump on PATH). For CUDA 12.9,
# which accepts GCC <= 14, it installs gcc-toolset-14 as nvcc's host compiler (CUDAHOSTCXX, set by
# cibuildwheel.sh), so a newer default compiler in a future image cannot break the build.
set -euo pipefail
case ${INPLACE_ABN_CUDA_MAJOR:-} in
  "") exit 0 ;;
  12) version=12-9 ;;
  13) version=13-0 ;;
  *) echo "install_cuda_linux.sh: INPLACE_ABN_CUDA_MAJOR='$INPLACE_ABN_CUDA_MAJOR' (expected 12, 13 or empty)" >&2; exit 2 ;;
esac
dnf install -y dnf-plugins-core
dnf config-manager --add-repo https://developer.download.nvidia.com/compute/cuda/repos/rhel8/x86_64/cuda-rhel8.repo
packages=("cuda-nvcc-$version" "cuda-cudart-devel-$version" "cuda-cccl-$version" "cuda-cuobjdump-$version")
if [ "$version" = 13-0 ]; then packages+=("cuda-crt-$version"); fi  # CUDA 13 ships crt/ headers separately
if [ "$version" = 12-9 ]; then packages+=(gcc-toolset-14-gcc-c++); fi
dnf install -y "${packages[@]}"
ln -sfn "/usr/local/cuda-${version/-/.}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
/usr/local/cuda/bin/cuobjdump --version
