"""Checks a built wheel of torch-inplace-abn: one py3-none-<platform> wheel under 40 MB, the package and
its CPU library inside, exactly the expected CUDA libraries (inplace_abn_cuda<major>, one per CUDA
major) each listed in build_info.json and holding real code for every architecture listed there plus
PTX for the newest (read with cuobjdump: a wheel with CUDA libraries fails when cuobjdump cannot run),
and no torch or CUDA runtime library bundled.

    python scripts/wheels/inspect_wheel.py WHEEL --cuda "12 13"
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

# Libraries that must come from the user's torch / driver, never from this wheel.
FORBIDDEN = re.compile(r"(^|/)(lib)?(torch|c10|cudart|cuda|cublas|cudnn|nvrtc|gomp|nvjitlink)[^/]*\.(so[.\d]*|dll)$")
MAX_MB = 40  # PyPI's default limit is 100 MB


def fail(message: str) -> None:
    raise SystemExit(f"inspect_wheel: {message}")


def cuda_code(library: Path, cuobjdump: str) -> tuple[set[str], set[str]]:
    """(real architectures, PTX architectures) found in a CUDA library."""

    def listed(flag: str, pattern: str) -> set[str]:
        output = subprocess.run([cuobjdump, flag, str(library)], capture_output=True, text=True, check=True).stdout
        return set(re.findall(pattern, output))

    return listed("--list-elf", r"\.sm_(\d+)[a-z]?\.cubin"), listed("--list-ptx", r"\.sm_(\d+)[a-z]?\.ptx")


def check_cuda_library(archive: zipfile.ZipFile, name: str, major: str, info: dict, cuobjdump: str) -> str:
    if info["version"].split(".")[0] != major:
        fail(f"{name}: build_info.json says CUDA {info['version']}")
    with tempfile.TemporaryDirectory() as tmp:
        real, ptx = cuda_code(Path(archive.extract(name, tmp)), cuobjdump)
    missing = set(info["architectures"]) - real
    if missing:
        fail(f"{name}: no code for sm_{', sm_'.join(sorted(missing))} (found sm_{', sm_'.join(sorted(real))})")
    if info.get("ptx") and info["ptx"] not in ptx:
        fail(f"{name}: no PTX for sm_{info['ptx']} (found {sorted(ptx)})")
    return (
        f"{name}: CUDA {info['version']}, code for sm_{', sm_'.join(sorted(real, key=int))}, "
        f"PTX sm_{', sm_'.join(sorted(ptx, key=int))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--cuda", default="", help='the CUDA majors whose libraries must be inside, e.g. "12 13"')
    args = parser.parse_args()
    expected = sorted(set(re.split(r"[\s,]+", args.cuda.strip())) - {""}, key=int)

    match = re.fullmatch(r"torch_inplace_abn-([^-]+)-py3-none-(\w+)\.whl", args.wheel.name)
    if match is None:
        fail(f"{args.wheel.name} is not a py3-none-<platform> wheel of torch-inplace-abn")
    version, platform = match.groups()
    if "+" in version:
        fail(f"version {version} has a local part: PyPI refuses it")
    size_mb = args.wheel.stat().st_size / 2**20
    if size_mb > MAX_MB:
        fail(f"{args.wheel.name} is {size_mb:.1f} MB, over {MAX_MB} MB")
    suffix = ".dll" if platform.startswith("win") else ".so"

    with zipfile.ZipFile(args.wheel) as archive:
        names = archive.namelist()
        bundled = [n for n in names if FORBIDDEN.search(n) and not n.startswith("inplace_abn/inplace_abn_")]
        if bundled:
            fail(f"bundles libraries that must come from torch or the driver: {bundled}")
        if any(re.match(r"inplace_abn/_backend", n) for n in names):
            fail("carries a _backend module (mapillary's inplace-abn)")
        for name in (f"inplace_abn/inplace_abn_cpu{suffix}", "inplace_abn/build_info.json", "inplace_abn/__init__.py"):
            if name not in names:
                fail(f"{name} is missing")
        info = json.loads(archive.read("inplace_abn/build_info.json"))
        libraries = info.get("cuda_libraries")
        if not isinstance(libraries, dict):
            fail("build_info.json has no cuda_libraries")
        files = sorted(
            (m.group(1) for n in names if (m := re.fullmatch(rf"inplace_abn/inplace_abn_cuda(\d+){suffix}", n))),
            key=int,
        )
        if files != expected or sorted(libraries, key=int) != expected:
            fail(
                f"CUDA libraries: expected {expected or 'none'}, files {files or 'none'}, "
                f"build_info.json {sorted(libraries) or 'none'}"
            )
        report = [f"{args.wheel.name}: {size_mb:.1f} MB, {len(names)} files"]
        if expected:
            cuobjdump = shutil.which("cuobjdump")
            if cuobjdump is None:
                fail("cuobjdump is not on PATH: the CUDA libraries' architectures cannot be checked")
            for major in expected:
                name = f"inplace_abn/inplace_abn_cuda{major}{suffix}"
                report.append(check_cuda_library(archive, name, major, libraries[major], cuobjdump))
    print("\n".join(report) + "\ninspect_wheel: ok")


if __name__ == "__main__":
    main()
