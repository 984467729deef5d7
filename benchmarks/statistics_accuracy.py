"""Accuracy of one training step against a float64 reference, InPlaceABN versus torch's batch_norm, on
inputs that stress the statistics: large offsets with a small spread, huge magnitudes, a channel
centred near 0. Prints the relative errors of the output, the running mean and the running variance
(momentum 1: the batch mean and unbiased variance); a statistic's error is taken per channel against
its own scale (the mean against max(|mean|, std)), the output's against max(1, max |y|).

    python benchmarks/statistics_accuracy.py [--json benchmarks/results/statistics_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from inplace_abn import inplace_abn


def make(kind: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, dtype=torch.float64, generator=generator)
    x = {"offset 1e4, std 1e-2": 1e4 + 1e-2 * noise, "mean 0, std 1": noise, "std 5e17": 5e17 * noise}[kind]
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def errors(x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{quantity: (ours, torch's)} relative errors of one training step."""
    channels, x64 = x.size(1), x.double()
    dims = [0, *range(2, x.dim())]
    var64, mean64 = torch.var_mean(x64, dim=dims, correction=0)
    count = x.numel() // channels
    view = [1, channels] + [1] * (x.dim() - 2)
    expected = {
        "y": (x64 - mean64.view(view)) / torch.sqrt(var64.view(view) + 1e-5),
        "running_mean": mean64,
        "running_var": var64 * count / (count - 1),
    }
    scales = {
        "y": expected["y"].abs().max().clamp_min(1.0),
        "running_mean": torch.maximum(mean64.abs(), var64.sqrt()),
        "running_var": expected["running_var"].abs(),
    }
    results: dict[str, list[float]] = {key: [] for key in expected}
    for run in ("ours", "torch"):
        mean, var = torch.zeros(channels), torch.ones(channels)
        if run == "ours":
            y = inplace_abn(x.clone(), None, None, mean, var, True, 1.0, 1e-5, "identity", 0.0)
        else:
            y = torch.nn.functional.batch_norm(x.clone(), mean, var, None, None, True, 1.0, 1e-5)
        for key, value in {"y": y, "running_mean": mean, "running_var": var}.items():
            value = value.double()
            error = (value - expected[key]).abs() / scales[key].clamp_min(1e-30)
            results[key].append(error.max().item() if torch.isfinite(value).all() else math.inf)
    return {key: (r[0], r[1]) for key, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'input':<22}{'dtype':<10}{'layout':<15}{'quantity':<14}{'ours':>10}{'torch':>10}")
    for kind in ("offset 1e4, std 1e-2", "mean 0, std 1", "std 5e17"):
        for dtype in (torch.float32, torch.bfloat16):
            if kind == "std 5e17" and dtype == torch.bfloat16:
                continue  # the same exponent range as float32: the float32 rows say it
            for layout in ("contiguous", "channels_last"):
                x = make(kind, (16, 4, 64, 64), dtype, layout)
                for key, (ours, theirs) in errors(x).items():
                    rows.append(
                        {
                            "input": kind,
                            "dtype": str(dtype),
                            "layout": layout,
                            "quantity": key,
                            "ours": ours,
                            "torch": theirs,
                        }
                    )
                    print(f"{kind:<22}{str(dtype)[6:]:<10}{layout:<15}{key:<14}{ours:>10.2g}{theirs:>10.2g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/statistics_accuracy.py", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
