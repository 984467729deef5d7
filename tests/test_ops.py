"""The native operators: registration, fake kernels, reduction-stressing sizes, every element written,
and the pure-PyTorch fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from inplace_abn import _native, ops
from inplace_abn import reference as reference_ops

from oracle import assert_close, reference

NATIVE_DISABLED = os.environ.get(_native.DISABLE_ENV, "") not in ("", "0")
needs_native = pytest.mark.skipif(NATIVE_DISABLED, reason=f"{_native.DISABLE_ENV} is set")


@needs_native
def test_native_cpu_library_is_loaded():
    status = _native.load()
    assert status.libraries["cpu"].loaded, status.libraries["cpu"].error
    assert ops.uses_native(torch.device("cpu"))


def sample(shape, dtype=torch.float32, channels_last=False, device="cpu"):
    x = torch.randn(shape, dtype=dtype, device=device)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    c = shape[1]
    return dict(
        x=x,
        mean=torch.randn(c, device=device),
        var=torch.rand(c, device=device) + 0.5,
        weight=torch.randn(c, device=device),
        bias=torch.randn(c, device=device),
        dy=torch.randn_like(x),
    )


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(channels_last, dtype, device):
    """Schemas, fake kernels and dispatcher registration are consistent (torch.library.opcheck)."""
    s = sample((3, 4, 5, 6), dtype, channels_last, device)
    library = torch.ops.inplace_abn
    torch.library.opcheck(library.statistics.default, (s["x"],))
    for activation, param in (("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.0)):
        args = (s["x"].clone(), s["mean"], s["var"], s["weight"], s["bias"], 1e-5, activation, param, None)
        torch.library.opcheck(library.normalize_act_.default, args)
    args = (s["x"].clone(), s["mean"], s["var"], s["weight"], s["bias"], 1e-5, "relu", 0.0, torch.empty_like(s["x"]))
    torch.library.opcheck(library.normalize_act_.default, args)
    y = s["x"].clone()
    library.normalize_act_(y, s["mean"], s["var"], s["weight"], s["bias"], 1e-5, "leaky_relu", 0.1, None)
    reduce_args = (y, s["dy"], s["weight"], s["bias"], 1e-5, "leaky_relu", 0.1)
    torch.library.opcheck(library.backward_reduce.default, reduce_args)
    sums = library.backward_reduce(y, s["dy"], s["weight"], s["bias"], 1e-5, "leaky_relu", 0.1)
    for s1, s2 in (sums, (None, None)):
        args = (y, s["dy"], s["var"], s["weight"], s["bias"], s1, s2, 90, 1e-5, "leaky_relu", 0.1)
        torch.library.opcheck(library.backward_input.default, args)


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_train_ops_opcheck_and_match_the_split_operators(channels_last, dtype, affine):
    """train_forward_ / train_backward (the lean CPU training path): opcheck, and the same results as the
    split operators composed in the reference (running statistics, output, dx, dweight, dbias)."""
    s = sample((3, 4, 5, 6), dtype, channels_last)
    weight, bias = (s["weight"], s["bias"]) if affine else (None, None)
    library = torch.ops.inplace_abn
    for activation, param in (("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)):
        preact = torch.empty_like(s["x"]) if activation == "relu" else None
        args = (s["x"].clone(), weight, bias, s["mean"].clone(), s["var"].clone(), 0.3, 1e-5, activation, param, preact)
        torch.library.opcheck(library.train_forward_.default, args)
        native_args = (s["x"].clone(), weight, bias, s["mean"].clone(), s["var"].clone(), 0.3, 1e-5, activation, param)
        ref_args = (s["x"].clone(), weight, bias, s["mean"].clone(), s["var"].clone(), 0.3, 1e-5, activation, param)
        native_preact = None if preact is None else torch.empty_like(preact)
        ref_preact = None if preact is None else torch.empty_like(preact)
        var = library.train_forward_(*native_args, native_preact)
        ref_var = reference_ops.train_forward_(*ref_args, ref_preact)
        for name, a, e in (("y", native_args[0], ref_args[0]), ("var", var, ref_var)):
            assert_close(a, e, dtype, name)
        for name, i in (("running_mean", 3), ("running_var", 4)):
            assert_close(native_args[i], ref_args[i], torch.float32, name)
        kept = native_args[0] if preact is None else native_preact
        backward_args = (kept, s["dy"], var, weight, bias, 1e-5, activation, param)
        torch.library.opcheck(library.train_backward.default, backward_args)
        got = library.train_backward(*backward_args)
        want = reference_ops.train_backward(*backward_args)
        for name, a, e in zip(("dx", "dweight", "dbias"), got, want, strict=True):
            assert a.dtype == e.dtype, name
            assert_close(a, e, dtype, name, factor=4)


@needs_native
def test_train_forward_checks_before_writing():
    x = torch.randn(1, 3, 1)
    running_mean = torch.zeros(3)
    before = x.clone()
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        ops.train_forward_(x, None, None, running_mean, torch.ones(3), 0.1, 1e-5, "identity", 0.0, None)
    assert torch.equal(x, before) and torch.equal(running_mean, torch.zeros(3))
    with pytest.raises(RuntimeError, match="running_mean and running_var must both be given"):
        ops.train_forward_(torch.randn(2, 3), None, None, running_mean, None, 0.1, 1e-5, "identity", 0.0, None)


# Sizes that stress the reductions: one channel, many channels, one value per (n, c), long planes,
# non-powers of two.
STRESS_SHAPES = [
    ((2, 1), False),
    ((1, 1, 2), False),
    ((7, 2048, 3), False),
    ((7, 2048, 3), True),
    ((5, 3, 1001), False),
    ((3, 1, 65537), False),
    ((2, 7, 33, 31), True),
    ((1, 2, 1 << 21), False),
    ((1 << 16, 3), False),
    ((9, 5, 1, 1), True),
]


@pytest.mark.parametrize("shape,channels_last", STRESS_SHAPES)
@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.2), ("elu", 0.7), ("relu", 0.0)])
def test_operators_match_reference_on_stress_sizes(shape, channels_last, activation, param, device):
    """Every operator against the float64 oracle, at sizes that exercise the work split."""
    s = sample(shape, torch.float64, channels_last, device)
    x = s["x"] * 3 + 1
    weight, bias = s["weight"].double(), s["bias"].double()
    count = x.numel() // x.size(1)
    expected = reference(x, weight, bias, None, None, True, 0.1, 1e-5, activation, param, s["dy"])

    mean, var = ops.statistics(x)
    assert_close(mean, x.transpose(0, 1).reshape(x.size(1), -1).mean(1), torch.float64, "mean")
    assert_close(var, x.transpose(0, 1).reshape(x.size(1), -1).var(1, unbiased=False), torch.float64, "var")

    y = x.clone()
    preact = torch.full_like(x, float("nan")) if activation == "relu" else None  # poisoned: must be overwritten
    ops.normalize_act_(y, mean, var, weight, bias, 1e-5, activation, param, preact)
    assert_close(y, expected.y, torch.float64, "output")
    kept = preact if preact is not None else y
    if preact is not None:
        assert not preact.isnan().any()

    sum_dz, sum_dz_xhat = ops.backward_reduce(kept, s["dy"], weight, bias, 1e-5, activation, param)
    assert_close(sum_dz, expected.dbias, torch.float64, "sum_dz")
    assert_close(torch.where(weight < 0, -sum_dz_xhat, sum_dz_xhat), expected.dweight, torch.float64, "sum_dz_xhat")

    torch.full_like(x, float("nan"))  # leave NaN in the allocator's free memory: unwritten elements would show
    dx = ops.backward_input(kept, s["dy"], var, weight, bias, sum_dz, sum_dz_xhat, count, 1e-5, activation, param)
    assert dx.stride() == x.stride()
    assert_close(dx, expected.dx, torch.float64, "input gradient")


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_statistics_are_accurate_for_large_offsets(channels_last, device):
    """One-pass statistics must not lose the variance to cancellation (mean 1000, std 0.1, 4M values)."""
    x64 = torch.randn(64, 4, 128, 128, dtype=torch.float64, device=device) * 0.1 + 1000
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = ops.statistics(x)
    x64 = x.double()
    expected_var = x64.var(dim=(0, 2, 3), unbiased=False)
    assert ((mean.double() - x64.mean(dim=(0, 2, 3))).abs() <= 1e-6 * 1000).all()
    assert ((var.double() - expected_var).abs() <= 1e-4 * expected_var).all()


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.05), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)])
@pytest.mark.parametrize("training", [True, False])
def test_reference_operators_match_oracle(activation, param, training):
    """The pure-PyTorch fallback computes the same function as torch's own batch_norm."""
    s = sample((4, 3, 5, 5), torch.float64)
    weight, bias, mean, var = s["weight"].double(), s["bias"].double(), s["mean"].double(), s["var"].double()
    x = s["x"]
    expected = reference(x, weight, bias, mean, var, training, 0.1, 1e-5, activation, param, s["dy"])
    if training:
        mean, var = reference_ops.statistics(x)
    y = x.clone()
    preact = torch.empty_like(x) if activation == "relu" else None
    reference_ops.normalize_act_(y, mean, var, weight, bias, 1e-5, activation, param, preact)
    kept = preact if preact is not None else y
    assert_close(y, expected.y, torch.float64, "output")
    sum_dz, sum_dz_xhat = reference_ops.backward_reduce(kept, s["dy"], weight, bias, 1e-5, activation, param)
    dx = reference_ops.backward_input(
        kept,
        s["dy"],
        var,
        weight,
        bias,
        sum_dz if training else None,
        sum_dz_xhat if training else None,
        100,
        1e-5,
        activation,
        param,
    )
    assert_close(dx, expected.dx, torch.float64, "input gradient")
    assert_close(torch.where(weight < 0, -sum_dz_xhat, sum_dz_xhat), expected.dweight, torch.float64, "weight grad")


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.path.insert(0, sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, inplace_abn
        from oracle import reference
        torch.manual_seed(0)
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        w = torch.randn(3, dtype=torch.float64, requires_grad=True)
        leaf = x.clone().requires_grad_()
        y = inplace_abn.inplace_abn(leaf.clone(), w, None, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1)
        y.backward(torch.ones_like(y))
        x.requires_grad_(False)
        expected = reference(x, w, None, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1, torch.ones_like(x))
    fallback = [str(w.message) for w in caught if "pure-PyTorch fallback" in str(w.message)]
    print(json.dumps({
        "fallback_warnings": fallback,
        "native": inplace_abn.ops.uses_native(torch.device("cpu")),
        "output_error": (y.detach() - expected.y).abs().max().item(),
        "grad_error": (leaf.grad - expected.dx).abs().max().item(),
        "weight_grad_error": (w.grad - expected.dweight).abs().max().item(),
    }))
    """
)


def test_fallback_warns_once_and_is_correct():
    """Without the native library: one warning naming the cause, and the same results."""
    env = dict(os.environ, **{_native.DISABLE_ENV: "1"})
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, tests_dir],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["native"]
    assert len(result["fallback_warnings"]) == 1
    assert f"{_native.DISABLE_ENV}=1 is set" in result["fallback_warnings"][0]
    assert result["output_error"] < 1e-12 and result["grad_error"] < 1e-12 and result["weight_grad_error"] < 1e-12


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_values_round_trip_exactly(dtype):
    """Every 16-bit pattern survives load -> float -> store (x * 1 + 0; -0 becomes +0, NaN stays NaN)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(4, 1, -1)
    y = x.clone()
    eps = 2.0**-20
    mean, var = torch.zeros(1), torch.full((1,), 1 - eps)  # var + eps == 1 exactly: scale 1, shift 0
    ops.normalize_act_(y, mean, var, None, None, eps, "identity", 0.0, None)
    nan = x.isnan()
    assert torch.equal(y.isnan(), nan)
    expected = torch.where(x == 0, torch.zeros_like(x), x)  # -0 * 1 + 0 = +0
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_rounding_matches_torch(dtype):
    """float -> 16-bit rounding (nearest even, subnormals, overflow to inf) is bit-identical to torch's."""
    weights = torch.tensor([1e-6, 1e-3, 0.7, 3.0, 2000.0, 4e4])  # half subnormals ... past the half range
    x = (torch.randn(4, weights.numel(), 2000) * 4).to(dtype)
    bias = torch.tensor([0.0, 1e-4, -0.3, 1.5, 0.0, 7.0])
    eps = 2.0**-20
    mean, var = torch.zeros(weights.numel()), torch.full((weights.numel(),), 1 - eps)
    y = x.clone()
    ops.normalize_act_(y, mean, var, weights, bias, eps, "identity", 0.0, None)
    scale = (weights.abs() + eps).reshape(1, -1, 1)
    expected = (x.float() * scale + bias.reshape(1, -1, 1)).to(dtype)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))
