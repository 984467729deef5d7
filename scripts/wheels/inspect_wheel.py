"""Checks a built wheel: one py3-none-<platform> wheel, the package and its native libraries inside,
no torch or CUDA runtime library bundled, the version carrying the variant, and for CUDA variants a
library holding code for every architecture its build_info.json lists (cuobjdump, when available).

    python scripts/wheels/inspect_wheel.py WHEEL --variant cu13 [--local 1]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Libraries that must come from the user's torch / driver, never from this wheel.
FORBIDDEN = re.compile(r"(^|/)(lib)?(torch|c10|cudart|cuda|cublas|cudnn|nvrtc|gomp|nvjitlink)[^/]*\.(so[.\d]*|dll)$")


def fail(message: str) -> None:
    raise SystemExit(f"inspect_wheel: {message}")


def cuda_code(library: Path, cuobjdump: str) -> tuple[set[str], set[str]]:
    """(real architectures, PTX architectures) found in a CUDA library."""

    def listed(flag: str, pattern: str) -> set[str]:
        output = subprocess.run([cuobjdump, flag, str(library)], capture_output=True, text=True, check=True).stdout
        return set(re.findall(pattern, output))

    return listed("--list-elf", r"\.sm_(\d+)[a-z]?\.cubin"), listed("--list-ptx", r"\.sm_(\d+)[a-z]?\.ptx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--variant", required=True, choices=["cpu", "cu12", "cu13"])
    parser.add_argument("--local", choices=["0", "1"], default="1")
    args = parser.parse_args()

    match = re.fullmatch(r"inplace_abn-([^-]+)-py3-none-(\w+)\.whl", args.wheel.name)
    if match is None:
        fail(f"{args.wheel.name} is not a py3-none-<platform> wheel of inplace_abn")
    version, platform = match.groups()
    expected_local = f"+{args.variant}" if args.local == "1" else ""
    if not version.endswith(expected_local) or (not expected_local and "+" in version):
        fail(f"version {version} should end with '{expected_local}' for variant {args.variant}")
    windows = platform.startswith("win")
    suffix = ".dll" if windows else ".so"

    with zipfile.ZipFile(args.wheel) as archive:
        names = archive.namelist()
        bundled = [n for n in names if FORBIDDEN.search(n) and not n.startswith("inplace_abn/inplace_abn_")]
        if bundled:
            fail(f"bundles libraries that must come from torch or the driver: {bundled}")
        required = (f"inplace_abn/inplace_abn_cpu{suffix}", "inplace_abn/build_info.json", "inplace_abn/__init__.py")
        for name in required:
            if name not in names:
                fail(f"{name} is missing")
        info = json.loads(archive.read("inplace_abn/build_info.json"))
        cuda_library = f"inplace_abn/inplace_abn_cuda{suffix}"
        if args.variant == "cpu":
            if cuda_library in names or info.get("cuda"):
                fail("the cpu variant must not carry CUDA kernels")
            print(f"{args.wheel.name}: ok (cpu variant, {len(names)} files)")
            return
        if cuda_library not in names:
            fail(f"{cuda_library} is missing from a {args.variant} wheel")
        cuda = info.get("cuda") or fail("build_info.json has no cuda section")
        if cuda["version"].split(".")[0] != args.variant.removeprefix("cu"):
            fail(f"CUDA {cuda['version']} in a {args.variant} wheel")
        cuobjdump = shutil.which("cuobjdump")
        if cuobjdump is None:
            print("inspect_wheel: cuobjdump not found: architectures not checked", file=sys.stderr)
            return
        with tempfile.TemporaryDirectory() as tmp:
            library = Path(archive.extract(cuda_library, tmp))
            real, ptx = cuda_code(library, cuobjdump)
    missing = set(cuda["architectures"]) - real
    if missing:
        fail(f"no code for sm_{', sm_'.join(sorted(missing))} (found sm_{', sm_'.join(sorted(real))})")
    if cuda.get("ptx") and cuda["ptx"] not in ptx:
        fail(f"no PTX for sm_{cuda['ptx']} (found {sorted(ptx)})")
    print(
        f"{args.wheel.name}: ok (CUDA {cuda['version']}, code for sm_{', sm_'.join(sorted(real, key=int))}, "
        f"PTX sm_{', sm_'.join(sorted(ptx, key=int))})"
    )


if __name__ == "__main__":
    main()
