"""Bad input: each a clear error naming what was wrong, with the input left unmodified."""

from __future__ import annotations

import pytest
import torch

from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, _native, inplace_abn, inplace_abn_sync


def call(x, **overrides):
    args = dict(
        weight=torch.ones(3),
        bias=torch.zeros(3),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        training=True,
        momentum=0.1,
        eps=1e-5,
        activation="leaky_relu",
        activation_param=0.01,
    )
    args.update(overrides)
    return inplace_abn(
        x, args.pop("weight"), args.pop("bias"), args.pop("running_mean"), args.pop("running_var"), **args
    )


BAD_CALLS = [
    (
        "wrong channel count",
        lambda: torch.randn(2, 4, 5),
        {},
        ValueError,
        r"weight has shape \(3,\) but the input has 4 channels \(input shape \(2, 4, 5\)\)",
    ),
    (
        "wrong running_var size",
        lambda: torch.randn(2, 3, 5),
        {"running_var": torch.ones(5)},
        ValueError,
        r"running_var has shape \(5,\) but the input has 3 channels",
    ),
    ("ndim < 2", lambda: torch.randn(6), {}, ValueError, r"at least 2 dimensions, got shape \(6,\)"),
    (
        "integer dtype",
        lambda: torch.arange(30).reshape(2, 3, 5),
        {},
        TypeError,
        r"supports float32, float64, float16 and bfloat16 inputs, got torch.int64",
    ),
    (
        "unknown activation",
        lambda: torch.randn(2, 3, 5),
        {"activation": "swish"},
        ValueError,
        r"unknown activation 'swish': expected one of 'leaky_relu', 'elu', 'identity', 'relu'",
    ),
    (
        "negative activation_param",
        lambda: torch.randn(2, 3, 5),
        {"activation_param": -0.1},
        ValueError,
        r"activation_param must be a finite number >= 0 .* got -0.1",
    ),
    (
        "different devices",
        lambda: torch.randn(2, 3, 5),
        {"weight": torch.ones(3, device="meta")},
        ValueError,
        r"weight is on meta but the input is on cpu: move them to the same device",
    ),
    (
        "one value per channel",
        lambda: torch.randn(1, 3, 1, 1),
        {},
        ValueError,
        r"input of shape \(1, 3, 1, 1\) has 1 value\(s\) per channel: training needs more than one",
    ),
    (
        "eval without running stats",
        lambda: torch.randn(2, 3, 5),
        {"training": False, "running_mean": None, "running_var": None},
        ValueError,
        r"training=False normalizes with the running statistics, but running_mean and running_var are None",
    ),
    (
        "running_mean without running_var",
        lambda: torch.randn(2, 3, 5),
        {"running_var": None},
        ValueError,
        r"running_mean and running_var must both be given or both be None",
    ),
    ("eps not positive", lambda: torch.randn(2, 3, 5), {"eps": 0.0}, ValueError, r"eps must be a finite number > 0"),
    (
        "momentum None",
        lambda: torch.randn(2, 3, 5),
        {"momentum": None},
        ValueError,
        r"momentum must be a finite number when updating running statistics, got None",
    ),
    (
        "integer weight",
        lambda: torch.randn(2, 3, 5),
        {"weight": torch.ones(3, dtype=torch.long)},
        TypeError,
        r"weight must be a float tensor, got torch.int64",
    ),
    (
        "expanded input",
        lambda: torch.randn(1, 3, 1).expand(4, 3, 5),
        {},
        ValueError,
        r"overlapping memory .* pass x.contiguous\(\)",
    ),
]


@pytest.mark.parametrize("name,make_input,overrides,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_leaves_input_intact(name, make_input, overrides, error, message):
    x = make_input()
    before = x.clone()
    stats = {k: v.clone() for k, v in overrides.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(error, match=message):
        call(x, **overrides)
    assert torch.equal(x, before)
    for k, v in stats.items():
        assert torch.equal(overrides[k], v), k


def test_leaf_that_requires_grad_is_rejected():
    x = torch.randn(2, 3, 5, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match=r"input is a leaf tensor that requires grad.*x.clone\(\)"):
        call(x)
    assert torch.equal(x.detach(), before)
    with torch.no_grad():  # without autograd a leaf may be overwritten, as with any in-place op
        call(x)
    assert not torch.equal(x.detach(), before)


@pytest.mark.parametrize("module_class", [ABN, InPlaceABN, InPlaceABNSync])
def test_module_rejects_wrong_channel_count(module_class):
    module = module_class(4, affine=False, track_running_stats=False)  # no per-channel tensor to compare with
    x = torch.randn(2, 3, 5)
    before = x.clone()
    with pytest.raises(
        ValueError,
        match=rf"{module_class.__name__}\(4\) expects an input of shape \(N, 4, \*\), "
        r"got \(2, 3, 5\)",
    ):
        module(x)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match=r"expects an input of shape \(N, 4, \*\), got \(4,\)"):
        module(torch.randn(4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"activation_param": -1.0}, "activation_param must be a finite number >= 0"),
        ({"activation_param": float("nan")}, "activation_param must be a finite number >= 0"),
    ],
)
def test_module_rejects_bad_activation_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InPlaceABN(4, **kwargs)


def test_module_rejects_bad_num_features():
    with pytest.raises(ValueError, match="num_features must be a positive integer, got 0"):
        InPlaceABN(0)


def test_sync_checks_arguments_too():
    x = torch.randn(2, 3, 5)
    before = x.clone()
    with pytest.raises(ValueError, match="weight has shape"):
        inplace_abn_sync(x, torch.ones(4), None, None, None)
    assert torch.equal(x, before)


@pytest.mark.parametrize("no_grad", [False, True])
def test_overwritten_tensor_needed_by_another_backward_is_caught(no_grad):
    """Autograd must refuse to use a tensor that InPlaceABN overwrote, never give a wrong gradient."""
    leaf = torch.randn(2, 3, 5, requires_grad=True)
    x = leaf * 2
    uses_x = x.sin()  # saves x for its backward
    if no_grad:
        with torch.no_grad():
            call(x)
    else:
        call(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        uses_x.sum().backward()


@pytest.mark.skipif(not _native.has_kernels_for("cpu"), reason="native library not loaded")
@pytest.mark.parametrize(
    "args,message",
    [
        (
            lambda x: (x, torch.zeros(4), torch.ones(3), None, None, 1e-5, "identity", 0.0, None),
            r"mean must have shape \(3,\) to match the input's channel dimension",
        ),
        (
            lambda x: (x, torch.zeros(3), torch.ones(3), None, None, 1e-5, "swish", 0.0, None),
            r"unknown activation 'swish'",
        ),
        (
            lambda x: (x, torch.zeros(3), torch.ones(3), None, None, 1e-5, "leaky_relu", 0.0, None),
            r"leaky_relu with activation_param=0 is not invertible; use activation 'relu'",
        ),
        (
            lambda x: (x, torch.zeros(3), torch.ones(3), None, None, 1e-5, "elu", -1.0, None),
            r"activation_param must be >= 0",
        ),
        (
            lambda x: (x, torch.zeros(3), torch.ones(3), None, None, 1e-5, "elu", 1.0, torch.empty_like(x)),
            r"preact is only written for activation 'relu'",
        ),
        (
            lambda x: (x, torch.zeros(3), torch.ones(3), None, None, 1e-5, "relu", 0.0, torch.empty(2, 3, 4)),
            r"preact must have the shape of x",
        ),
        (
            lambda x: (x.long(), torch.zeros(3), torch.ones(3), None, None, 1e-5, "relu", 0.0, None),
            r"x must be float32, float64, float16 or bfloat16",
        ),
    ],
)
def test_native_operator_checks_its_arguments(args, message):
    """The native operators check their arguments too (second line of defence), before writing."""
    x = torch.randn(2, 3, 5)
    before = x.clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.inplace_abn.normalize_act_(*args(x))
    assert torch.equal(x, before)
