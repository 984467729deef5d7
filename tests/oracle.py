"""Independent float64 oracle: torch's own batch_norm with weight |w| + eps, then the activation,
differentiated by autograd. It shares no code with the package."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def activate(x: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(x, param)
    if activation == "elu":
        return F.elu(x, param)
    if activation == "relu":
        return F.relu(x)
    assert activation == "identity"
    return x


@dataclass
class Result:
    y: torch.Tensor
    dx: torch.Tensor | None
    dweight: torch.Tensor | None
    dbias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


def reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    dy: torch.Tensor | None,
) -> Result:
    """Forward (and backward with dy) of In-Place ABN in float64 on copies of the inputs."""

    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double().clone().requires_grad_()

    x64, w64, b64 = leaf(x), leaf(weight), leaf(bias)
    rm = None if running_mean is None else running_mean.detach().double().clone()
    rv = None if running_var is None else running_var.detach().double().clone()
    scale = None if w64 is None else w64.abs() + eps
    y = activate(F.batch_norm(x64, rm, rv, scale, b64, training, momentum, eps), activation, activation_param)
    dx = dw = db = None
    if dy is not None:
        y.backward(dy.double())
        dx, dw, db = x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad
    return Result(y.detach(), dx, dw, db, rm, rv)


# Error bounds relative to the reference's largest magnitude, by dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0):
    """max |actual - expected| <= tol(dtype) * factor * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual - expected).abs().max().item()
    bound = TOLERANCE[dtype] * factor * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({dtype})"
