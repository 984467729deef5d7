"""Accuracy of the gradients of one training step against float64, InPlaceABN versus torch's
BatchNorm2d + activation, per dtype and activation. Both get the same input and output gradient
(rounded to the dtype); the reference is the float64 layer on those rounded values. Errors are
max |dx - dx_64| / max |dx_64| (likewise for dweight).

In-Place ABN recovers the pre-activation z from the stored output y. Where ELU saturates (z well below 0,
y close to -alpha), y rounded to a 16-bit dtype determines z only coarsely (z = log(1 + y / alpha)),
and z enters dx through the centred term: this is the method's cost in bfloat16 / float16, measured
here. torch keeps the input instead.

    python benchmarks/gradient_accuracy.py [--json benchmarks/results/gradient_accuracy.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from inplace_abn import inplace_abn

ACTIVATIONS = {"leaky_relu": 0.01, "elu": 1.0, "identity": 0.0}
SHAPES = [(8, 16, 32, 32), (4, 64, 14, 14), (32, 8, 7, 7)]


def torch_activation(z: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "elu":
        return F.elu(z, param)
    return z


def case_errors(shape: tuple[int, ...], dtype: torch.dtype, activation: str, seed: int) -> dict[str, float]:
    param = ACTIVATIONS[activation]
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape, dtype=torch.float64, generator=generator) * 2 + 0.3).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype)
    weight = (torch.rand(channels, dtype=torch.float64, generator=generator) + 0.5).to(dtype)
    bias = torch.randn(channels, dtype=torch.float64, generator=generator).to(dtype)

    def run(impl: str, work_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.to(work_dtype).clone().requires_grad_()  # a fresh leaf: .to() of the same dtype is x itself
        w = weight.to(work_dtype).clone().requires_grad_()
        b = bias.to(work_dtype)
        if impl == "ours":
            y = inplace_abn(leaf.clone(), w, b, None, None, True, 0.1, 1e-5, activation, param)
        else:  # torch's layer; its scale is |w| + eps, as In-Place ABN's
            z = F.batch_norm(leaf, None, None, w.abs() + 1e-5, b, True, 0.1, 1e-5)
            y = torch_activation(z, activation, param)
        y.backward(dy.to(work_dtype))
        return leaf.grad.double(), w.grad.double()

    dx64, dw64 = run("torch", torch.float64)
    result = {}
    for impl in ("ours", "torch"):
        dx, dw = run(impl, dtype)
        result[f"{impl}_dx"] = ((dx - dx64).abs().max() / dx64.abs().max()).item()
        result[f"{impl}_dweight"] = ((dw - dw64).abs().max() / dw64.abs().max()).item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = []
    print(
        f"{'dtype':<16}{'activation':<12}{'dx ours':>10}{'dx torch':>10}{'dw ours':>10}{'dw torch':>10}"
        "  (max over shapes)"
    )
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for activation in ACTIVATIONS:
            cases = [case_errors(shape, dtype, activation, seed) for seed, shape in enumerate(SHAPES)]
            worst = {k: max(c[k] for c in cases) for k in cases[0]}
            rows.append({"dtype": str(dtype), "activation": activation, "shapes": SHAPES, "cases": cases, "max": worst})
            print(
                f"{dtype!s:<16}{activation:<12}{worst['ours_dx']:>10.2e}{worst['torch_dx']:>10.2e}"
                f"{worst['ours_dweight']:>10.2e}{worst['torch_dweight']:>10.2e}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"command": "python benchmarks/gradient_accuracy.py", "torch": torch.__version__, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
