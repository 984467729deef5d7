"""Checks, in an environment where the wheel is installed, which native libraries the loader chose
under this environment's torch, on the real torch build (no GPU needed: loading a CUDA library and
registering its kernels does not touch a GPU).

    python check_loader.py cpu            # CPU-only torch: the CPU library only, no CUDA library loaded
    python check_loader.py cuda13         # that CUDA library loaded (and no other), its kernels registered
                                          # for the CUDA dispatch key
    python check_loader.py missing-cuda12 # a wheel without the CUDA 12 library under a CUDA 12 torch: CPU
                                          # library only, and the loader says what is missing
    python check_loader.py cuda12 --stand-in 13
        # on a copy of the installed package in which the CUDA 13 library is renamed to stand in for the
        # CUDA 12 one (for CI, which cannot build CUDA 12): the loader picks the CUDA 12 file under a
        # CUDA 12 torch and that torch's torch_cuda resolves it and registers the kernels. Runs in a fresh
        # process where importing the package loads nothing (INPLACE_ABN_DISABLE_NATIVE=1).

Exits non-zero with a message when the loader chose anything else. Run it from outside the source tree
(or with the installed package first on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def mapped_libraries() -> list[str]:
    """The package's native libraries loaded into this process (Linux; [] elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    names = {line.split()[-1] for line in maps.read_text().splitlines() if "inplace_abn_" in line}
    return sorted(Path(name).name for name in names)


def check(expect: str, status, torch) -> str:
    from inplace_abn import _native

    def has_kernel(key: str, operator: str = "statistics") -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"inplace_abn::{operator}", key)

    cpu = status.libraries["cpu"]
    assert cpu.loaded, f"the CPU library did not load: {cpu.problem}"
    assert has_kernel("CPU"), "no CPU kernel registered for inplace_abn::statistics"
    cuda = status.libraries.get("cuda")
    mapped = mapped_libraries()
    suffix = ".dll" if sys.platform == "win32" else ".so"
    if expect == "cpu":
        assert torch.version.cuda is None, f"expected a CPU-only torch, got CUDA {torch.version.cuda}"
        assert cuda is None or not cuda.loaded, f"a CUDA library loaded under a CPU-only torch: {cuda}"
        assert not has_kernel("CUDA"), "CUDA kernels registered under a CPU-only torch"
        assert status.problems() == [], status.problems()
        if mapped:
            assert mapped == [f"inplace_abn_cpu{suffix}"], mapped
        return f"CPU library only ({cuda.note if cuda else 'no CUDA library in this build'})"
    if expect.startswith("missing-"):
        name = expect.removeprefix("missing-")
        assert cuda is not None and not cuda.loaded and cuda.name == name, cuda
        assert cuda.problem is not None and cuda.problem.summary.startswith(
            f"this inplace_abn has no CUDA {name.removeprefix('cuda')} library"
        ), cuda.problem
        assert not has_kernel("CUDA"), "CUDA kernels registered without a CUDA library of torch's major"
        if mapped:
            assert mapped == [f"inplace_abn_cpu{suffix}"], mapped
        return f"no {name} library; the loader says: {cuda.problem.summary}"
    assert cuda is not None and cuda.loaded, f"the CUDA library did not load: {cuda}"
    assert cuda.name == expect, f"loaded {cuda.name}, expected {expect}"
    assert Path(cuda.path).name == _native.library_filename(expect), cuda.path
    assert has_kernel("CUDA"), "the CUDA library loaded but registered no CUDA kernel"
    # The CUDA library implements every device operator of the CPU library (no GPU needed to check).
    operators = ("normalize_act_", "backward_reduce", "backward_input", "train_forward_", "train_backward")
    missing = [name for name in operators if not has_kernel("CUDA", name)]
    assert not missing, f"no CUDA kernel registered for {missing}"
    assert status.problems() == [], status.problems()
    if mapped:
        assert mapped == sorted([f"inplace_abn_cpu{suffix}", f"inplace_abn_{expect}{suffix}"]), mapped
    return f"{Path(cuda.path).name} loaded, CUDA kernels registered (build info {json.dumps(cuda.info)})"


def stand_in(expect: str, source_major: str) -> None:
    """Re-runs the check in a fresh process on a copy of the package with the stand-in library."""
    import inplace_abn

    package = Path(inplace_abn.__file__).parent
    major = expect.removeprefix("cuda")
    suffix = ".dll" if sys.platform == "win32" else ".so"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "inplace_abn"
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
        for other in copy.glob(f"inplace_abn_cuda*{suffix}"):
            if other.name != f"inplace_abn_cuda{source_major}{suffix}":
                other.unlink()
        (copy / f"inplace_abn_cuda{source_major}{suffix}").rename(copy / f"inplace_abn_cuda{major}{suffix}")
        info = json.loads((copy / "build_info.json").read_text())
        entry = info["cuda_libraries"].pop(source_major)
        info["cuda_libraries"][major] = dict(entry, stand_in_for=f"CUDA {source_major} binary renamed")
        (copy / "build_info.json").write_text(json.dumps(info))
        env = dict(os.environ, INPLACE_ABN_DISABLE_NATIVE="1")
        run = subprocess.run([sys.executable, __file__, expect, "--package-dir", str(copy)], env=env, check=False)
    if run.returncode:
        raise SystemExit(run.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("expect", help="cpu, cuda12, cuda13, missing-cuda12, ...")
    parser.add_argument("--stand-in", metavar="MAJOR", help="rename the CUDA MAJOR library to the expected one")
    parser.add_argument("--package-dir", type=Path, help=argparse.SUPPRESS)  # the stand-in's child process
    args = parser.parse_args()
    if args.stand_in:
        stand_in(args.expect, args.stand_in)
        return

    import torch

    from inplace_abn import _native

    if args.package_dir is not None:
        status = _native.load_native(_native.Environment(package_dir=args.package_dir, environ={}))
        where = f"{args.package_dir} (stand-in)"
    else:
        status = _native.load()
        where = str(_native.PACKAGE_DIR)
    try:
        result = check(args.expect, status, torch)
    except AssertionError as error:
        raise SystemExit(f"check_loader: expected {args.expect} under torch {torch.__version__}: {error}") from None
    print(f"check_loader: torch {torch.__version__} (CUDA {torch.version.cuda}), {where}: {result}")


if __name__ == "__main__":
    main()
