"""Where the host time of a tiny InPlaceABN layer goes (forward + backward, one thread, CPU time):
the whole module against the same call with fewer layers of Python around it, down to an empty
autograd.Function (the floor of any Python autograd.Function) and the two native operator calls alone,
beside torch's BatchNorm2d + LeakyReLU(inplace) and a one-op C++ autograd graph (x * 1).
All variants run interleaved in every repeat; numbers are medians.

    python benchmarks/overhead_breakdown.py --shape 2,16,4,4 --json benchmarks/results/overhead_breakdown.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from inplace_abn import InPlaceABN
from inplace_abn.functions import _LOCAL, _check_arguments, _InPlaceABN, inplace_abn

from report import write_report


class EmptyFunction(torch.autograd.Function):
    """What every in-place autograd.Function pays: mark_dirty, one saved tensor, a Python backward."""

    @staticmethod
    def forward(ctx, x, *args):
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy):
        _ = ctx.saved_tensors  # unpacking saved tensors is part of every backward
        return (dy,) + (None,) * 10


def variants(shape: tuple[int, ...]) -> dict[str, Callable[[], int]]:
    """Name -> a function that runs one forward + backward and returns its CPU time in ns."""
    channels = shape[1]
    module = InPlaceABN(channels)
    torch_layer = nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True))
    w, b, rm, rv = module.weight, module.bias, module.running_mean, module.running_var
    x0, dy, var = torch.randn(shape), torch.randn(shape), torch.ones(channels)
    forward_op = torch.ops.inplace_abn.train_forward_.default
    backward_op = torch.ops.inplace_abn.train_backward.default
    args = (True, 0.1, 1e-5, "leaky_relu", 0.01)

    @torch.no_grad()
    def native_operators(x: torch.Tensor) -> None:
        forward_op(x, w, b, rm, rv, 0.1, 1e-5, "leaky_relu", 0.01, None)
        backward_op(x, dy, var, w, b, 1e-5, "leaky_relu", 0.01)

    def timed(body: Callable[[torch.Tensor], None], requires_grad: bool = True) -> Callable[[], int]:
        def run() -> int:
            x = x0.clone().requires_grad_().clone() if requires_grad else x0.clone()
            start = time.process_time_ns()
            body(x)
            return time.process_time_ns() - start

        return run

    return {
        "torch BatchNorm2d + LeakyReLU(inplace)": timed(lambda x: torch_layer(x).backward(dy)),
        "InPlaceABN module": timed(lambda x: module(x).backward(dy)),
        "inplace_abn function": timed(lambda x: inplace_abn(x, w, b, rm, rv, *args).backward(dy)),
        "_InPlaceABN.apply (no checks)": timed(
            lambda x: _InPlaceABN.apply(x, w, b, rm, rv, *args, _LOCAL).backward(dy)
        ),
        "argument checks alone": timed(lambda x: _check_arguments(x, w, b, rm, rv, *args, 2, False)),
        "empty autograd.Function": timed(lambda x: EmptyFunction.apply(x, w, b, rm, rv, *args, None).backward(dy)),
        "x * 1, C++ autograd": timed(lambda x: (x * 1).backward(dy)),
        # Without grad mode, as autograd.Function runs them (with it, the dispatcher's autograd fallback
        # for operators without an autograd kernel adds ~15 us).
        "two native operators alone": timed(lambda x: native_operators(x), requires_grad=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,16,4,4")
    parser.add_argument("--repeats", type=int, default=3000)
    parser.add_argument("--note", default="")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    runs = variants(shape)
    times: dict[str, list[int]] = {name: [] for name in runs}
    for step in range(args.repeats + 50):
        for name, run in runs.items():
            elapsed = run()
            if step >= 50:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) / 1e3 for name, t in times.items()}
    print(f"{shape}, one thread, CPU time, median of {args.repeats}")
    for name, us in medians.items():
        print(f"  {name:<42}{us:8.1f} us")
    write_report("overhead_breakdown.py", args, [{"shape": list(shape), "median_cpu_us": medians}])


if __name__ == "__main__":
    main()
