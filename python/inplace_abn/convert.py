"""Conversions between BatchNorm + activation and In-Place ABN.

- convert_to_inplace_abn(model): (BatchNorm, activation) pairs of nn.Sequential containers become
  (InPlaceABN, nn.Identity), with the same outputs and gradients. Layers that cannot convert exactly
  are left as they are and reported.
- convert_to_batchnorm(model): InPlaceABN / InPlaceABNSync / ABN become nn.Sequential(BatchNorm,
  activation) with the same outputs (weight |w| + eps for the in-place modules), e.g. for deployment
  to tools that know BatchNorm but not In-Place ABN.
- convert_sync_inplace_abn(model, group): InPlaceABN becomes InPlaceABNSync, like
  torch.nn.SyncBatchNorm.convert_sync_batchnorm.

All three replace submodules of `model` in place and return the model (a new module where `model`
itself is converted). The first two create new parameters: build optimizers after converting.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .abn import ABN, InPlaceABN, InPlaceABNSync

__all__ = ["Conversion", "convert_sync_inplace_abn", "convert_to_batchnorm", "convert_to_inplace_abn"]

# BatchNorm classes converted (exact types: subclasses may add behaviour, e.g. timm's BatchNormAct2d).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Modules that return their input itself in eval mode (skipped when looking for the BatchNorm's producer).
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class Conversion(NamedTuple):
    """Result of convert_to_inplace_abn: the model, the converted BatchNorm layers, the others and why."""

    module: nn.Module
    converted: list[str]
    skipped: dict[str, str]


def _activation_of(module: nn.Module) -> tuple[str, float] | str:
    """(activation, activation_param) of an In-Place ABN activation module, or why there is none."""
    if type(module) is nn.Identity:
        return "identity", 0.0
    if type(module) is nn.ReLU:
        return "relu", 0.0
    if type(module) is nn.LeakyReLU:
        slope = float(module.negative_slope)
        if slope < 0:
            return f"LeakyReLU with negative_slope={slope} < 0 is not supported"
        return ("leaky_relu", slope) if slope > 0 else ("relu", 0.0)
    if type(module) is nn.ELU:
        alpha = float(module.alpha)
        if alpha < 0:
            return f"ELU with alpha={alpha} < 0 is not supported"
        return ("elu", alpha) if alpha > 0 else ("relu", 0.0)
    return f"followed by {type(module).__name__}, not by LeakyReLU, ELU, ReLU or Identity"


def _reads_outside_input(sequential: nn.Sequential, index: int) -> bool:
    """Whether child `index` receives the Sequential's own input (possibly through pass-through modules)."""
    children = list(sequential.children())
    for previous in reversed(children[:index]):
        if not isinstance(previous, _PASS_THROUGH):
            return False
    return True


def _inexact_weight(bn: _BatchNorm) -> str | None:
    """Why |w'| + eps = w has no solution for some channel (w < eps), or None."""
    if bn.weight is None:
        return None
    bad = (bn.weight.detach() < bn.eps).nonzero().flatten().tolist()
    if not bad:
        return None
    shown = ", ".join(f"weight[{c}] = {bn.weight[c].item():.4g}" for c in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return (
        f"cannot convert exactly: {shown} < eps = {bn.eps:g}, and In-Place ABN's scale is |weight| + eps, always >= eps"
    )


def _to_inplace_abn(bn: _BatchNorm, activation: str, param: float, sync: bool, group: Any) -> ABN:
    if isinstance(bn, nn.SyncBatchNorm):
        sync, group = True, bn.process_group if group is None else group
    kwargs: dict[str, Any] = dict(group=group) if sync else {}
    cls = InPlaceABNSync if sync else InPlaceABN
    layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, activation, param, **kwargs)
    reference = bn.weight if bn.weight is not None else bn.running_mean
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if bn.affine:
            layer.weight.copy_(bn.weight - bn.eps)  # |w - eps| + eps = w for w >= eps
            layer.bias.copy_(bn.bias)
            layer.weight.requires_grad_(bn.weight.requires_grad)
            layer.bias.requires_grad_(bn.bias.requires_grad)
        if bn.track_running_stats:
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    return layer.train(bn.training)


def convert_to_inplace_abn(module: nn.Module, sync: bool = False, group: Any = None) -> Conversion:
    """Replaces (BatchNorm, activation) pairs of every nn.Sequential in `module` by (InPlaceABN, nn.Identity).

    Recognized: a child of an nn.Sequential that is exactly nn.BatchNorm1d / 2d / 3d or
    nn.SyncBatchNorm, immediately followed by nn.LeakyReLU (slope >= 0), nn.ELU (alpha >= 0), nn.ReLU
    or nn.Identity. The pair becomes (InPlaceABN, nn.Identity) at the same indices, so the state_dict
    keys stay the same; ReLU (and a slope or alpha of 0) becomes activation "relu": exact, but without
    the memory saving. nn.SyncBatchNorm (or every layer with sync=True) becomes InPlaceABNSync over its
    process group (or `group`). The new layer's weight is w - eps, so that its scale |w - eps| + eps
    equals the BatchNorm weight w; outputs and gradients are the same up to rounding.

    Left as they are, and listed in the result's `skipped` with the reason:
    - BatchNorm layers with a weight below eps in some channel (negative, zero or tiny): In-Place ABN's
      scale |w| + eps cannot represent them (these are also reported in one RuntimeWarning);
    - a BatchNorm that is the first child of its Sequential (only pass-through modules before it): it
      reads the Sequential's input, which the caller may still use (a residual connection, say) and
      which In-Place ABN would overwrite;
    - a BatchNorm not followed by one of the activations above, or not inside an nn.Sequential
      (e.g. BatchNorm used from a custom forward()).
    In-place operation also assumes that the module before the BatchNorm returns a tensor nobody else
    reads (true for convolutions and linear layers).

    Returns:
        Conversion(module, converted, skipped): the model (converted in place), the names of the
        converted BatchNorm layers, and {name: reason} of the BatchNorm layers left unconverted.
    """
    converted: list[str] = []
    skipped: dict[str, str] = {}
    inexact: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            path = f"{prefix}{name}"
            if type(child) not in BATCHNORMS:
                visit(child, path + ".")
                continue
            if not isinstance(parent, nn.Sequential):
                skipped[path] = "not inside an nn.Sequential: its activation (if any) is not known"
                continue
            if index + 1 == len(children):
                skipped[path] = "last child of its nn.Sequential: no activation follows"
                continue
            activation = _activation_of(children[index + 1][1])
            if isinstance(activation, str):
                skipped[path] = activation
                continue
            if _reads_outside_input(parent, index):
                skipped[path] = (
                    "reads the input of its nn.Sequential, which In-Place ABN would overwrite while the caller may "
                    "still use it"
                )
                continue
            reason = _inexact_weight(child)
            if reason is not None:
                skipped[path] = reason
                inexact.append(path)
                continue
            setattr(parent, name, _to_inplace_abn(child, *activation, sync=sync, group=group))
            setattr(parent, children[index + 1][0], nn.Identity())
            converted.append(path)

    visit(module, "")
    if inexact:
        warnings.warn(
            f"convert_to_inplace_abn left {len(inexact)} BatchNorm layer(s) unconverted because some weights are "
            f"below eps, which In-Place ABN's scale |weight| + eps cannot represent: {', '.join(inexact)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return Conversion(module, converted, skipped)


def _activation_module(activation: str, param: float) -> nn.Module:
    if activation == "leaky_relu" and param > 0:
        return nn.LeakyReLU(param)
    if activation == "elu" and param > 0:
        return nn.ELU(param)
    if activation in ("relu", "leaky_relu", "elu"):
        return nn.ReLU()
    return nn.Identity()


def _to_batchnorm(layer: ABN, batchnorm: type[_BatchNorm]) -> nn.Sequential:
    bn = batchnorm(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    reference = layer.weight if layer.weight is not None else layer.running_mean
    if reference is not None:
        bn.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if layer.affine:
            # ABN normalizes with the weight itself, InPlaceABN and InPlaceABNSync with |weight| + eps.
            weight = layer.weight if type(layer) is ABN else layer.weight.abs() + layer.eps
            bn.weight.copy_(weight)
            bn.bias.copy_(layer.bias)
            bn.weight.requires_grad_(layer.weight.requires_grad)
            bn.bias.requires_grad_(layer.bias.requires_grad)
        if layer.track_running_stats:
            bn.running_mean.copy_(layer.running_mean)
            bn.running_var.copy_(layer.running_var)
            bn.num_batches_tracked.copy_(layer.num_batches_tracked)
    return nn.Sequential(bn, _activation_module(layer.activation, layer.activation_param)).train(layer.training)


def convert_to_batchnorm(module: nn.Module, batchnorm: type[_BatchNorm] = nn.BatchNorm2d) -> nn.Module:
    """Replaces every ABN / InPlaceABN / InPlaceABNSync in `module` by nn.Sequential(batchnorm, activation).

    The BatchNorm (class `batchnorm`, nn.BatchNorm2d by default: pass nn.BatchNorm1d or 3d for other
    inputs) gets weight |w| + eps (In-Place ABN's effective scale; w for ABN), the bias, the running
    statistics and the settings of the layer; the activation is nn.LeakyReLU, nn.ELU, nn.ReLU or
    nn.Identity. Outputs are the same (up to rounding), in training and eval mode; the input gradient
    and bias gradient are the same, the weight gradient is the In-Place ABN one times sign(w). The
    result runs without this package, e.g. for export or deployment. The state_dict keys of a
    converted layer gain a ".0" (it becomes a Sequential).
    """
    if isinstance(module, ABN):
        return _to_batchnorm(module, batchnorm)
    for name, child in module.named_children():
        converted = convert_to_batchnorm(child, batchnorm)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_sync_inplace_abn(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replaces every InPlaceABN in `module` by InPlaceABNSync over `process_group` (None: the default group).

    Like torch.nn.SyncBatchNorm.convert_sync_batchnorm: parameters and buffers are shared with the
    replaced layers (an optimizer built before the conversion still holds the right parameters) and
    the results are the same as InPlaceABN's on the concatenated batch of the group.
    """
    if type(module) is InPlaceABN:
        sync = InPlaceABNSync(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            module.activation,
            module.activation_param,
            group=process_group,
        )
        if module.affine:
            with torch.no_grad():
                sync.weight = module.weight
                sync.bias = module.bias
        sync.running_mean = module.running_mean
        sync.running_var = module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        return sync.train(module.training)
    for name, child in module.named_children():
        converted = convert_sync_inplace_abn(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
