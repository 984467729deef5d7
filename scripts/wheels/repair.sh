#!/usr/bin/env bash
# Repairs a built wheel for distribution without ever bundling torch's libraries or the CUDA runtime
# (they come from the user's torch; cudart is linked statically): auditwheel on Linux, delvewheel on
# Windows. Run by cibuildwheel (repair-wheel-command) in CI and by build.sh here.
# Usage: repair.sh WHEEL DEST_DIR
set -euo pipefail
wheel=${1:?usage: repair.sh WHEEL DEST_DIR}
dest=${2:?usage: repair.sh WHEEL DEST_DIR}
python=${PYTHON:-python}
mkdir -p "$dest"
case "$(uname -s)" in
  Linux)
    plat_args=()
    if [ -n "${AUDITWHEEL_PLAT:-}" ]; then plat_args=(--plat "$AUDITWHEEL_PLAT"); fi  # set in manylinux images
    "$python" -m auditwheel repair "${plat_args[@]}" -w "$dest" \
      --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*' --exclude 'libcuda.so*' \
      --exclude 'libnvrtc*.so*' --exclude 'libgomp*.so*' "$wheel"
    ;;
  MINGW* | MSYS* | CYGWIN*)
    # --analyze-existing: the package's DLLs are not .pyd files, which alone delvewheel reads by default.
    # torch's and the driver's DLLs come from the user's torch / driver (cudart is linked statically),
    # the Visual C++ runtime from the system (torch needs it too).
    torch_lib=$("$python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
    "$python" -m delvewheel repair --analyze-existing --wheel-dir "$dest" --add-path "$torch_lib" \
      --exclude 'torch_cpu.dll;torch_cuda.dll;torch.dll;c10.dll;c10_cuda.dll;nvcuda.dll;msvcp140.dll;vcruntime140.dll;vcruntime140_1.dll;concrt140.dll' \
      "$wheel"
    ;;
  *)
    echo "repair.sh: unsupported platform $(uname -s)" >&2
    exit 2
    ;;
esac
