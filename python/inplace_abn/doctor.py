"""`python -m inplace_abn doctor`: what this environment has, what inplace_abn loaded and was built
for, a quick self-test of the kernels, and for each problem found its fix.

Exits with status 1 when something is broken (a problem of severity "error"), 0 otherwise; `--json`
prints the same report as JSON, for bug reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, _native, reference
from .functions import inplace_abn

CPU_ISA_ENV = "INPLACE_ABN_CPU_ISA"  # caps the CPU kernels' instruction set (src/cpu/ops_cpu.cpp)


def _gpus(cuda_info: dict[str, Any]) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        gpus.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "capability": f"{capability[0]}.{capability[1]}",
                "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
                "covered_by_kernels": _native.gpu_is_covered(capability, cuda_info) if cuda_info else None,
            }
        )
    return gpus


def _self_test(device: str) -> str | None:
    """Runs a small forward + backward against the reference math; returns an error text or None."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64).to(device)
        weight = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, device=device, requires_grad=True)
        dy = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device)
        leaf = x.clone().requires_grad_()
        y = inplace_abn(leaf.clone(), weight, None, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1)
        y.backward(dy)
        mean, var = reference.statistics(x)
        expected = x.clone()
        reference.normalize_act_(expected, mean, var, weight.detach(), None, 1e-5, "leaky_relu", 0.1, None)
        error = (y.detach() - expected).abs().max().item()
        if not error < 1e-9 or not torch.isfinite(leaf.grad).all():
            return f"forward differs from the reference by {error:.3g}"
    except Exception as failure:  # the report must be produced whatever goes wrong
        return f"{type(failure).__name__}: {failure}"
    return None


def collect() -> dict[str, Any]:
    """The whole diagnosis as a JSON-ready dict."""
    status = _native.load()
    cuda_info = status.cuda_info()
    problems = status.problems()
    gpus = _gpus(cuda_info)
    cuda_lib = status.libraries.get("cuda")
    if cuda_lib is not None and cuda_lib.loaded:
        for gpu in gpus:
            if gpu["covered_by_kernels"] is False:
                capability = tuple(int(v) for v in gpu["capability"].split("."))
                problems.append(_native.architecture_problem(capability, gpu["name"], cuda_info))
    if gpus and cuda_lib is None and torch.version.cuda:
        problems.append(
            _native.Problem(
                "warning",
                "this installation has no CUDA kernels: tensors on the GPU use the slow pure-PyTorch fallback",
                "a build from source without a CUDA compiler",
                f"pip install --force-reinstall {_native.DISTRIBUTION} (the wheel carries CUDA 12 and CUDA 13 "
                f"kernels), or rebuild with nvcc {torch.version.cuda.split('.')[0]}.x on PATH",
            )
        )

    cap = os.environ.get(CPU_ISA_ENV)
    builds = status.build_info.get("cpu_isas", [])  # the CPU kernel builds, from the portable one up
    if cap and builds and cap not in builds:
        names = ", ".join(reversed(builds))
        problems.append(
            _native.Problem(
                "warning",
                f"{CPU_ISA_ENV}={cap!r} is not an instruction set of the CPU kernels: ignored, the best one is used",
                f"a value other than {names} (lowercase)",
                f"set {CPU_ISA_ENV} to one of {names}, or unset it",
            )
        )

    self_test = {"cpu": _self_test("cpu")}
    if gpus:
        self_test["cuda"] = _self_test("cuda")
    for device, failure in self_test.items():
        if failure is not None:
            problems.append(
                _native.Problem(
                    "error",
                    f"the {device.upper()} self-test failed: {failure}",
                    "a broken build or installation",
                    f"{_native.REINSTALL}; if it persists, report this output (--json)",
                )
            )

    cpu_lib = status.libraries.get("cpu")
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "torch": {
            "version": torch.__version__,
            "path": str(Path(torch.__file__).parent),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "cuda_available": torch.cuda.is_available(),
            "gpus": gpus,
        },
        "inplace_abn": {
            "version": __version__,
            "distribution": {
                name: _native._distribution_version(name)
                for name in (_native.DISTRIBUTION, _native.MAPILLARY_DISTRIBUTION)
            },
            "path": str(_native.PACKAGE_DIR),
            "build": status.build_info,
        },
        "libraries": {
            key: {
                "file": _native.library_filename(lib.name) if lib.path else None,
                "path": lib.path,
                "loaded": lib.loaded,
                "note": lib.note,
                "problem": lib.problem.message() if lib.problem else None,
            }
            for key, lib in status.libraries.items()
        },
        "cpu_kernels": torch.ops.inplace_abn.cpu_isa() if cpu_lib is not None and cpu_lib.loaded else "fallback",
        "dll_directories": status.dll_directories,
        "self_test": {device: failure or "ok" for device, failure in self_test.items()},
        "problems": [{"severity": p.severity, "summary": p.summary, "cause": p.cause, "fix": p.fix} for p in problems],
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text, problems (with their fixes) last."""
    build = report["inplace_abn"]["build"]
    cuda = _native.cuda_libraries(build)
    installed = ", ".join(
        f"{name} {version}" for name, version in report["inplace_abn"]["distribution"].items() if version
    )
    lines = [
        f"python        {report['python']['version']} ({report['python']['executable']})",
        f"os            {report['os']['platform']}",
        f"torch         {report['torch']['version']} at {report['torch']['path']}",
        f"torch CUDA    {report['torch']['cuda'] or 'none (CPU-only build)'}"
        + (f", cuDNN {report['torch']['cudnn']}" if report["torch"]["cudnn"] else ""),
    ]
    for gpu in report["torch"]["gpus"]:
        covered = {True: "covered", False: "NOT covered", None: "no CUDA kernels"}[gpu["covered_by_kernels"]]
        lines.append(
            f"GPU {gpu['index']}         {gpu['name']}, compute capability {gpu['capability']}, "
            f"{gpu['memory_gib']} GiB ({covered})"
        )
    if not report["torch"]["gpus"]:
        lines.append("GPUs          none visible")
    lines += [
        f"inplace_abn   {report['inplace_abn']['version']} at {report['inplace_abn']['path']}"
        + f" (installed: {installed or 'no distribution metadata'})",
        f"built for     torch >= {build.get('torch_target', '?')} (built with {build.get('torch_built_with', '?')}), "
        f"{build.get('compiler', '?')}, {build.get('system', '?')}",
    ]
    for major, info in cuda.items():
        lines.append(
            f"CUDA {major} lib   CUDA {info.get('version')}, code for "
            + ", ".join(f"sm_{a}" for a in info.get("architectures", []))
            + (f", PTX sm_{info['ptx']}" if info.get("ptx") else "")
        )
    if not cuda:
        lines.append("CUDA libs     none (CPU kernels only)")
    for name, lib in report["libraries"].items():
        if lib["note"]:
            lines.append(f"library {name:<5} not loaded: {lib['note']}")
        else:
            state = "loaded" if lib["loaded"] else "NOT loaded"
            lines.append(f"library {name:<5} {state}: {lib['path']}")
    lines.append(f"CPU kernels   {report['cpu_kernels']}")
    if report["dll_directories"]:
        lines.append("DLL folders   " + "; ".join(report["dll_directories"]))
    lines.append("self-test     " + ", ".join(f"{d}: {r}" for d, r in report["self_test"].items()))
    lines.append("")
    if not report["problems"]:
        lines.append("No problems found.")
    for problem in report["problems"]:
        lines += [
            f"{problem['severity'].upper()}: {problem['summary']}",
            f"  cause: {problem['cause']}",
            f"  fix:   {problem['fix']}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`inplace-abn doctor [--json]`; exit status 1 when something is broken."""
    parser = argparse.ArgumentParser(prog="inplace-abn doctor", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for bug reports)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if any(p["severity"] == "error" for p in report["problems"]) else 0
