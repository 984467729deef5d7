"""Per-layer forward + backward time, tiny to large tensors: InPlaceABN (whatever is installed)
versus torch's BatchNorm2d + activation (in place where torch allows it) and versus the same two
modules compiled with torch.compile.

For small tensors the layer time is host overhead (Python, argument checks, operator dispatch,
autograd bookkeeping); for large ones it is the kernels. Every repeat runs every variant once, in
turn, so machine noise hits them alike; reported numbers are medians. Each variant gets a fresh
non-leaf input (a clone made outside the timed region) and the same output gradient. With one
thread the main thread's CPU time is recorded too: on a loaded machine it is steadier than the
wall-clock time.

    python benchmarks/overhead.py --threads 1 --json benchmarks/results/overhead_1thread.json
    python benchmarks/overhead.py --threads 2 --shapes 16,64,56,56 --json benchmarks/results/overhead_large.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from inplace_abn import InPlaceABN

from report import write_report

SHAPES = ["2,16,4,4", "8,64,8,8", "32,256,7,7", "32,2048,7,7", "16,64,56,56"]
ACTIVATIONS = {"leaky_relu": 0.01, "elu": 1.0, "identity": 0.0}
BASELINE = "torch BatchNorm2d + act"


def torch_activation(activation: str) -> nn.Module:
    if activation == "leaky_relu":
        return nn.LeakyReLU(ACTIVATIONS[activation], inplace=True)
    if activation == "elu":
        return nn.ELU(ACTIVATIONS[activation], inplace=True)
    return nn.Identity()


def variants(channels: int, activation: str, compiled: bool) -> dict[str, nn.Module]:
    """The modules compared, by name (the compiled ones compiled lazily, at the warm-up calls)."""
    made: dict[str, nn.Module] = {
        BASELINE: nn.Sequential(nn.BatchNorm2d(channels), torch_activation(activation)),
        "InPlaceABN": InPlaceABN(channels, activation=activation, activation_param=ACTIVATIONS[activation]),
    }
    if compiled:
        made["compiled BatchNorm2d + act"] = torch.compile(
            nn.Sequential(nn.BatchNorm2d(channels), torch_activation(activation))
        )
        made["compiled InPlaceABN"] = torch.compile(
            InPlaceABN(channels, activation=activation, activation_param=ACTIVATIONS[activation])
        )
    return made


def time_step(module: nn.Module, x0: torch.Tensor, dy: torch.Tensor, clock: Callable[[], float]) -> float:
    """Seconds of one forward + backward of `module` on a fresh non-leaf copy of x0."""
    x = x0.clone().requires_grad_().clone()
    start = clock()
    module(x).backward(dy)
    return clock() - start


def measure(shape, memory_format, activation, repeats, warmup, compiled, cpu_time) -> dict:
    x0 = torch.randn(shape).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x0)
    modules = variants(shape[1], activation, compiled)
    wall: dict[str, list[float]] = {name: [] for name in modules}
    cpu: dict[str, list[float]] = {name: [] for name in modules}
    for step in range(warmup + repeats):
        for name, module in modules.items():
            if cpu_time:
                cpu_s = time_step(module, x0, dy, time.thread_time)
            wall_s = time_step(module, x0, dy, time.perf_counter)
            if step >= warmup:
                wall[name].append(wall_s * 1e6)
                if cpu_time:
                    cpu[name].append(cpu_s * 1e6)
    result = {
        "shape": list(shape),
        "memory_format": str(memory_format).replace("torch.", ""),
        "activation": activation,
        "median_wall_us": {name: statistics.median(v) for name, v in wall.items()},
    }
    base = result["median_wall_us"][BASELINE]
    result["wall_ratio_vs_torch"] = {name: m / base for name, m in result["median_wall_us"].items()}
    if cpu_time:
        result["median_cpu_us"] = {name: statistics.median(v) for name, v in cpu.items()}
        base = result["median_cpu_us"][BASELINE]
        result["cpu_ratio_vs_torch"] = {name: m / base for name, m in result["median_cpu_us"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=";".join(SHAPES), help="';'-separated shapes, e.g. '2,16,4,4;8,64,8,8'")
    parser.add_argument("--activations", default=",".join(ACTIVATIONS))
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="repeats per case (default: by tensor size)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd variants")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    cases = []
    for spec in args.shapes.split(";"):
        shape = tuple(int(s) for s in spec.split(","))
        numel = 1
        for s in shape:
            numel *= s
        repeats = args.repeats or (200 if numel < 1 << 16 else 60 if numel < 1 << 22 else 30)
        for fmt in args.formats.split(","):
            for activation in args.activations.split(","):
                result = measure(
                    shape, formats[fmt], activation, repeats, args.warmup, not args.no_compile, args.threads == 1
                )
                result["repeats"] = repeats
                cases.append(result)
                times = result.get("median_cpu_us", result["median_wall_us"])
                ratios = result.get("cpu_ratio_vs_torch", result["wall_ratio_vs_torch"])
                print(
                    f"{shape} {fmt} {activation} ({'CPU' if 'median_cpu_us' in result else 'wall'} us, "
                    f"x torch, median of {repeats}): "
                    + "; ".join(f"{name} {times[name]:.0f} ({ratios[name]:.2f}x)" for name in times),
                    flush=True,
                )
    write_report("overhead.py", args, cases)


if __name__ == "__main__":
    main()
