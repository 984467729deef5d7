"""Stamps the package version of a source tree for one wheel variant: X.Y.Z+<variant> for the wheel
index (as PyTorch's local versions), or X.Y.Z for PyPI's default wheel.

    python scripts/wheels/stamp_version.py SOURCE_TREE VARIANT --local 1
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path)
    parser.add_argument("variant", choices=["cpu", "cu12", "cu13"])
    parser.add_argument("--local", choices=["0", "1"], default="1", help="1: append +<variant>")
    args = parser.parse_args()
    path = args.tree / "python" / "inplace_abn" / "_version.py"
    text = path.read_text()
    match = re.search(r'__version__ = "([0-9][^"+]*)(\+[^"]*)?"', text)
    if match is None:
        raise SystemExit(f"no __version__ in {path}")
    version = match.group(1) + (f"+{args.variant}" if args.local == "1" else "")
    path.write_text(text[: match.start()] + f'__version__ = "{version}"' + text[match.end() :])
    print(f"stamped {path}: {version}")


if __name__ == "__main__":
    main()
