"""Automatic mixed precision: InPlaceABN under torch.autocast (CPU bfloat16; CUDA float16 and bfloat16).

Autocast has no rule for the In-Place ABN operators, so they run in the dtype of their input (the
16-bit output of the convolution before them) with float32 parameters, like torch's batch_norm; the
statistics and the backward sums accumulate in float32. Outputs and gradients are compared with a float64
model (torch BatchNorm2d with weight |w| + eps, no autocast) within the 16-bit dtype's tolerance; the
running statistics with the float64 statistics of the exact 16-bit tensor the layer received, within
float32 accuracy (a 16-bit accumulation would miss by orders of magnitude more).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn

from inplace_abn import InPlaceABN, ops

from oracle import assert_close

CASES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)]
EPS = 1e-5


@contextlib.contextmanager
def fallback(enabled: bool):
    """Forces the pure-PyTorch reference operators (the fallback without a native library)."""
    native = ops.uses_native
    if enabled:
        ops.uses_native = lambda device: False
    try:
        yield
    finally:
        ops.uses_native = native


def models(activation: str, param: float, device: str):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        InPlaceABN(8, activation=activation, activation_param=param),
        nn.Conv2d(8, 4, 1),
    ).to(device)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(8, generator=generator) + 0.5)
        model[1].bias.copy_(torch.randn(8, generator=generator) * 0.3)
    act = {"leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param), "identity": nn.Identity()}[activation]
    bn = nn.BatchNorm2d(8).to(device)
    with torch.no_grad():
        bn.weight.copy_(model[1].weight.abs() + EPS)
        bn.bias.copy_(model[1].bias)
    reference = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn, act, nn.Conv2d(8, 4, 1)
    ).to(device, torch.float64)  # fmt: skip
    with torch.no_grad():
        for i in (0, 3):
            reference[i].weight.copy_(model[i if i == 0 else 2].weight)
            reference[i].bias.copy_(model[i if i == 0 else 2].bias)
    return model, reference


def step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    leaf = x.clone().requires_grad_()
    y = model(leaf)
    y.backward(dy.to(y.dtype))
    return dict(y=y.detach(), dx=leaf.grad, grads=[p.grad for p in model.parameters()])


@pytest.mark.parametrize("use_fallback", [False, True], ids=["native", "fallback"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_autocast_matches_float64_reference(device, dtype, activation, param, use_fallback):
    if not use_fallback:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a build without CUDA kernels says so
            if not ops.uses_native(torch.device(device)):
                pytest.skip(f"no native kernels for {device}")
    model, reference = models(activation, param, device)
    received = {}
    model[1].register_forward_pre_hook(lambda _, args: received.update(x=args[0].detach().clone()))
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 3, 10, 10, generator=generator) * 2 + 1).to(device)
    dy = torch.randn(6, 4, 10, 10, generator=generator).to(device)
    with fallback(use_fallback), torch.autocast(device, dtype=dtype):
        actual = step(model, x, dy)
    expected = step(reference, x.double(), dy.double())

    layer = model[1]
    assert received["x"].dtype == dtype and actual["y"].dtype == dtype
    assert layer.running_mean.dtype == layer.running_var.dtype == layer.weight.grad.dtype == torch.float32
    # Outputs and gradients: two 16-bit convolutions around the layer; errors of a few 16-bit roundings.
    assert_close(actual["y"], expected["y"], dtype, "output", 4)
    assert_close(actual["dx"], expected["dx"], dtype, "input gradient", 8)
    names = ["conv0.weight", "conv0.bias", "norm.weight", "norm.bias", "conv2.weight", "conv2.bias"]
    for name, a, e in zip(names, actual["grads"], expected["grads"], strict=True):
        assert_close(a, e, dtype, f"gradient of {name}", 8)
    # Statistics of the 16-bit input, accumulated in float32.
    seen = received["x"].double()
    count = seen.numel() // seen.size(1)
    batch_mean, batch_var = seen.mean(dim=(0, 2, 3)), seen.var(dim=(0, 2, 3), unbiased=False)
    assert_close(layer.running_mean, 0.1 * batch_mean, torch.float32, "running_mean", 4)
    assert_close(layer.running_var, 0.9 + 0.1 * batch_var * count / (count - 1), torch.float32, "running_var", 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
def test_autocast_under_torch_compile():
    model, reference = models("leaky_relu", 0.05, "cpu")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(2)
    x, dy = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = step(compiled, x, dy)
    expected = step(reference, x.double(), dy.double())
    assert actual["y"].dtype == torch.bfloat16 and model[1].running_var.dtype == torch.float32
    assert_close(actual["y"], expected["y"], torch.bfloat16, "output", 4)
    assert_close(actual["dx"], expected["dx"], torch.bfloat16, "input gradient", 8)
    for a, e in zip(actual["grads"], expected["grads"], strict=True):
        assert_close(a, e, torch.bfloat16, "parameter gradient", 8)
