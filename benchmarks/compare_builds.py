"""Two builds of inplace_abn compared layer by layer: cpu_layer.py run in alternating processes (the
same operator names cannot be loaded twice into one process), so that slow phases of a shared host hit
both builds alike. Reports, per case, the median over rounds of each build's median layer time and of
its speedup over torch's BatchNorm2d + activation measured in the same process.

    pip install --no-deps --target /tmp/old_pkg <old checkout>     # the build to compare against
    python benchmarks/compare_builds.py /tmp/old_pkg - --rounds 8 --json out.json -- --threads 1 --clock cpu

A build is a directory put first on sys.path (an install made with --target) or "-", the installed one;
--before-isa / --after-isa cap its CPU kernels' instruction set (INPLACE_ABN_CPU_ISA), so that one
install compares its own kernel builds:

    python benchmarks/compare_builds.py - - --before-isa avx2 --rounds 8 -- --threads 2

Arguments after "--" go to cpu_layer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS, THEIRS = "InPlaceABN", "torch BatchNorm2d + activation"


def run_layer(build: str, isa: str | None, layer_args: list[str], json_path: Path) -> dict:
    env = dict(os.environ)
    if isa:
        env["INPLACE_ABN_CPU_ISA"] = isa
    if build != "-":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [build, env.get("PYTHONPATH")]))
    command = [sys.executable, str(HERE / "cpu_layer.py"), "--no-fallback", *layer_args, "--json", str(json_path)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(json_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="package directory of the reference build, or - for the installed one")
    parser.add_argument("after", help="package directory of the build under test, or - for the installed one")
    parser.add_argument("--before-isa", help="INPLACE_ABN_CPU_ISA for the reference build (avx2, baseline)")
    parser.add_argument("--after-isa", help="INPLACE_ABN_CPU_ISA for the build under test")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", help="write every round's report and the summary here")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.layer_args = argv[split + 1 :]
    builds = {"before": (args.before, args.before_isa), "after": (args.after, args.after_isa)}
    reports: dict[str, list[dict]] = {name: [] for name in builds}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (build, isa) in builds.items():
                reports[name].append(run_layer(build, isa, args.layer_args, Path(tmp) / "round.json"))

    summary = []
    first = reports["before"][0]["cases"]
    kernels = {name: reports[name][0]["machine"].get("cpu_kernels") for name in builds}
    print(f"median over {args.rounds} alternating rounds; cpu_layer.py {' '.join(args.layer_args)}; kernels {kernels}")
    print(f"{'case':<40}{'before ms':>10}{'after ms':>10}{'after/before':>13}{'vs torch before':>16}{'after':>7}")
    for index, case in enumerate(first):
        label = f"{case['memory_format']} {case['dtype']} {case['activation']}"
        row = {"case": label}
        for name in builds:
            cases = [report["cases"][index] for report in reports[name]]
            row[f"{name}_ms"] = statistics.median(c["median_ms"][OURS]["total"] for c in cases)
            row[f"{name}_torch_ms"] = statistics.median(c["median_ms"][THEIRS]["total"] for c in cases)
            row[f"{name}_vs_torch"] = statistics.median(c["speedup_vs_torch"][OURS] for c in cases)
        row["after_over_before"] = row["after_ms"] / row["before_ms"]
        summary.append(row)
        print(
            f"{label:<40}{row['before_ms']:>10.2f}{row['after_ms']:>10.2f}{row['after_over_before']:>13.3f}"
            f"{row['before_vs_torch']:>15.2f}x{row['after_vs_torch']:>6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "summary": summary, "rounds": reports}, f, indent=2)


if __name__ == "__main__":
    main()
