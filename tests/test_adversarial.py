"""What a hostile user would try: non-finite values, views autograd forbids to write, failing calls,
empty batches, odd argument types, extreme magnitudes. Each case asserts either torch's float64
result (the independent oracle, NaN for NaN) or an error that leaves every tensor unchanged."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from inplace_abn import ops
from inplace_abn.functions import inplace_abn

import oracle
from oracle import TOLERANCE, reference

pytestmark = pytest.mark.filterwarnings("ignore:inplace_abn with:RuntimeWarning")

NAN, INF = math.nan, math.inf
ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("elu", 0.5), ("relu", 0.0), ("identity", 0.0)]


@contextlib.contextmanager
def implementation(which: str):
    """Runs the native kernels, or forces the pure-PyTorch reference operators (the fallback)."""
    native = ops.uses_native
    if which == "fallback":
        ops.uses_native = lambda device: False
    try:
        yield
    finally:
        ops.uses_native = native


@pytest.fixture(params=["native", "fallback"])
def impl(request: pytest.FixtureRequest):
    with implementation(request.param):
        yield request.param


class _Elu(torch.autograd.Function):
    """F.elu whose derivative at NaN is NaN everywhere. torch's own elu backward gives NaN in its
    vectorized loop and 1 in its scalar tail, so which one an element gets depends on its position."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return torch.nn.functional.elu(z, alpha)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        return dy * torch.where(z > 0, torch.ones_like(z), ctx.alpha * torch.exp(z)), None


@pytest.fixture(autouse=True)
def _nan_consistent_elu_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    activate = oracle.activate
    monkeypatch.setattr(
        oracle,
        "activate",
        lambda z, activation, param: _Elu.apply(z, param) if activation == "elu" else activate(z, activation, param),
    )


def assert_same(actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype, what: str) -> None:
    """NaN exactly where expected has NaN, the same infinities, finite values within the dtype's tolerance."""
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN at {actual.isnan().tolist()}, expected {nan.tolist()}"
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf), f"{what}: inf at {actual.isinf().tolist()}, expected {inf.tolist()}"
    assert torch.equal(actual[inf], expected[inf]), f"{what}: infinities of the wrong sign"
    finite = ~nan & ~inf
    if finite.any():
        error = (actual[finite] - expected[finite]).abs().max().item()
        bound = TOLERANCE[dtype] * 4 * max(1.0, expected[finite].abs().max().item())
        assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({dtype})"


def run_layer(x, weight, bias, running_mean, running_var, training, activation, param, dy):
    """inplace_abn forward + backward on copies; returns the oracle's Result fields."""
    w = None if weight is None else weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    leaf = x.clone().requires_grad_()
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    y = inplace_abn(leaf.clone(), w, b, rm, rv, training, 0.1, 1e-5, activation, param)
    y.backward(dy)
    return y.detach(), leaf.grad, None if w is None else w.grad, None if b is None else b.grad, rm, rv


def check_against_oracle(x, weight, bias, running_mean, running_var, training, activation, param, dy):
    dtype = x.dtype
    got = run_layer(x, weight, bias, running_mean, running_var, training, activation, param, dy)
    want = reference(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, activation, param, dy)
    expected = (want.y, want.dx, want.dweight, want.dbias, want.running_mean, want.running_var)
    for name, a, e in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), got, expected, strict=True):
        assert_same(a, e, dtype, name)


# 1. Non-finite values propagate as torch's batch_norm + activation propagate them.

NONFINITE_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("dtype", NONFINITE_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_input_value(activation, param, dtype, training, impl):
    """One NaN input value: in eval it stays in its element, in training its channel's statistics
    (and so its whole channel, and the channel's running statistics) become NaN, as in torch."""
    x = torch.tensor([[[NAN, 1.0, -1.0, 0.5], [2.0, 3.0, -4.0, 0.0]], [[0.25, -2.0, 3.0, 1.0], [1.0, -1.0, 2.0, 5.0]]])
    x = x.to(dtype)
    dy = torch.tensor([[[1.0, -2.0, 0.5, 1.5], [0.5, 1.0, 2.0, -1.0]], [[-1.0, 0.5, 1.0, 2.0], [1.0, 1.0, -3.0, 1.0]]])
    weight = torch.tensor([1.5, -0.5], dtype=dtype)
    bias = torch.tensor([0.1, -0.2], dtype=dtype)
    running_mean = torch.tensor([0.5, -0.5], dtype=dtype)
    running_var = torch.tensor([2.0, 0.5], dtype=dtype)
    check_against_oracle(x, weight, bias, running_mean, running_var, training, activation, param, dy.to(dtype))


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_input_eval_elementwise(activation, param, dtype, impl):
    """The issue's example: eval-mode ELU / ReLU of NaN is NaN (was 0), with the other values untouched."""
    x = torch.tensor([[[NAN, 1.0, -1.0]]], dtype=dtype)
    y = x.clone()
    inplace_abn(
        y, None, None, torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype), False, 0.1, 1e-5, activation, param
    )
    expected = reference(x, None, None, torch.zeros(1), torch.ones(1), False, 0.1, 1e-5, activation, param, None).y
    assert y[0, 0, 0].isnan()
    assert_same(y, expected, dtype, "y")


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("dtype", NONFINITE_DTYPES, ids=str)
@pytest.mark.parametrize("where", ["running_mean", "running_var", "dy"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_statistics_and_gradient(activation, param, dtype, where, training, impl):
    """A NaN running statistic or output gradient in channel 0."""
    value = NAN
    x = torch.tensor([[[0.5, 1.0, -1.0, 0.25], [2.0, 3.0, -4.0, 0.0]], [[0.75, -2.0, 3.0, 1.0], [1.0, -1.0, 2.0, 5.0]]])
    tensors = {
        "x": x.to(dtype),
        "dy": torch.tensor([[[1.0, -2.0, 0.5, 1.5], [0.5, 1.0, 2.0, -1.0]], [[-1.0, 0.5, 1.0, 2.0], [1, 1, -3, 1.0]]]),
        "weight": torch.tensor([1.5, -0.5]),
        "bias": torch.tensor([0.1, -0.2]),
        "running_mean": torch.tensor([0.5, -0.5]),
        "running_var": torch.tensor([2.0, 0.5]),
    }
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if where == "dy":
        tensors["dy"][0, 0, 1] = value
    else:
        tensors[where][0] = value
    t = tensors
    check_against_oracle(
        t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], training, activation, param, t["dy"]
    )
