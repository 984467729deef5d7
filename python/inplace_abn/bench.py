"""The memory / speed demonstration: a U-Net trained with BatchNorm2d + LeakyReLU versus InPlaceABN.

For each variant it measures the activation memory autograd keeps for backward (unique storages
of the saved tensors, parameters excluded), the forward + backward time per iteration (median of
repeats, the variants interleaved so machine noise hits both alike) and, on a GPU, the peak memory.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, ops
from .abn import InPlaceABN

NormAct = Callable[[int], nn.Module]


def batchnorm_leaky_relu(channels: int) -> nn.Module:
    """The standard pair: BatchNorm2d then an in-place LeakyReLU."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True))


def inplace_abn_leaky_relu(channels: int) -> nn.Module:
    return InPlaceABN(channels, activation="leaky_relu", activation_param=0.01)


VARIANTS: dict[str, NormAct] = {"BatchNorm2d + LeakyReLU": batchnorm_leaky_relu, "InPlaceABN": inplace_abn_leaky_relu}


class DoubleConv(nn.Sequential):
    """(3x3 convolution, normalization + activation) twice: the U-Net building block."""

    def __init__(self, in_channels: int, out_channels: int, norm_act: NormAct) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            norm_act(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            norm_act(out_channels),
        )


class UNet(nn.Module):
    """U-Net: an encoder of DoubleConv blocks with max-pooling, a mirrored decoder with
    transposed-convolution upsampling and skip connections, and a 1x1 classifier."""

    def __init__(
        self, norm_act: NormAct, in_channels: int = 3, classes: int = 2, width: int = 16, depth: int = 4
    ) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList([DoubleConv(in_channels, widths[0], norm_act)])
        self.encoder.extend(DoubleConv(widths[i], widths[i + 1], norm_act) for i in range(depth))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], norm_act) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for upsample, block, skip in zip(self.upsample, self.decoder, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.classifier(x)


@dataclass
class Config:
    """What to run: U-Net shape, input size and measurement repeats."""

    device: str = "cpu"
    batch: int = 8
    size: int = 128
    width: int = 16
    depth: int = 4
    repeats: int = 15
    warmup: int = 3
    threads: int | None = None


@dataclass
class Measurement:
    """One variant's numbers."""

    kept_for_backward_mb: float
    time_ms: float
    times_ms: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None


def kept_for_backward(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in model(x), parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        address = t.untyped_storage().data_ptr()
        if address not in parameters:
            storages[address] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()


def _peak_memory_mb(model: nn.Module, x: torch.Tensor) -> float | None:
    if x.device.type != "cuda":
        return None
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    _train_step(model, x)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) / 2**20


class Progress:
    """A one-line progress bar on a terminal, a few lines otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        filled = int(30 * self.done / self.total)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + line.ljust(80))
            if self.done == self.total:
                self.stream.write(f"\n{time.perf_counter() - self.started:.1f} s\n")
        elif self.done == self.total or self.done % max(1, self.total // 5) == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def run(config: Config, stream: TextIO = sys.stderr) -> dict:
    """Measures every variant on the same input; returns a JSON-ready report."""
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    x = torch.randn(config.batch, 3, config.size, config.size, device=device)
    models = {}
    for name, norm_act in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = UNet(norm_act, width=config.width, depth=config.depth).to(device)

    progress = Progress(len(models) * (1 + config.warmup + config.repeats), stream)
    kept = {}
    for name, model in models.items():
        kept[name] = kept_for_backward(model, x)
        model.zero_grad(set_to_none=True)
        progress.step(f"{name}: saved tensors")
    for _ in range(config.warmup):
        for name, model in models.items():
            _train_step(model, x)
            progress.step(f"{name}: warm-up")
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(config.repeats):
        for name, model in models.items():  # interleaved: drifts of the machine hit both alike
            _synchronize(device)
            start = time.perf_counter()
            _train_step(model, x)
            _synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            progress.step(f"{name}: timing")

    results = {
        name: Measurement(
            kept_for_backward_mb=kept[name] / 2**20,
            time_ms=statistics.median(times[name]),
            times_ms=times[name],
            peak_memory_mb=_peak_memory_mb(models[name], x),
        )
        for name in models
    }
    baseline, ours = results["BatchNorm2d + LeakyReLU"], results["InPlaceABN"]
    ratios = {
        "kept_for_backward": ours.kept_for_backward_mb / baseline.kept_for_backward_mb,
        "speedup": baseline.time_ms / ours.time_ms,
    }
    if ours.peak_memory_mb and baseline.peak_memory_mb:
        ratios["peak_memory"] = ours.peak_memory_mb / baseline.peak_memory_mb
    return {
        "config": asdict(config),
        "environment": environment(device),
        "results": {name: asdict(m) for name, m in results.items()},
        "ratios": ratios,
    }


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded with every report."""
    env = {
        "inplace_abn": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpu_kernels": torch.ops.inplace_abn.cpu_isa() if ops.uses_native(torch.device("cpu")) else "fallback",
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def format_table(report: dict) -> str:
    """The report as a text table."""
    config, env, results, ratios = report["config"], report["environment"], report["results"], report["ratios"]
    lines = [
        f"U-Net (width {config['width']}, depth {config['depth']}), input {config['batch']}x3x{config['size']}x"
        f"{config['size']}, {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else f", {env['threads']} threads")
        + f", torch {env['torch']}, median of {config['repeats']}",
        "",
        f"{'variant':<26}{'kept for backward':>20}{'fwd+bwd time':>16}"
        + (f"{'peak memory':>16}" if "peak_memory" in ratios else ""),
    ]
    for name, m in results.items():
        row = f"{name:<26}{m['kept_for_backward_mb']:>17.1f} MB{m['time_ms']:>13.1f} ms"
        if "peak_memory" in ratios:
            row += f"{m['peak_memory_mb']:>13.1f} MB"
        lines.append(row)
    ratio_row = f"{'ratio InPlaceABN / BN':<26}{ratios['kept_for_backward']:>20.1%}{1 / ratios['speedup']:>15.2f}x"
    if "peak_memory" in ratios:
        ratio_row += f"{ratios['peak_memory']:>16.1%}"
    speed = ratios["speedup"]
    lines += [
        ratio_row,
        "",
        f"InPlaceABN keeps {1 - ratios['kept_for_backward']:.0%} less activation memory for backward; a "
        f"training step takes {1 / speed:.2f}x the time of BatchNorm2d + LeakyReLU "
        f"({speed:.2f}x {'faster' if speed >= 1 else 'the speed'}).",
    ]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Bar charts of kept memory and time per variant (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib ({error}): pip install 'inplace-abn[plot]'") from error
    names = list(report["results"])
    panels = [
        ("kept_for_backward_mb", "activation memory kept for backward (MB)"),
        ("time_ms", "forward + backward time per iteration (ms)"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(10, 4))
    for axis, (key, title) in zip(axes, panels, strict=True):
        values = [report["results"][n][key] for n in names]
        bars = axis.bar(names, values, color=["#999999", "#3b7dd8"])
        axis.bar_label(bars, fmt="%.1f")
        axis.margins(y=0.15)
        axis.set_title(title, fontsize=10)
    env = report["environment"]
    figure.suptitle(f"U-Net training step, {env['device']}, torch {env['torch']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Iterable[str] | None = None) -> int:
    """`inplace-abn bench`: parse arguments, run, print the table, write JSON / plot."""
    import argparse

    parser = argparse.ArgumentParser(prog="inplace-abn bench", description=__doc__)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    parser.add_argument("--batch", type=int, default=Config.batch)
    parser.add_argument("--size", type=int, default=Config.size, help="input height and width")
    parser.add_argument("--width", type=int, default=Config.width, help="channels of the first U-Net level")
    parser.add_argument("--depth", type=int, default=Config.depth, help="number of downsamplings")
    parser.add_argument("--repeats", type=int, default=Config.repeats, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=Config.warmup)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (smoke test)")
    parser.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the numbers (needs matplotlib)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.quick:
        args.batch, args.size, args.width, args.depth, args.repeats, args.warmup = 2, 32, 4, 2, 3, 1
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA GPU is available to this torch ({torch.__version__})")
    for name in ("batch", "size", "width", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.depth < 0 or args.warmup < 0:
        parser.error("--depth and --warmup must be >= 0")
    if args.size % 2**args.depth:
        parser.error(f"--size must be divisible by 2**depth = {2**args.depth}")
    config = Config(device, args.batch, args.size, args.width, args.depth, args.repeats, args.warmup, args.threads)
    report = run(config)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
