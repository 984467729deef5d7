"""Drop-in use by other libraries: timm's InplaceAbn layer (timm.layers) and segmentation_models_pytorch's Unet
with decoder_use_norm="inplace" run on this package, with the outputs and gradients of the same model built
with torch BatchNorm2d (weight |w| + eps) + activation. Skipped when those packages are not installed.

They need torchvision, hence a torch with a matching torchvision (e.g. torch 2.14.1 + torchvision 0.29.1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from inplace_abn import InPlaceABN

from oracle import assert_close

EPS = 1e-5
# smp's "inplace" is InPlaceABN with leaky_relu slope 0 (ReLU): exact, with its documented warning.
pytestmark = pytest.mark.filterwarnings("ignore:inplace_abn with activation='leaky_relu' with activation_param=0")


def randomize(layer: nn.Module, seed: int) -> None:
    """Weights of both signs (|w| + eps matters), biases and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        sign = torch.where(torch.rand(c, generator=generator) < 0.3, -1.0, 1.0)
        layer.weight.copy_(sign * (torch.rand(c, generator=generator) + 0.5))
        layer.bias.copy_(torch.randn(c, generator=generator) * 0.3)
        layer.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
        layer.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def as_batchnorm(layer: nn.Module) -> nn.BatchNorm2d:
    """torch BatchNorm2d with In-Place ABN's effective weight |w| + eps and the same statistics."""
    bn = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum).double()
    with torch.no_grad():
        bn.weight.copy_(layer.weight.abs() + layer.eps)
        bn.bias.copy_(layer.bias)
        bn.running_mean.copy_(layer.running_mean)
        bn.running_var.copy_(layer.running_var)
    return bn


@pytest.mark.parametrize("act,param", [("leaky_relu", 0.2), ("elu", 1.0), ("identity", 0.0)])
def test_timm_inplace_abn(act, param):
    timm_layers = pytest.importorskip("timm.layers")
    from timm.layers import inplace_abn as timm_inplace_abn

    assert timm_inplace_abn.has_iabn, "timm did not find inplace_abn.functions"
    layer = timm_layers.create_norm_act_layer("inplaceabn", 6, act_layer=act, act_param=param).double()
    assert type(layer) is timm_layers.InplaceAbn
    randomize(layer, 0)
    activation = {"leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param), "identity": nn.Identity()}[act]
    reference = nn.Sequential(as_batchnorm(layer), activation)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    for module in (layer, reference):
        module.train()
    results = []
    for module in (layer, reference):
        leaf = x.clone().requires_grad_()
        y = module(leaf * 1)  # a non-leaf input, as in a network
        y.backward(dy)
        results.append((y.detach(), leaf.grad))
    (y, dx), (y_ref, dx_ref) = results
    assert_close(y, y_ref, torch.float64, "output", 10)
    assert_close(dx, dx_ref, torch.float64, "input gradient", 10)
    bn = reference[0]
    assert_close(layer.weight.grad * torch.sign(layer.weight.detach()), bn.weight.grad, torch.float64, "dweight", 10)
    assert_close(layer.bias.grad, bn.bias.grad, torch.float64, "dbias", 10)
    assert_close(layer.running_mean, bn.running_mean, torch.float64, "running_mean")
    assert_close(layer.running_var, bn.running_var, torch.float64, "running_var")
    layer.eval(), reference.eval()
    with torch.no_grad():
        assert_close(layer(x.clone()), reference(x), torch.float64, "eval output", 10)


def test_segmentation_models_pytorch_unet_inplace():
    smp = pytest.importorskip("segmentation_models_pytorch")

    def unet(norm: str) -> nn.Module:
        torch.manual_seed(0)
        return smp.Unet(
            "resnet18",
            encoder_weights=None,  # nothing downloaded
            encoder_depth=3,
            decoder_channels=(16, 8, 4),
            decoder_use_norm=norm,
            classes=2,
        ).double()

    model, reference = unet("inplace"), unet("batchnorm")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, InPlaceABN)}
    assert len(layers) == 6 and all(m.activation_param == 0.0 for m in layers.values())
    for seed, layer in enumerate(layers.values()):
        randomize(layer, seed)
    # Same architecture and state_dict keys: InPlaceABN + Identity where the reference has BatchNorm2d + ReLU.
    state = model.state_dict()
    for name in layers:
        state[f"{name}.weight"] = layers[name].weight.detach().abs() + EPS
    reference.load_state_dict(state)
    for name in layers:
        assert type(reference.get_submodule(name)) is nn.BatchNorm2d

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for m in (model, reference):
        leaf = x.clone().requires_grad_()
        y = m(leaf)
        y.backward(torch.cos(y.detach()))  # any fixed output gradient
        results.append((y.detach(), leaf.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    assert_close(y, y_ref, torch.float64, "output", 100)
    assert_close(dx, dx_ref, torch.float64, "input gradient", 100)
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        if grads_ref[name] is None:  # encoder stages beyond encoder_depth are unused
            assert grad is None, name
            continue
        prefix = name.rpartition(".")[0]
        if prefix in layers and name.endswith("weight"):
            grad = grad * torch.sign(layers[prefix].weight.detach())
        assert_close(grad, grads_ref[name], torch.float64, f"gradient of {name}", 100)
    for name, buffer in reference.named_buffers():
        if buffer.is_floating_point():
            assert_close(model.get_buffer(name), buffer, torch.float64, name, 10)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert_close(model(x), reference(x), torch.float64, "eval output", 100)
