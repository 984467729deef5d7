"""Resource guard for the CUDA kernels: reads every kernel's registers, stack frame (spills), local
and static shared memory from a built CUDA library (or cubin / object file) with
`cuobjdump --dump-resource-usage`, prints them per architecture, and fails when a kernel spills or
exceeds its budget in src/cuda/resource_budgets.json (which also states the occupancy each budget
gives). Spills show as a stack frame (cuobjdump does not separate them from call frames).

    python scripts/cuda_resources.py path/to/inplace_abn_cuda13.so [more files] [--arch 80 --arch 90]
    python scripts/cuda_resources.py build/*.cubin --report-only      # print the table, never fail

cuobjdump: $CUOBJDUMP, else on PATH, else the one of NVIDIA's PyPI package nvidia-cuda-cuobjdump.
Exit status 0: within budget; 1: a kernel over budget (each named with what and by how much);
2: the library holds no code for a checked architecture, or cuobjdump failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGETS = REPO / "src" / "cuda" / "resource_budgets.json"
THREADS_PER_BLOCK = 256
# Per SM: registers, threads, shared memory usable by blocks (bytes), shared memory reserved per block.
SM_LIMITS = {"80": (65536, 2048, 167936, 1024), "90": (65536, 2048, 233472, 1024)}
DEFAULT_LIMITS = (65536, 1536, 101376, 1024)


@dataclass
class Kernel:
    arch: str
    mangled: str
    name: str
    registers: int
    stack: int
    shared: int
    local: int


def find_cuobjdump() -> str:
    """cuobjdump from $CUOBJDUMP, PATH, the CUDA toolkit, or NVIDIA's PyPI package."""
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import nvidia  # the namespace package of NVIDIA's PyPI wheels

        for root in nvidia.__path__:
            candidates += [str(p) for p in Path(root).glob("*/bin/cuobjdump")]
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit(
        "cuda_resources.py: cuobjdump not found: set CUOBJDUMP, put the CUDA toolkit's bin on PATH, or "
        "`pip install nvidia-cuda-cuobjdump`"
    )


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short_name(demangled: str) -> str:
    """`elementwise_kernel<8, NormalizeOp<bf16, 1>>` from the demangled signature."""
    name = demangled.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # cut the parameter list at the outermost '('
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            end = i
            break
    name = name[:end]
    for prefix in ("inplace_abn::cuda::", "inplace_abn::"):
        name = name.replace(prefix, "")
    for long, short in (("__nv_bfloat16", "bf16"), ("__half", "f16"), ("(Activation)", ""), ("float", "f32")):
        name = name.replace(long, short)
    return name.replace("double", "f64").replace(" >", ">")


def read_kernels(path: Path, cuobjdump: str) -> list[Kernel]:
    result = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"cuda_resources.py: cuobjdump failed on {path}:\n{result.stderr}", file=sys.stderr)
        raise SystemExit(2)
    kernels: list[Kernel] = []
    arch = "?"
    mangled = None
    for line in result.stdout.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            mangled = m.group(1)
        elif mangled and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            regs, stack, shared, local = map(int, m.groups())
            kernels.append(Kernel(arch, mangled, "", regs, stack, shared, local))
            mangled = None
    if arch == "?" and kernels:  # a single cubin: cuobjdump prints no arch line
        found = re.search(r"sm_?(\d{2,3})", path.name)
        for k in kernels:
            k.arch = found.group(1) if found else "?"
    for k, name in zip(kernels, demangle([k.mangled for k in kernels]), strict=True):
        k.name = short_name(name)
    return kernels


def budget_for(name: str, budgets: list[dict]) -> dict:
    base = name.split("<", 1)[0]
    return next(b for b in budgets if b["name"] == "" or b["name"] == base)


def blocks_per_sm(arch: str, registers: int, shared: int) -> int:
    regs_sm, threads_sm, shared_sm, shared_reserved = SM_LIMITS.get(arch, DEFAULT_LIMITS)
    warps = THREADS_PER_BLOCK // 32
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = regs_sm // (regs_per_warp * warps)
    by_threads = threads_sm // THREADS_PER_BLOCK
    by_shared = shared_sm // max(shared, shared_reserved) if shared else by_threads
    return min(by_regs, by_threads, by_shared, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="CUDA library, cubin or object files")
    parser.add_argument("--arch", action="append", help="architectures to check (default: resource_budgets.json's)")
    parser.add_argument("--budgets", type=Path, default=BUDGETS)
    parser.add_argument("--report-only", action="store_true", help="print the table, do not fail")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    config = json.loads(args.budgets.read_text())
    archs = args.arch or config["architectures"]
    cuobjdump = find_cuobjdump()
    kernels = [k for path in args.files for k in read_kernels(path, cuobjdump)]
    failures: list[str] = []
    missing = sorted(set(archs) - {k.arch for k in kernels})
    if missing and not args.report_only:
        print(
            f"cuda_resources.py: no kernels for sm_{', sm_'.join(missing)} in {[str(f) for f in args.files]}",
            file=sys.stderr,
        )
        return 2
    rows = []
    print(f"{'arch':<6}{'regs':>5}{'stack':>6}{'local':>6}{'shared':>7}{'blk/SM':>7}  kernel")
    for k in sorted(kernels, key=lambda k: (k.arch, k.name)):
        if k.arch not in archs:
            continue
        budget = budget_for(k.name, config["kernels"])
        occupancy = blocks_per_sm(k.arch, k.registers, k.shared)
        problems = []
        if k.stack > budget["max_stack_bytes"] or k.local:
            problems.append(f"spills: stack frame {k.stack} B (budget {budget['max_stack_bytes']}), local {k.local} B")
        if k.registers > budget["max_registers"]:
            problems.append(f"{k.registers} registers > budget {budget['max_registers']}")
        if k.shared > budget["max_shared_bytes"]:
            problems.append(f"{k.shared} B shared memory > budget {budget['max_shared_bytes']}")
        flag = "  << " + "; ".join(problems) if problems else ""
        print(f"sm_{k.arch:<3}{k.registers:>5}{k.stack:>6}{k.local:>6}{k.shared:>7}{occupancy:>7}  {k.name}{flag}")
        failures += [f"sm_{k.arch} {k.name}: {p}" for p in problems]
        rows.append({**k.__dict__, "blocks_per_sm": occupancy, "problems": problems})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if failures and not args.report_only:
        print(f"\ncuda_resources.py: {len(failures)} kernel(s) over budget ({args.budgets}):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    print(f"\n{len(rows)} kernels on sm_{', sm_'.join(archs)}: " + ("within budget" if not failures else "report only"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
