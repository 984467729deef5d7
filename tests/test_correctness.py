"""Forward and backward of inplace_abn against the independent float64 oracle, on random inputs."""

from __future__ import annotations

import pytest
import torch

from inplace_abn import ABN, InPlaceABN, inplace_abn

from oracle import assert_close, reference

ACTIVATIONS = [
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.3),
    ("leaky_relu", 0.0),
    ("elu", 1.0),
    ("elu", 0.4),
    ("identity", 0.0),
    ("relu", 0.0),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (shape, layout): channels_last means channels innermost in memory (NLC, NHWC, NDHWC); strided is a
# non-contiguous slice whose trailing dimensions cannot be walked with one stride.
CASES = [
    ((16, 5), "contiguous"),
    ((4, 5, 9), "contiguous"),
    ((4, 5, 9), "channels_last"),
    ((3, 6, 5, 7), "contiguous"),
    ((3, 6, 5, 7), "channels_last"),
    ((2, 4, 3, 5, 4), "contiguous"),
    ((2, 4, 3, 5, 4), "channels_last"),
    ((3, 6, 5, 7), "strided"),
]


def layout_input(values: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(leaf requiring grad, non-leaf input in `layout` holding `values`, leaf.grad -> input grad)."""
    if layout == "contiguous":
        leaf = values.clone().requires_grad_()
        return leaf, leaf.clone(), lambda g: g
    if layout == "channels_last":
        leaf = values.movedim(1, -1).contiguous().movedim(-1, 1).requires_grad_()
        x = leaf.clone()
        assert x.stride(1) == 1 and not x.is_contiguous()
        return leaf, x, lambda g: g
    assert layout == "strided"
    wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device)
    wide[..., ::2] = values
    leaf = wide.requires_grad_()
    x = leaf.clone()[..., ::2]
    assert not x.is_contiguous() and x.stride(1) != 1
    return leaf, x, lambda g: g[..., ::2]


def random_inputs(shape, dtype, device, affine=True):
    channels = shape[1]
    x = (torch.randn(shape, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype)
    weight = bias = None
    if affine:
        sign = torch.where(torch.rand(channels, device=device) < 0.3, -1.0, 1.0).double()
        weight = (sign * torch.empty(channels, dtype=torch.float64, device=device).uniform_(0.5, 1.5)).to(dtype)
        bias = (torch.randn(channels, dtype=torch.float64, device=device) * 0.5).to(dtype)
    running_mean = torch.randn(channels, dtype=torch.float64, device=device).to(dtype)
    running_var = torch.empty(channels, dtype=torch.float64, device=device).uniform_(0.5, 2).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    return x, weight, bias, running_mean, running_var, dy


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_match_float64_reference(activation, param, shape, layout, dtype, training, device):
    x, weight, bias, running_mean, running_var, dy = random_inputs(shape, dtype, device)
    expected = reference(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, activation, param, dy)

    leaf, x_in, input_grad = layout_input(x, layout)
    strides = x_in.stride()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    rm, rv = running_mean.clone(), running_var.clone()
    y = inplace_abn(x_in, w, b, rm, rv, training, 0.1, 1e-5, activation, param)
    assert y is x_in and y.stride() == strides and y.dtype == dtype
    y.backward(dy)

    assert_close(y.detach(), expected.y, dtype, "output")
    assert_close(input_grad(leaf.grad), expected.dx, dtype, "input gradient")
    assert_close(w.grad, expected.dweight, dtype, "weight gradient", factor=4)
    assert_close(b.grad, expected.dbias, dtype, "bias gradient", factor=4)
    assert_close(rm, expected.running_mean, dtype, "running_mean")
    assert_close(rv, expected.running_var, dtype, "running_var")


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_affine_and_running_stats(activation, param, training, device):
    x, _, _, running_mean, running_var, dy = random_inputs((4, 3, 6, 5), torch.float32, device, affine=False)
    if training:
        running_mean = running_var = None
    expected = reference(x, None, None, running_mean, running_var, training, 0.1, 1e-5, activation, param, dy)
    leaf = x.clone().requires_grad_()
    y = inplace_abn(leaf.clone(), None, None, running_mean, running_var, training, 0.1, 1e-5, activation, param)
    y.backward(dy)
    assert_close(y.detach(), expected.y, torch.float32, "output")
    assert_close(leaf.grad, expected.dx, torch.float32, "input gradient")


@pytest.mark.parametrize("activation,param", [a for a in ACTIVATIONS if a[0] != "leaky_relu" or a[1] != 0.3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(activation, param, training, device):
    x, weight, bias, running_mean, running_var, _ = random_inputs((3, 4, 5), torch.float64, device)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()

    def fn(x, weight, bias):
        return inplace_abn(
            x.clone(), weight, bias, running_mean.clone(), running_var.clone(), training, 0.1, 1e-5, activation, param
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-7)


def test_only_weight_or_only_input_requires_grad(device):
    """Backward computes exactly the gradients asked for."""
    x, weight, bias, _, _, dy = random_inputs((4, 3, 5, 5), torch.float64, device)
    expected = reference(x, weight, bias, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1, dy)
    w = weight.clone().requires_grad_()
    y = inplace_abn(x.clone(), w, bias, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1)
    y.backward(dy)
    assert_close(w.grad, expected.dweight, torch.float64, "weight gradient")
    leaf = x.clone().requires_grad_()
    y = inplace_abn(leaf.clone(), weight, bias, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1)
    y.backward(dy)
    assert_close(leaf.grad, expected.dx, torch.float64, "input gradient")


def test_gradient_with_expanded_output_grad(device):
    """dy with another layout (here stride 0 from sum()) is handled."""
    x, weight, bias, _, _, _ = random_inputs((4, 3, 5, 5), torch.float64, device)
    expected = reference(x, weight, bias, None, None, True, 0.1, 1e-5, "elu", 1.0, torch.ones_like(x))
    leaf = x.clone().requires_grad_()
    inplace_abn(leaf.clone(), weight, bias, None, None, True, 0.1, 1e-5, "elu", 1.0).sum().backward()
    assert_close(leaf.grad, expected.dx, torch.float64, "input gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elu_inverse_is_finite_for_outputs_at_minus_alpha(dtype, device):
    """Outputs that round to -alpha (z << 0) must not give NaN or Inf gradients."""
    x = torch.randn(8, 2, 16, dtype=torch.float64, device=device)
    x[:, :, 0] = -60.0  # normalized to far below zero: exp(z) underflows against 1
    x = x.to(dtype)
    leaf = x.clone().requires_grad_()
    weight = torch.full((2,), 20.0, dtype=dtype, device=device, requires_grad=True)
    y = inplace_abn(leaf.clone(), weight, None, None, None, True, 0.1, 1e-5, "elu", 1.0)
    assert (y[:, :, 0] == -1.0).all()
    y.backward(torch.randn_like(y))
    assert torch.isfinite(leaf.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_running_stats_follow_torch_batchnorm(momentum, dims, device):
    channels = 5
    bn = (
        {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims](channels, momentum=momentum)
        .double()
        .to(device)
    )
    iabn = InPlaceABN(channels, momentum=momentum, activation="identity").double().to(device)
    for step in range(6):
        shape = (3 + step, channels) + (4,) * dims
        x = torch.randn(shape, dtype=torch.float64, device=device) * (1 + step) + step
        bn(x)
        iabn(x.clone())
    assert int(iabn.num_batches_tracked) == int(bn.num_batches_tracked) == 6
    assert_close(iabn.running_mean, bn.running_mean, torch.float64, "running_mean")
    assert_close(iabn.running_var, bn.running_var, torch.float64, "running_var")
    # Eval mode normalizes with them (InPlaceABN's effective scale is |weight| + eps).
    with torch.no_grad():
        bn.weight.copy_(iabn.weight.abs() + iabn.eps)
    bn.eval()
    iabn.eval()
    x = torch.randn((2, channels) + (4,) * dims, dtype=torch.float64, device=device)
    assert_close(iabn(x.clone()), bn(x), torch.float64, "eval output")


@pytest.mark.parametrize("module_class", [ABN, InPlaceABN])
def test_module_without_running_stats_uses_batch_stats_in_eval(module_class, device):
    module = module_class(4, track_running_stats=False, activation="elu", activation_param=0.5).double().to(device)
    assert module.running_mean is None and module.running_var is None and module.num_batches_tracked is None
    module.eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
    expected = reference(x, module.weight, module.bias, None, None, True, 0.1, 1e-5, "elu", 0.5, None)
    if module_class is ABN:  # ABN is plain batch norm: weight as is (1 here), not |w| + eps
        expected = reference(x, None, None, None, None, True, 0.1, 1e-5, "elu", 0.5, None)
    assert_close(module(x.clone()), expected.y, torch.float64, "output")


@pytest.mark.parametrize("activation,param", [("relu", 0.0), ("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.0)])
def test_abn_is_batchnorm_plus_activation(activation, param, device):
    module = ABN(6, activation=activation, activation_param=param).double().to(device)
    with torch.no_grad():
        module.weight.uniform_(-1, 1)
        module.bias.normal_()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64, device=device)
    bn = torch.nn.functional.batch_norm(x, None, None, module.weight, module.bias, True, 0.1, 1e-5)
    activations = {
        "relu": torch.relu,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, param),
        "elu": lambda t: torch.nn.functional.elu(t, param),
        "identity": lambda t: t,
    }
    assert_close(module(x), activations[activation](bn), torch.float64, "output")


def test_low_precision_input_with_float32_parameters(device):
    """Mixed precision (as under autocast): bfloat16 input, float32 weight, bias and running stats."""
    x, weight, bias, running_mean, running_var, dy = random_inputs((4, 6, 5, 5), torch.float32, device)
    expected = reference(
        x.bfloat16(), weight, bias, running_mean, running_var, True, 0.1, 1e-5, "leaky_relu", 0.01, dy.bfloat16()
    )
    leaf = x.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    rm, rv = running_mean.clone(), running_var.clone()
    y = inplace_abn(leaf.clone(), w, bias, rm, rv, True, 0.1, 1e-5, "leaky_relu", 0.01)
    y.backward(dy.bfloat16())
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and rm.dtype == torch.float32
    assert_close(y.detach(), expected.y, torch.bfloat16, "output")
    assert_close(leaf.grad, expected.dx, torch.bfloat16, "input gradient")
    assert_close(w.grad, expected.dweight, torch.bfloat16, "weight gradient", factor=4)
    assert_close(rv, expected.running_var, torch.float32, "running_var")
