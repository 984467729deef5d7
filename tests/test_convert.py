"""Conversions: BatchNorm + activation <-> In-Place ABN, and InPlaceABN -> InPlaceABNSync.

Converted models are compared with the models they came from (deep copies taken before converting):
outputs, running statistics, input and parameter gradients, in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import inplace_abn
from inplace_abn import (
    ABN,
    InPlaceABN,
    InPlaceABNSync,
    convert_sync_inplace_abn,
    convert_to_batchnorm,
    convert_to_inplace_abn,
)

from oracle import assert_close


def randomize(model: nn.Module, negative: bool = False) -> nn.Module:
    """Random BatchNorm / ABN weights (>= 0.5 in magnitude; some negative with negative=True), biases, stats."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, ABN)):
                c = m.num_features
                if m.weight is not None:
                    sign = torch.where(torch.rand(c, generator=generator) < 0.4, -1.0, 1.0) if negative else 1.0
                    m.weight.copy_(sign * (torch.rand(c, generator=generator) + 0.5))
                    m.bias.copy_(torch.randn(c, generator=generator) * 0.3)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model


def batchnorm_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.LeakyReLU(0.1),
        nn.Conv2d(6, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6, momentum=None),
        nn.ELU(0.7, inplace=True),
        nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5, affine=False), nn.ReLU()),
        nn.Conv2d(5, 4, 1),
        nn.BatchNorm2d(4, eps=1e-3, track_running_stats=False),
        nn.Identity(),
    ).double()


def run(model: nn.Module, x: torch.Tensor, dy_seed: int = 1) -> dict:
    """Output, input gradient and parameter gradients of one forward / backward."""
    leaf = x.clone().requires_grad_()
    y = model(leaf)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype)
    y.backward(dy)
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad()
    return dict(y=y.detach(), dx=leaf.grad, grads=grads)


def assert_same(a: dict, b: dict, what: str, weight_sign: dict | None = None) -> None:
    assert_close(a["y"], b["y"], torch.float64, f"{what}: output", 10)
    assert_close(a["dx"], b["dx"], torch.float64, f"{what}: input gradient", 10)
    assert set(a["grads"]) == set(b["grads"])
    for name, grad in a["grads"].items():
        sign = (weight_sign or {}).get(name, 1.0)
        assert_close(grad * sign, b["grads"][name], torch.float64, f"{what}: gradient of {name}", 10)


def test_batchnorm_pairs_become_inplace_abn_with_same_results():
    original = randomize(batchnorm_model())
    model = copy.deepcopy(original)
    result = convert_to_inplace_abn(model)
    assert result.module is model
    assert result.converted == ["1", "4", "6.1", "8"] and result.skipped == {}
    expected_types = {"1": ("leaky_relu", 0.1), "4": ("elu", 0.7), "6.1": ("relu", 0.0), "8": ("identity", 0.0)}
    for name, (activation, param) in expected_types.items():
        layer = model.get_submodule(name)
        assert type(layer) is InPlaceABN and (layer.activation, layer.activation_param) == (activation, param)
    assert type(model[2]) is nn.Identity and type(model[5]) is nn.Identity and type(model[6][2]) is nn.Identity
    assert list(model.state_dict()) == list(original.state_dict())  # same keys: checkpoints load both ways
    assert model[4].momentum is None and model[8].running_mean is None and model[6][1].weight is None
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "inplace_abn with activation='relu'")
        for step in range(2):  # training mode: batch statistics, running statistics updated
            assert_same(run(model, x * (step + 1)), run(original, x * (step + 1)), f"training step {step}")
        for name, buffer in original.named_buffers():
            assert_close(model.get_buffer(name), buffer, torch.float64, name)
        model.eval(), original.eval()
        assert_same(run(model, x), run(original, x), "eval mode")


@pytest.mark.parametrize("dims", [1, 3])
def test_batchnorm_1d_and_3d(dims):
    torch.manual_seed(0)
    if dims == 1:
        original = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.LeakyReLU(0.2))
        x = torch.randn(6, 5, dtype=torch.float64)
    else:
        original = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.ELU())
        x = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64)
    original = randomize(original.double())
    model = convert_to_inplace_abn(copy.deepcopy(original)).module
    assert type(model[1]) is InPlaceABN
    assert_same(run(model, x), run(original, x), f"BatchNorm{dims}d")


def test_layers_that_cannot_convert_are_left_and_reported():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    negative = nn.BatchNorm2d(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        negative,
        nn.LeakyReLU(0.1),
        nn.Sequential(nn.Dropout(0.1), nn.BatchNorm2d(4), nn.ReLU()),  # reads the Sequential's input
        nn.Conv2d(4, 3, 1),
        nn.BatchNorm2d(3),
        nn.GELU(),
        Custom(),
        nn.Conv2d(3, 3, 1),
        nn.BatchNorm2d(3),
        nn.LeakyReLU(-0.5),
        nn.Conv2d(3, 3, 1),
        nn.BatchNorm2d(3),
    )
    with torch.no_grad():
        negative.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0]))
    before = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=r"1 BatchNorm layer\(s\) unconverted .*: 1$"):
        result = convert_to_inplace_abn(model)
    assert result.converted == []
    assert set(result.skipped) == {"1", "3.1", "5", "7.bn", "9", "12"}
    assert "weight[1] = -0.5, weight[3] = 0" in result.skipped["1"]
    assert "overwrite" in result.skipped["3.1"]
    assert "GELU" in result.skipped["5"]
    assert "not inside an nn.Sequential" in result.skipped["7.bn"]
    assert "negative_slope=-0.5" in result.skipped["9"]
    assert "no activation follows" in result.skipped["12"]
    assert str(model) == str(before)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values(), strict=True)
    )


def test_weights_just_above_eps_convert():
    bn = nn.BatchNorm2d(3, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1e-3, 0.5, 2e-3]))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bn, nn.Identity())
    original = copy.deepcopy(model)
    assert convert_to_inplace_abn(model).converted == ["1"]
    x = torch.randn(4, 2, 3, 3)
    model.eval(), original.eval()
    with torch.no_grad():
        assert_close(model(x), original(x), torch.float32, "output")


def test_sync_batchnorm_and_sync_option_give_inplace_abn_sync():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, process_group="pg"), nn.LeakyReLU(), nn.Conv2d(4, 4, 1)
    )
    model.append(nn.BatchNorm2d(4)).append(nn.ELU())
    convert_to_inplace_abn(model)
    assert type(model[1]) is InPlaceABNSync and model[1].group == "pg"
    assert type(model[4]) is InPlaceABN
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU())
    convert_to_inplace_abn(model, sync=True, group="g")
    assert type(model[1]) is InPlaceABNSync and model[1].group == "g"


def inplace_abn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        InPlaceABN(6, activation="leaky_relu", activation_param=0.05),
        nn.Conv2d(6, 5, 1),
        InPlaceABN(5, momentum=None, activation="elu", activation_param=1.3),
        nn.Conv2d(5, 5, 1),
        ABN(5, activation="leaky_relu", activation_param=0.2),
        nn.Conv2d(5, 4, 1),
        nn.Sequential(nn.Conv2d(4, 4, 1), InPlaceABN(4, eps=1e-3, activation="identity")),
        nn.Conv2d(4, 4, 1),
        InPlaceABN(4, affine=False, activation="relu"),
    ).double()


def test_inplace_abn_becomes_batchnorm_with_same_results():
    original = randomize(inplace_abn_model(), negative=True)
    model = convert_to_batchnorm(copy.deepcopy(original))
    assert not any(isinstance(m, ABN) for m in model.modules())
    assert [type(m) for m in model[1]] == [nn.BatchNorm2d, nn.LeakyReLU] and model[1][1].negative_slope == 0.05
    assert [type(m) for m in model[3]] == [nn.BatchNorm2d, nn.ELU] and model[3][1].alpha == 1.3
    assert [type(m) for m in model[7][1]] == [nn.BatchNorm2d, nn.Identity]
    assert [type(m) for m in model[9]] == [nn.BatchNorm2d, nn.ReLU] and model[9][0].weight is None
    # weight = |w| + eps for In-Place ABN, w for ABN
    assert torch.equal(model[1][0].weight, original[1].weight.abs() + 1e-5)
    assert torch.equal(model[5][0].weight, original[5].weight)
    assert model[3][0].momentum is None and model[7][1][0].eps == 1e-3
    # Gradients: the BatchNorm weight is |w| + eps, so d/dw = sign(w) * d/d(|w| + eps) (In-Place ABN layers).
    sign = {f"{name}.weight": torch.sign(original.get_submodule(name).weight.detach()) for name in ("1", "3", "7.1")}
    sign = {key.replace(".weight", ".0.weight"): value for key, value in sign.items()}
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "inplace_abn with activation='relu'")
        for step in range(2):
            expected, actual = run(original, x * (step + 1)), run(model, x * (step + 1))
            renamed = {}
            for name, grad in expected["grads"].items():
                prefix, _, leaf = name.rpartition(".")
                converted = isinstance(original.get_submodule(prefix), ABN)
                renamed[f"{prefix}.0.{leaf}" if converted else name] = grad
            assert_same(actual, dict(expected, grads=renamed), f"training step {step}", weight_sign=sign)
        for name, buffer in original.named_buffers():
            prefix, _, leaf = name.rpartition(".")
            assert_close(model.get_buffer(f"{prefix}.0.{leaf}"), buffer, torch.float64, name)
        model.eval(), original.eval()
        assert_close(run(model, x)["y"], run(original, x)["y"], torch.float64, "eval output", 10)


def test_root_module_and_round_trip():
    layer = randomize(InPlaceABN(4, activation="elu", activation_param=0.5).double(), negative=True)
    converted = convert_to_batchnorm(layer, nn.BatchNorm1d)
    assert isinstance(converted, nn.Sequential) and type(converted[0]) is nn.BatchNorm1d
    x = torch.randn(8, 4, dtype=torch.float64)
    layer.eval(), converted.eval()
    with torch.no_grad():
        assert_close(converted(x), layer(x.clone()), torch.float64, "root layer")
    # BatchNorm -> In-Place ABN -> BatchNorm: the same weights (|w - eps| + eps = w, up to rounding)
    original = randomize(batchnorm_model()).eval()
    back = convert_to_batchnorm(convert_to_inplace_abn(copy.deepcopy(original)).module)
    assert_close(back[1][0].weight, original[1].weight, torch.float64, "weight after a round trip")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_close(back(x), original(x), torch.float64, "round trip")


def test_convert_sync_shares_parameters_and_buffers():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        InPlaceABN(4, 1e-3, 0.2, activation="elu", activation_param=0.4),
        nn.Sequential(InPlaceABN(4, track_running_stats=False)),
        ABN(4),
    ).eval()
    first, second, abn = model[1], model[2][0], model[3]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model)
    converted = convert_sync_inplace_abn(model, process_group="g")
    assert converted is model
    sync = model[1]
    assert type(sync) is InPlaceABNSync and sync.group == "g" and not sync.training
    assert (sync.eps, sync.momentum, sync.activation, sync.activation_param) == (1e-3, 0.2, "elu", 0.4)
    assert sync.weight is first.weight and sync.bias is first.bias and sync.running_var is first.running_var
    assert sync.num_batches_tracked is first.num_batches_tracked
    assert (
        type(model[2][0]) is InPlaceABNSync and model[2][0].running_mean is None and model[2][0].weight is second.weight
    )
    assert model[3] is abn  # ABN is not in place: left alone
    assert {id(p) for p in model.parameters()} == {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert type(InPlaceABNSync.convert_sync_inplace_abn(InPlaceABN(2), "h")) is InPlaceABNSync
    x = torch.randn(2, 3, 4, 4)
    # Same results as InPlaceABN (without torch.distributed, the layer without running stats warns).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "inplace_abn_sync is called but torch.distributed is not initialized")
        assert torch.equal(model(x.clone()), before(x.clone()))
    assert inplace_abn.convert_to_inplace_abn is convert_to_inplace_abn
