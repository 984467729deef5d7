#!/usr/bin/env bash
# pip and uv install the right thing: a find-links folder holds the wheel and the sdist; into a fresh
# environment with a CPU torch (2.13.0), `pip install` and then (after uninstalling) `uv pip install`
# must choose the wheel, not the sdist (checked: pip's install report, and the installed files are the
# wheel's: RECORD hashes and its CUDA 13 library, which a build here under a CPU torch cannot produce);
# then `pip install --no-binary torch-inplace-abn` builds the sdist (the CPU library; CUDA needs a CUDA
# torch and nvcc) and the package loads its CPU library from it. Quick checks only: doctor and the loader.
# Usage: ci_install.sh WHEEL
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
wheel=${1:?usage: ci_install.sh WHEEL}
started=$SECONDS
links=$WORK/find-links
rm -rf "$links" && mkdir -p "$links"
cp "$wheel" "$links/"

log "sdist (scripts/wheels/sdist.sh)"
sdist_venv=$WORK/sdist-venv
[ -x "$sdist_venv/bin/python" ] || make_venv "$sdist_venv" build "scikit-build-core>=0.10"
PYTHON=$sdist_venv/bin/python bash "$ROOT/scripts/wheels/sdist.sh" "$links" 2> >(grep -v "^WARNING: Location" >&2)
sdist=$(ls "$links"/torch_inplace_abn-*.tar.gz)
contents=$(tar -tzf "$sdist")
grep -q '/src/cpu/kernels.cpp$' <<< "$contents" || { echo "ci_install.sh: $sdist has no src/" >&2; exit 1; }
log "find-links folder: $(basename "$wheel") $(basename "$sdist") ($((SECONDS - started)) s)"

venv=$WORK/install-venv
make_venv "$venv" "torch==$TORCH_VERSION" numpy uv "scikit-build-core>=0.10" cmake ninja
log "fresh environment with torch $TORCH_VERSION ($((SECONDS - started)) s)"

# The installed files must be the wheel's: the CPU library's hash in RECORD, and the CUDA 13 library.
assert_wheel_installed() {
  "$venv/bin/python" - "$wheel" "$1" << 'PY'
import base64, hashlib, sys, zipfile
from importlib.metadata import distribution
from pathlib import Path

wheel, tool = sys.argv[1], sys.argv[2]
dist = distribution("torch-inplace-abn")
with zipfile.ZipFile(wheel) as archive:
    record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
    expected = {line.split(",")[0]: line.split(",")[1] for line in archive.read(record).decode().splitlines()}
installed = {str(f): f.hash.value for f in dist.files if f.hash}
library = "inplace_abn/inplace_abn_cpu.so"
assert installed.get(library) == expected[library].removeprefix("sha256="), (tool, installed.get(library))
assert Path(dist.locate_file("inplace_abn/inplace_abn_cuda13.so")).exists(), tool
print(f"{tool}: installed {Path(wheel).name} (RECORD hashes match, inplace_abn_cuda13.so present)")
PY
}

log "pip install --no-index --find-links (wheel and sdist offered)"
pip_in "$venv" install --quiet --no-index --find-links "$links" --report "$WORK/pip-report.json" torch-inplace-abn
"$venv/bin/python" - "$WORK/pip-report.json" << 'PY'
import json, sys

(item,) = [i for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"] == "torch-inplace-abn"]
url = item["download_info"]["url"]
assert url.endswith(".whl"), f"pip chose {url}"
print(f"pip chose {url.rsplit('/', 1)[-1]}")
PY
assert_wheel_installed pip
(cd "$WORK" && "$venv/bin/python" "$ROOT/scripts/wheels/check_loader.py" cpu)
pip_in "$venv" uninstall --quiet --yes torch-inplace-abn

log "uv pip install --no-index --find-links ($("$venv/bin/uv" --version))"
# --no-cache: uv's cache keys a find-links wheel by folder and file name, so an older wheel of the same
# version installed from this folder before (an earlier run on this machine) would be installed again.
"$venv/bin/uv" pip install --no-cache --python "$venv/bin/python" --no-index --find-links "$links" torch-inplace-abn
assert_wheel_installed uv
(cd "$WORK" && "$venv/bin/python" "$ROOT/scripts/wheels/check_loader.py" cpu)
pip_in "$venv" uninstall --quiet --yes torch-inplace-abn
log "pip and uv chose the wheel ($((SECONDS - started)) s)"

log "pip install --no-binary torch-inplace-abn: the sdist builds the CPU library"
# --no-cache-dir: pip would otherwise keep the wheel it builds, keyed by the sdist's path, for later runs.
pip_in "$venv" install --quiet --no-cache-dir --no-index --find-links "$links" --no-build-isolation --no-binary torch-inplace-abn \
  torch-inplace-abn
(cd "$WORK" && "$venv/bin/python" - << 'PY'
import json

from inplace_abn import _native

# The wheel has inplace_abn_cuda13.so; a build here, under a CPU-only torch, cannot.
info = _native.read_build_info()
files = sorted(p.name for p in _native.PACKAGE_DIR.glob("inplace_abn_*"))
assert files == ["inplace_abn_cpu.so"] and info["cuda_libraries"] == {}, (files, info)
print(f"built from the sdist: {files}, build_info {json.dumps(info)}")
PY
)
(cd "$WORK" && "$venv/bin/python" "$ROOT/scripts/wheels/check_loader.py" cpu)
(cd "$WORK" && "$venv/bin/python" -m inplace_abn doctor)
log "ci_install.sh: done in $((SECONDS - started)) s"
