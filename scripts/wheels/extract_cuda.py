"""Copies the CUDA libraries and build_info.json out of a built wheel into a folder, for a later build
to merge into its wheel (INPLACE_ABN_PREBUILT_CUDA, cmake/PrebuiltCuda.cmake).

    python scripts/wheels/extract_cuda.py WHEEL OUT_DIR
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import zipfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="the wheel (a glob matching exactly one file)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    (wheel,) = glob.glob(args.wheel) or [args.wheel]
    args.out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"inplace_abn/inplace_abn_cuda\d+\.(so|dll)", n)]
        if not names:
            raise SystemExit(f"extract_cuda: {wheel} has no CUDA library")
        for name in [*names, "inplace_abn/build_info.json"]:
            (args.out / Path(name).name).write_bytes(archive.read(name))
    info = json.loads((args.out / "build_info.json").read_text())
    print(f"extract_cuda: {', '.join(Path(n).name for n in names)} -> {args.out} (CUDA {list(info['cuda_libraries'])})")


if __name__ == "__main__":
    main()
