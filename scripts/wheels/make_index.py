"""Writes the wheel index of the variants (PEP 503 "simple" pages, as PyTorch's download index) from
a folder of built wheels: SITE/whl/<variant>/inplace-abn/index.html linking the variant's wheels,
which are copied next to it. Deployed to GitHub Pages by the release workflow, it serves
`pip install inplace-abn --index-url https://inplace-abn.github.io/whl/<variant>/`.

    python scripts/wheels/make_index.py WHEEL_DIR SITE_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import shutil
from pathlib import Path

VARIANTS = ("cpu", "cu12", "cu13")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path)
    parser.add_argument("site", type=Path)
    args = parser.parse_args()
    wheels = sorted(args.wheels.rglob("inplace_abn-*.whl"))
    for variant in VARIANTS:
        chosen = [w for w in wheels if re.match(rf"inplace_abn-[^-]+\+{variant}-", w.name)]
        if not chosen:
            raise SystemExit(f"make_index: no +{variant} wheel in {args.wheels}")
        folder = args.site / "whl" / variant / "inplace-abn"
        folder.mkdir(parents=True, exist_ok=True)
        links = []
        for wheel in chosen:
            shutil.copy2(wheel, folder / wheel.name)
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            name = html.escape(wheel.name)
            links.append(f'<a href="{name}#sha256={digest}" data-requires-python="&gt;=3.10">{name}</a><br>')
        (folder / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "\n".join(links) + "\n</body></html>\n")
        (folder.parent / "index.html").write_text(
            '<!DOCTYPE html>\n<html><body>\n<a href="inplace-abn/">inplace-abn</a><br>\n</body></html>\n'
        )
        print(f"{variant}: {len(chosen)} wheel(s)")


if __name__ == "__main__":
    main()
