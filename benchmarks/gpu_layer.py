"""InPlaceABN on a GPU: one normalization layer's forward, backward and forward + backward times against
torch's BatchNorm2d + LeakyReLU(inplace=True), eager and under torch.compile; achieved memory bandwidth
against a measured device-to-device copy; peak training memory and the largest batch within a memory
budget for a ResNet-50-like bottleneck stack and for the U-Net of `python -m inplace_abn bench`.

Each case compiles its own torch.compile variant after resetting Dynamo (a shared cache would hit
the recompile limit after 8 cases and silently run eager; hitting it now fails the run). Also
measured: per-layer host overhead on a launch-bound small shape (CPU wall time per forward +
backward, GPU synchronized once per batch of calls).

Protocol: every variant gets a fresh non-leaf input (a clone of a leaf, made outside the timed region),
the same output gradient and a flushed L2 cache; times are CUDA-event medians over repeats in which
the variants are interleaved, after warm-up. Mixed precision rows use 16-bit activations with float32
parameters and statistics (as under autocast). Ideal traffic for InPlaceABN (T = one pass over the
tensor): forward 3T (statistics read, normalize read + write), backward 5T (reduce reads y and dy,
the input gradient reads y and dy and writes dx); bandwidth = ideal bytes / time.

    python benchmarks/gpu_layer.py --json benchmarks/results/gpu_layer.json      # a few minutes on an H100
    python benchmarks/gpu_layer.py --quick                                        # smoke test
    python benchmarks/gpu_layer.py --shapes 32x256x56x56,256x2048x7x7 --dtypes bfloat16   # a subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import inplace_abn
from inplace_abn import InPlaceABN, ops
from inplace_abn.bench import UNet

SHAPES = [(32, 256, 56, 56), (64, 64, 112, 112), (32, 64, 112, 112), (8, 32, 512, 512), (256, 2048, 7, 7)]
SMALL_SHAPE = (2, 16, 8, 8)  # launch-bound: host overhead
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SLOPE = 0.01


def batchnorm_leaky_relu(channels: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE, inplace=True))


def inplace_abn_leaky_relu(channels: int) -> nn.Module:
    return InPlaceABN(channels, activation="leaky_relu", activation_param=SLOPE)


class Flusher:
    """Overwrites a buffer larger than the L2 cache, so that no variant starts with its data cached."""

    def __init__(self, device: torch.device) -> None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        self.buffer = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[3:]) / 1e9


@dataclass
class Variant:
    name: str
    module: nn.Module  # called on a fresh non-leaf input; its output's backward is timed


def layer_variants(channels: int, device: torch.device, compile_torch: bool) -> list[Variant]:
    variants = [
        Variant("InPlaceABN", inplace_abn_leaky_relu(channels).to(device)),
        Variant("BN+LeakyReLU eager", batchnorm_leaky_relu(channels).to(device)),
    ]
    if compile_torch:
        # A fresh Dynamo state per case: the compiled variants of all cases would otherwise share one
        # cache, and after the recompile limit the later ones would silently run eager.
        torch._dynamo.reset()
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        variants.append(
            Variant("BN+LeakyReLU compiled", torch.compile(batchnorm_leaky_relu(channels).to(device), fullgraph=True))
        )
    return variants


def measure_layer(shape, dtype, memory_format, args, device, flush: Flusher) -> dict:
    """Median forward / backward / total milliseconds of each variant on one input."""
    torch.manual_seed(0)
    leaf = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn_like(leaf)
    variants = layer_variants(shape[1], device, not args.skip_compile)
    timings = {v.name: {"forward": [], "backward": [], "total": []} for v in variants}
    for step in range(args.warmup + args.repeats):
        events = []
        for v in variants:
            leaf.grad = None
            v.module.zero_grad(set_to_none=True)
            x = leaf.clone()
            flush()
            start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
            y = v.module(x)
            middle.record()
            y.backward(dy)
            end.record()
            events.append((v.name, start, middle, end))
        torch.cuda.synchronize(device)
        if step >= args.warmup:
            for name, start, middle, end in events:
                timings[name]["forward"].append(start.elapsed_time(middle))
                timings[name]["backward"].append(middle.elapsed_time(end))
                timings[name]["total"].append(start.elapsed_time(end))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}


def measure_operators(shape, dtype, memory_format, args, device, flush: Flusher) -> dict:
    """The native operators alone (no autograd or Python layer): forward = statistics + normalize_act_,
    backward = backward_reduce + backward_input. Median milliseconds."""
    torch.manual_seed(0)
    x0 = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x0)
    c = shape[1]
    weight, bias = torch.ones(c, device=device), torch.zeros(c, device=device)
    lib = torch.ops.inplace_abn
    times = {"forward": [], "backward": []}
    for step in range(args.warmup + args.repeats):
        x = x0.clone()
        flush()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        mean, var = lib.statistics(x)
        lib.normalize_act_(x, mean, var, weight, bias, 1e-5, "leaky_relu", SLOPE, None)
        events[1].record()
        flush()
        events[2].record()
        sums = lib.backward_reduce(x, dy, weight, bias, 1e-5, "leaky_relu", SLOPE)
        lib.backward_input(x, dy, var, weight, bias, *sums, x.numel() // c, 1e-5, "leaky_relu", SLOPE)
        events[3].record()
        torch.cuda.synchronize(device)
        if step >= args.warmup:
            times["forward"].append(events[0].elapsed_time(events[1]))
            times["backward"].append(events[2].elapsed_time(events[3]))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_host_overhead(args, device) -> dict:
    """CPU wall time (microseconds) per forward + backward of one layer on a launch-bound shape:
    what a network of many small layers pays per normalization layer."""
    calls = 20 if args.quick else 200
    leaf = torch.randn(SMALL_SHAPE, device=device, requires_grad=True)
    dy = torch.randn_like(leaf)
    result = {}
    for v in layer_variants(SMALL_SHAPE[1], device, compile_torch=not args.skip_compile):
        for _ in range(3):  # warm-up (compilation)
            v.module(leaf.clone()).backward(dy)
        samples = []
        for _ in range(5):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                v.module(leaf.clone()).backward(dy)
            torch.cuda.synchronize(device)
            samples.append((time.perf_counter() - start) / calls * 1e6)
        result[v.name] = statistics.median(samples)
    return result


# ---------------------------------------------------------------------------------------------
# Whole networks: peak training memory and the largest batch within a budget.


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1, 3x3 and 1x1 convolutions, each followed by normalization + activation,
    and the residual sum. `linear_last` (ResNet v1): the third normalization has no activation, the
    activation follows the sum instead; its normalization (InPlaceABN with "identity") saves as much
    memory as BatchNorm2d then. Otherwise every normalization is a fused in-place one, and the sum ends
    the block."""

    def __init__(self, in_channels: int, width: int, stride: int, inplace: bool, linear_last: bool) -> None:
        super().__init__()
        out_channels = 4 * width
        self.linear_last = linear_last

        def norm_act(channels: int, activation: str = "leaky_relu") -> nn.Module:
            if inplace:
                return InPlaceABN(channels, activation=activation, activation_param=SLOPE)
            if activation == "identity":
                return nn.BatchNorm2d(channels)
            return batchnorm_leaky_relu(channels)

        last = "identity" if linear_last else "leaky_relu"
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            norm_act(width),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            norm_act(width),
            nn.Conv2d(width, out_channels, 1, bias=False),
            norm_act(out_channels, last),
        )
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_act(out_channels, last)
            )
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x) + self.shortcut(x)
        return F.leaky_relu(out, SLOPE, inplace=True) if self.linear_last else out


class ResNetLike(nn.Module):
    """ResNet-50's layout: a 7x7 stem, then stages of 3, 4, 6, 3 bottlenecks (widths 64 to 512)."""

    def __init__(self, inplace: bool, linear_last: bool = True) -> None:
        super().__init__()
        stem_norm = inplace_abn_leaky_relu(64) if inplace else batchnorm_leaky_relu(64)
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            stem_norm,
            nn.MaxPool2d(3, 2, 1),
        ]
        in_channels = 64
        for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
            for i in range(blocks):
                stride = 2 if i == 0 and stage > 0 else 1
                layers.append(Bottleneck(in_channels, width, stride, inplace, linear_last))
                in_channels = 4 * width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, 1000)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


NETWORKS: dict[str, tuple[Callable[[bool], nn.Module], int]] = {
    # name: (factory(inplace) -> model, input size)
    "resnet50-like, v1 blocks": (lambda inplace: ResNetLike(inplace, linear_last=True), 224),
    "resnet50-like, norm+act after every conv": (lambda inplace: ResNetLike(inplace, linear_last=False), 224),
    "unet (inplace_abn bench)": (
        lambda inplace: UNet(inplace_abn_leaky_relu if inplace else batchnorm_leaky_relu),
        256,
    ),
}


def peak_training_memory(model: nn.Module, batch: int, size: int, device: torch.device, dtype: torch.dtype) -> float:
    """max_memory_allocated (bytes) over one training step, parameters and their gradients included."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x).float().square().mean()
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del x, loss
    model.zero_grad(set_to_none=True)
    return peak


def largest_batch(model: nn.Module, size: int, budget: int, device: torch.device, dtype: torch.dtype) -> int:
    """The largest batch whose training step stays within `budget` bytes (doubling, then bisection)."""

    def fits(batch: int) -> bool:
        try:
            return peak_training_memory(model, batch, size, device, dtype) <= budget
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False

    low, high = 0, 1
    while high <= 1 << 16 and fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def measure_networks(args, device) -> list[dict]:
    rows = []
    dtype = DTYPES[args.network_dtype]
    for name, (factory, size) in NETWORKS.items():
        batch = args.network_batch if name.startswith("resnet") else max(1, args.network_batch // 4)
        row = {"network": name, "input": [batch, 3, size, size], "dtype": args.network_dtype, "variants": {}}
        for variant, inplace in (("BN+LeakyReLU", False), ("InPlaceABN", True)):
            torch.manual_seed(0)
            model = factory(inplace).to(device).to(memory_format=torch.channels_last)
            peak = peak_training_memory(model, batch, size, device, dtype)
            fit = largest_batch(model, size, int(args.budget_gib * 2**30), device, dtype)
            row["variants"][variant] = {"peak_memory_mb": peak / 2**20, "largest_batch": fit}
            del model
            torch.cuda.empty_cache()
        base, ours = row["variants"]["BN+LeakyReLU"], row["variants"]["InPlaceABN"]
        row["peak_memory_reduction"] = 1 - ours["peak_memory_mb"] / base["peak_memory_mb"]
        row["batch_ratio"] = ours["largest_batch"] / max(1, base["largest_batch"])
        rows.append(row)
        print(
            f"{name:<42} input {tuple(row['input'])}: peak {base['peak_memory_mb']:.0f} MB -> "
            f"{ours['peak_memory_mb']:.0f} MB ({row['peak_memory_reduction']:.0%} less); largest batch within "
            f"{args.budget_gib:g} GiB: {base['largest_batch']} -> {ours['largest_batch']}",
            flush=True,
        )
    return rows


def gbs(bandwidth: dict, what: str) -> str:
    """A table cell: GB/s and the fraction of the copy bandwidth."""
    return f"{bandwidth[what + '_gbs']:>13.0f} ({bandwidth[what + '_of_copy']:>4.0%})"


def environment(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {
        "inplace_abn": inplace_abn.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--skip-networks", action="store_true", help="leave out the memory measurements")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for the largest batch")
    parser.add_argument("--network-batch", type=int, default=32, help="batch of the peak-memory step (U-Net: / 4)")
    parser.add_argument("--network-dtype", choices=list(DTYPES), default="float32", help="autocast dtype")
    parser.add_argument("--quick", action="store_true", help="one shape, few repeats (smoke test)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--shapes", help="comma-separated NxCxHxW shapes (default: all of SHAPES)")
    parser.add_argument("--dtypes", help=f"comma-separated dtypes (default: {','.join(DTYPES)})")
    parser.add_argument("--formats", help=f"comma-separated memory formats (default: {','.join(FORMATS)})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"no CUDA GPU is available to torch {torch.__version__} (CUDA {torch.version.cuda})")
    device = torch.device("cuda")
    if not ops.uses_native(device):
        from inplace_abn import _native

        lib = _native.load().libraries.get("cuda")
        raise SystemExit(
            f"InPlaceABN would run the pure-PyTorch fallback on the GPU: {lib.problem if lib else 'no CUDA library'}"
        )
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    dtypes = {name: DTYPES[name] for name in (args.dtypes.split(",") if args.dtypes else DTYPES)}
    formats = {name: FORMATS[name] for name in (args.formats.split(",") if args.formats else FORMATS)}
    if args.quick:
        args.repeats, args.warmup, args.budget_gib = 5, 2, 1.0
    started = time.perf_counter()
    flush = Flusher(device)
    bandwidth = copy_bandwidth(device)
    env = environment(device)
    print(f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}: device-to-device copy {bandwidth:.0f} GB/s\n")
    header = (
        f"{'shape':<18}{'dtype':<10}{'format':<15}{'variant':<24}{'fwd ms':>8}{'bwd ms':>8}{'total':>8}"
        f"{'vs eager':>9}{'vs comp.':>9}{'fwd GB/s (of copy)':>20}{'bwd GB/s (of copy)':>20}"
    )
    print(header)
    cases = []
    for shape in shapes:
        for dtype_name, dtype in dtypes.items():
            for format_name, memory_format in formats.items():
                layer = measure_layer(shape, dtype, memory_format, args, device, flush)
                kernels = measure_operators(shape, dtype, memory_format, args, device, flush)
                tensor_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                eager = layer["BN+LeakyReLU eager"]["total"]
                case = {
                    "shape": list(shape),
                    "dtype": dtype_name,
                    "memory_format": format_name,
                    "tensor_mb": tensor_bytes / 2**20,
                    "median_ms": layer,
                    "operators_ms": kernels,
                    "speedup_vs_eager": {name: eager / m["total"] for name, m in layer.items()},
                    # ideal traffic / time, as a fraction of the copy bandwidth
                    "inplace_abn_bandwidth": {
                        "forward_gbs": 3 * tensor_bytes / layer["InPlaceABN"]["forward"] / 1e6,
                        "backward_gbs": 5 * tensor_bytes / layer["InPlaceABN"]["backward"] / 1e6,
                        "operators_forward_gbs": 3 * tensor_bytes / kernels["forward"] / 1e6,
                        "operators_backward_gbs": 5 * tensor_bytes / kernels["backward"] / 1e6,
                    },
                }
                compiled = layer.get("BN+LeakyReLU compiled")
                case["speedup_vs_compiled"] = (
                    {name: compiled["total"] / m["total"] for name, m in layer.items()} if compiled else None
                )
                bw = case["inplace_abn_bandwidth"]
                bw.update({f"{k[:-4]}_of_copy": v / bandwidth for k, v in list(bw.items())})
                cases.append(case)
                label = f"{'x'.join(map(str, shape)):<18}{dtype_name:<10}{format_name:<15}"
                for name, m in layer.items():
                    row = f"{label}{name:<24}{m['forward']:>8.3f}{m['backward']:>8.3f}{m['total']:>8.3f}"
                    row += f"{case['speedup_vs_eager'][name]:>8.2f}x"
                    row += f"{case['speedup_vs_compiled'][name]:>8.2f}x" if compiled else f"{'-':>9}"
                    if name == "InPlaceABN":
                        row += gbs(bw, "forward") + gbs(bw, "backward")
                    print(row, flush=True)
                    label = " " * len(label)
                print(
                    f"{label}{'operators only':<24}{kernels['forward']:>8.3f}{kernels['backward']:>8.3f}"
                    f"{kernels['forward'] + kernels['backward']:>8.3f}{'':>18}"
                    + gbs(bw, "operators_forward")
                    + gbs(bw, "operators_backward"),
                    flush=True,
                )
    overhead = measure_host_overhead(args, device)
    print(f"\nhost time per forward + backward, {'x'.join(map(str, SMALL_SHAPE))} (launch-bound), microseconds:")
    for name, us in overhead.items():
        print(f"  {name:<24}{us:>8.1f}")
    networks = []
    if not args.skip_networks:
        print()
        networks = measure_networks(args, device)
    report = {
        "command": "python benchmarks/gpu_layer.py " + " ".join(sys.argv[1:]),
        "environment": env,
        "copy_bandwidth_gbs": bandwidth,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cases": cases,
        "host_overhead_us": {"shape": list(SMALL_SHAPE), **overhead},
        "networks": networks,
        "seconds": time.perf_counter() - started,
    }
    print(f"\n{report['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
