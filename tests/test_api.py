"""Drop-in compatibility with mapillary's inplace_abn 1.1.0: constructors, attributes, state_dict,
functional calls, InPlaceABNSync without torch.distributed."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import inplace_abn
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, functions
from inplace_abn.functions import inplace_abn as functional_inplace_abn
from inplace_abn.functions import inplace_abn_sync

from oracle import assert_close, reference


@pytest.mark.parametrize("module_class", [ABN, InPlaceABN, InPlaceABNSync])
def test_constructor_attributes_and_state_dict(module_class):
    module = module_class(16, 1e-3, 0.2, True, True, "elu", 0.5)  # positional, as in 1.1.0
    assert (
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        module.activation,
        module.activation_param,
    ) == (16, 1e-3, 0.2, True, True, "elu", 0.5)
    assert [name for name, _ in module.named_parameters()] == ["weight", "bias"]
    assert list(module.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert torch.equal(module.weight, torch.ones(16)) and torch.equal(module.bias, torch.zeros(16))
    assert torch.equal(module.running_mean, torch.zeros(16)) and torch.equal(module.running_var, torch.ones(16))
    assert module.num_batches_tracked.dtype == torch.long and int(module.num_batches_tracked) == 0
    assert repr(module) == f"{module_class.__name__}(16, eps=0.001, momentum=0.2, affine=True, activation=elu[0.5])"
    plain = module_class(4, affine=False, track_running_stats=False)
    assert plain.weight is None and plain.bias is None and list(plain.state_dict()) == []


def test_defaults_match_the_original():
    module = InPlaceABN(8)
    assert (module.eps, module.momentum, module.activation, module.activation_param) == (1e-5, 0.1, "leaky_relu", 0.01)
    assert module.affine and module.track_running_stats


def test_old_checkpoint_without_num_batches_tracked_loads():
    source = InPlaceABN(8)
    source.running_mean.normal_()
    state = source.state_dict()
    del state["num_batches_tracked"]
    del state._metadata[""]  # checkpoints of version 1 carry no version
    target = InPlaceABN(8)
    target.num_batches_tracked.fill_(7)
    target.load_state_dict(state, strict=True)
    assert torch.equal(target.running_mean, source.running_mean) and int(target.num_batches_tracked) == 0


def test_batchnorm_checkpoint_loads_into_inplace_abn():
    bn = nn.BatchNorm2d(8)
    bn.running_var.uniform_(0.5, 2)
    module = InPlaceABN(8)
    module.load_state_dict(bn.state_dict())
    assert torch.equal(module.running_var, bn.running_var)


def test_positional_functional_call_like_timm():
    x = torch.randn(4, 8, 5, 5)
    weight, bias = torch.rand(8) + 0.5, torch.randn(8)
    running_mean, running_var = torch.zeros(8), torch.ones(8)
    expected = reference(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5, "leaky_relu", 0.01, None)
    out = functional_inplace_abn(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5, "leaky_relu", 0.01)
    assert out is x
    assert_close(out, expected.y, torch.float32, "output")
    assert_close(running_var, expected.running_var, torch.float32, "running_var")
    assert inplace_abn.inplace_abn is functional_inplace_abn


def test_inference_overwrites_input_and_returns_it():
    module = InPlaceABN(8).eval()
    x = torch.randn(2, 8, 4, 4)
    expected = reference(
        x,
        module.weight,
        module.bias,
        module.running_mean,
        module.running_var,
        False,
        0.1,
        1e-5,
        "leaky_relu",
        0.01,
        None,
    )
    with torch.no_grad():
        out = module(x)
    assert out is x
    assert_close(x, expected.y, torch.float32, "output")


def test_sync_without_distributed_warns_once_and_matches_inplace_abn():
    functions._warned.discard("sync")
    x = torch.randn(4, 8, 5, 5)
    sync, plain = InPlaceABNSync(8), InPlaceABN(8)
    with pytest.warns(RuntimeWarning, match="torch.distributed is not initialized") as record:
        y_sync = sync(x.clone())
        assert torch.equal(y_sync, plain(x.clone()))
        assert torch.equal(sync.running_var, plain.running_var)
        sync(x.clone())
    assert len([w for w in record if "distributed" in str(w.message)]) == 1
    sync.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode synchronizes nothing: no warning
        inplace_abn_sync(x.clone(), sync.weight, sync.bias, sync.running_mean, sync.running_var, False)


def test_set_group_and_set_active_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), InPlaceABNSync(8), nn.Sequential(InPlaceABNSync(8, group="g0")))
    assert model[1].group is None and model[2][0].group == "g0"
    model[1].set_group("g1")
    assert model[1].group == "g1"
    inplace_abn.set_active_group(model, "g2")
    assert model[1].group == "g2" and model[2][0].group == "g2"
    assert callable(inplace_abn.active_group)


def test_module_copies_and_pickles():
    module = InPlaceABN(8, activation="elu", activation_param=0.3)
    module.running_mean.normal_()
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert clone.activation == "elu" and clone.activation_param == 0.3
        assert torch.equal(clone.running_mean, module.running_mean)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_module_cast_to_other_dtypes(dtype):
    module = InPlaceABN(8).to(dtype)
    x = torch.randn(4, 8, 3, 3, dtype=dtype)
    leaf = x.clone().requires_grad_()
    y = module(leaf * 1)
    y.sum().backward()
    assert y.dtype == dtype and module.weight.grad.dtype == dtype and module.running_var.dtype == dtype
    assert torch.isfinite(leaf.grad).all()
