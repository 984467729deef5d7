"""Does In-Place ABN's memory saving hold under torch.compile? Bytes kept for backward, eager and compiled.

For the U-Net of the main job (`python -m inplace_abn bench`) and a plain stack of (3x3 convolution,
normalization + LeakyReLU) blocks, with BatchNorm2d + LeakyReLU(inplace=True) and with InPlaceABN:
the unique storages autograd keeps for backward in one training forward (parameters excluded), in eager
mode and compiled with torch.compile (Inductor by default). Memory counts do not depend on the machine's
load, so one measurement each suffices.

    python benchmarks/compile_memory.py --json benchmarks/results/compile_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
import torch.nn as nn

from inplace_abn.bench import VARIANTS, UNet, environment, kept_for_backward

Model = Callable[[Callable[[int], nn.Module]], nn.Module]


def conv_stack(norm_act: Callable[[int], nn.Module], blocks: int = 8, channels: int = 16) -> nn.Module:
    """`blocks` times (3x3 convolution without bias, normalization + activation)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_act(channels)]
    return nn.Sequential(*layers)


MODELS: dict[str, tuple[Model, tuple[int, ...]]] = {
    "U-Net (width 16, depth 4)": (lambda norm_act: UNet(norm_act), (8, 3, 128, 128)),
    "conv stack (8 blocks, 16 channels)": (conv_stack, (4, 16, 32, 32)),
}


def measure(backend: str) -> dict:
    """{model: {variant: {"eager": MB, "compiled": MB}}} plus the ratios InPlaceABN / BatchNorm."""
    report: dict = {}
    for model_name, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        x = torch.randn(shape)
        kept: dict[str, dict[str, float]] = {}
        for variant, norm_act in VARIANTS.items():
            torch.manual_seed(0)
            model = build(norm_act)
            compiled = torch.compile(model, backend=backend)
            compiled(x).sum().backward()  # compile outside the measurement
            kept[variant] = {
                "eager_mb": kept_for_backward(model, x) / 2**20,
                "compiled_mb": kept_for_backward(compiled, x) / 2**20,
            }
            print(f"{model_name}, {variant}: {kept[variant]}", file=sys.stderr)
        ours, theirs = kept["InPlaceABN"], kept["BatchNorm2d + LeakyReLU"]
        report[model_name] = {
            "input": list(shape),
            "kept_for_backward": kept,
            "ratio_eager": ours["eager_mb"] / theirs["eager_mb"],
            "ratio_compiled": ours["compiled_mb"] / theirs["compiled_mb"],
        }
    return report


def format_table(report: dict) -> str:
    lines = [f"{'model':36} {'variant':24} {'eager MB':>9} {'compiled MB':>12}"]
    for model_name, entry in report.items():
        for variant, kept in entry["kept_for_backward"].items():
            lines.append(f"{model_name:36} {variant:24} {kept['eager_mb']:9.2f} {kept['compiled_mb']:12.2f}")
        lines.append(
            f"{model_name:36} {'ratio InPlaceABN / BN':24} {entry['ratio_eager']:9.1%} {entry['ratio_compiled']:12.1%}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="write the numbers to FILE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = measure(args.backend)
    print(format_table(report))
    if args.json:
        record = {
            "command": "python " + " ".join(sys.argv),
            "backend": args.backend,
            "environment": environment(torch.device("cpu")),
            "models": report,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
