"""How much of the U-Net training step (the main job, `python -m inplace_abn bench`) the normalization
layers take, and so how far swapping them can move the step: the same U-Net with BatchNorm2d +
LeakyReLU, with InPlaceABN, and with LeakyReLU alone (no normalization: the floor that any
normalization layer adds to), interleaved in every repeat, medians.

The normalization layers' time in the step is the variant's step time minus the floor's; the best step
ratio any normalization could reach is floor / BatchNorm2d's step.

    python benchmarks/unet_share.py --repeats 20 --json benchmarks/results/unet_share.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from inplace_abn.bench import VARIANTS, Config, UNet, _train_step

from report import write_report


def leaky_relu_only(channels: int) -> nn.Module:
    """The activation without normalization: what the normalization layers' time is measured from."""
    return nn.LeakyReLU(0.01, inplace=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=Config.batch)
    parser.add_argument("--size", type=int, default=Config.size)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--note", default="")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {**VARIANTS, "LeakyReLU only (no normalization)": leaky_relu_only}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    models = {}
    for name, norm_act in variants.items():
        torch.manual_seed(0)
        models[name] = UNet(norm_act)
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.warmup + args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            _train_step(model, x)
            if step >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    step_ms = {name: statistics.median(t) for name, t in times.items()}
    torch_ms, ours_ms, floor_ms = step_ms.values()
    summary = {
        "step_ms": step_ms,
        "normalization_ms": {"BatchNorm2d + LeakyReLU": torch_ms - floor_ms, "InPlaceABN": ours_ms - floor_ms},
        "normalization_share_of_torch_step": (torch_ms - floor_ms) / torch_ms,
        "step_ratio_ours_to_torch": ours_ms / torch_ms,
        "best_step_ratio_possible": floor_ms / torch_ms,
    }
    print(f"U-Net {args.batch}x3x{args.size}x{args.size}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, ms in step_ms.items():
        print(f"  {name:<36}{ms:9.1f} ms")
    print(
        f"  normalization layers: torch {summary['normalization_ms']['BatchNorm2d + LeakyReLU']:.1f} ms "
        f"({summary['normalization_share_of_torch_step']:.0%} of its step), "
        f"InPlaceABN {summary['normalization_ms']['InPlaceABN']:.1f} ms"
    )
    print(
        f"  step ratio InPlaceABN / torch {summary['step_ratio_ours_to_torch']:.3f}; "
        f"with normalization costing nothing: {summary['best_step_ratio_possible']:.3f}"
    )
    write_report("unet_share.py", args, [summary])


if __name__ == "__main__":
    main()
