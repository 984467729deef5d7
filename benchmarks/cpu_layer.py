"""One normalization layer on the CPU, forward + backward: InPlaceABN (fused kernels) versus torch's
BatchNorm2d + LeakyReLU(inplace=True) versus InPlaceABN on the pure-PyTorch fallback.

All variants run side by side in one process, interleaved in every repeat so machine noise hits them
alike; reported numbers are medians. Each variant gets a fresh non-leaf input (a clone of a leaf that
requires grad, made outside the timed region) and the same output gradient.

    python benchmarks/cpu_layer.py --threads 2 --json benchmarks/results/cpu_layer.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from inplace_abn import InPlaceABN, ops

from report import write_report

ACTIVATION_PARAMS = {"leaky_relu": 0.01, "elu": 1.0, "identity": 0.0}


def torch_batchnorm(channels: int, activation: str) -> nn.Module:
    if activation == "leaky_relu":
        act: nn.Module = nn.LeakyReLU(0.01, inplace=True)
    elif activation == "elu":
        act = nn.ELU(1.0, inplace=True)
    else:
        act = nn.Identity()
    return nn.Sequential(nn.BatchNorm2d(channels), act)


def in_place_abn(channels: int, activation: str) -> nn.Module:
    return InPlaceABN(channels, activation=activation, activation_param=ACTIVATION_PARAMS[activation])


class Fallback(nn.Module):
    """InPlaceABN forced onto the pure-PyTorch reference operators (forward and backward)."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.inner = in_place_abn(channels, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@contextlib.contextmanager
def reference_operators():
    native = ops.uses_native
    ops.uses_native = lambda device: False
    try:
        yield
    finally:
        ops.uses_native = native


VARIANTS: dict[str, Callable[[int, str], nn.Module]] = {
    "torch BatchNorm2d + activation": torch_batchnorm,
    "InPlaceABN": in_place_abn,
    "InPlaceABN, pure-PyTorch fallback": lambda c, a: Fallback(c, a),
}


def measure(
    shape, memory_format, activation, repeats, warmup, variants, dtype=torch.float32, clock=time.perf_counter
) -> dict:
    x0 = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x0)
    modules = {name: make(shape[1], activation).to(dtype) for name, make in variants.items()}
    timings = {name: {"forward": [], "backward": [], "total": []} for name in modules}
    for step in range(warmup + repeats):
        for name, module in modules.items():
            leaf = x0.clone().requires_grad_()
            x = leaf.clone()
            context = reference_operators() if isinstance(module, Fallback) else contextlib.nullcontext()
            with context:
                start = clock()
                y = module(x)
                middle = clock()
                y.backward(dy)
                end = clock()
            if step >= warmup:
                timings[name]["forward"].append((middle - start) * 1e3)
                timings[name]["backward"].append((end - middle) * 1e3)
                timings[name]["total"].append((end - start) * 1e3)
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    baseline = medians["torch BatchNorm2d + activation"]["total"]
    return {
        "shape": list(shape),
        "memory_format": str(memory_format).replace("torch.", ""),
        "dtype": str(dtype).replace("torch.", ""),
        "activation": activation,
        "median_ms": medians,
        "speedup_vs_torch": {name: baseline / m["total"] for name, m in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16,64,56,56")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--activations", default="leaky_relu,elu", help="comma-separated: leaky_relu, elu, identity")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, ...")
    parser.add_argument("--formats", default="contiguous,channels_last")
    parser.add_argument("--no-fallback", action="store_true", help="leave out the pure-PyTorch fallback")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter; cpu: the process's CPU time (all threads), steadier on a shared host",
    )
    parser.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_fallback and "fallback" in k)}
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    cases = []
    for memory_format in (formats[f] for f in args.formats.split(",")):
        for activation in args.activations.split(","):
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            result = measure(shape, memory_format, activation, args.repeats, args.warmup, variants, dtype, clock)
            cases.append(result)
            print(
                f"\n{tuple(shape)} {result['memory_format']} {args.dtype} {activation}, {args.threads} threads, "
                f"median of {args.repeats}"
            )
            print(f"  {'variant':<36}{'forward':>10}{'backward':>10}{'total':>10}{'vs torch':>10}")
            for name, m in result["median_ms"].items():
                print(
                    f"  {name:<36}{m['forward']:>8.2f}ms{m['backward']:>8.2f}ms{m['total']:>8.2f}ms"
                    f"{result['speedup_vs_torch'][name]:>9.2f}x"
                )
    write_report("cpu_layer.py", args, cases)


if __name__ == "__main__":
    main()
