"""The In-Place ABN operators (four steps, and the training step in one call each way): one typed wrapper each,
its fake kernel beside it.

Each wrapper runs the native kernel for the tensor's device when the native library for that
device is loaded, and the pure-PyTorch reference (same math, see reference.py) otherwise.
"""

from __future__ import annotations

import types

import torch

from . import _native, reference

__all__ = [
    "backward_input",
    "backward_reduce",
    "normalize_act_",
    "statistics",
    "train_backward",
    "train_forward_",
    "uses_native",
]

_CPU_NATIVE = _native.has_kernels_for("cpu")  # looked up once (the library loads when the package is imported)


def uses_native(device: torch.device) -> bool:
    """Whether tensors on `device` run the native kernels (else the reference implementation)."""
    if device.type == "cpu":
        return _CPU_NATIVE
    return _native.has_kernels_for(device)


_OPERATOR_NAMES = (
    "statistics",
    "normalize_act_",
    "backward_reduce",
    "backward_input",
    "train_forward_",
    "train_backward",
)
# The native operators' overloads, resolved once: calling an OpOverload directly skips the packet's
# overload resolution, a few microseconds per call that small layers feel.
_NATIVE_OPS = (
    types.SimpleNamespace(**{name: getattr(torch.ops.inplace_abn, name).default for name in _OPERATOR_NAMES})
    if _CPU_NATIVE
    else None
)


def _impl(t: torch.Tensor) -> types.SimpleNamespace | types.ModuleType:
    return _NATIVE_OPS if _NATIVE_OPS is not None and uses_native(t.device) else reference


def _register_fake(name: str):
    """Registers a fake (meta) kernel for torch.compile, when the native operator exists."""

    def wrap(fn):
        if _native.has_kernels_for("cpu"):
            torch.library.register_fake(f"inplace_abn::{name}")(fn)
        return fn

    return wrap


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a (N, C, *) tensor (float64 for float64, else float32)."""
    return _impl(x).statistics(x)


@_register_fake("statistics")
def _statistics_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = reference.accumulate_dtype(x.dtype)
    return x.new_empty(x.size(1), dtype=acc), x.new_empty(x.size(1), dtype=acc)


def normalize_act_(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    preact: torch.Tensor | None,
) -> None:
    """x <- act((|w| + eps) * (x - mean) / sqrt(var + eps) + b), in place.

    `preact` (same shape and strides as x), for "relu" only, receives the pre-activation that
    the backward operators need in place of y (relu is not invertible).
    """
    _impl(x).normalize_act_(x, mean, var, weight, bias, eps, activation, activation_param, preact)


@_register_fake("normalize_act_")
def _normalize_act_fake(x, mean, var, weight, bias, eps, activation, activation_param, preact) -> None:
    return None


def backward_reduce(
    y: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum(dz) and sum(dz * xhat) from the output y (the pre-activation for "relu")."""
    return _impl(y).backward_reduce(y, dy, weight, bias, eps, activation, activation_param)


@_register_fake("backward_reduce")
def _backward_reduce_fake(y, dy, weight, bias, eps, activation, activation_param):
    acc = reference.accumulate_dtype(y.dtype)
    return y.new_empty(y.size(1), dtype=acc), y.new_empty(y.size(1), dtype=acc)


def backward_input(
    y: torch.Tensor,
    dy: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sum_dz: torch.Tensor | None,
    sum_dz_xhat: torch.Tensor | None,
    count: int,
    eps: float,
    activation: str,
    activation_param: float,
) -> torch.Tensor:
    """Input gradient, laid out like y. Without sum_dz / sum_dz_xhat (eval mode) the statistics
    are constants; `count` is the number of values per channel the statistics were taken over."""
    return _impl(y).backward_input(
        y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, activation, activation_param
    )


@_register_fake("backward_input")
def _backward_input_fake(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, activation, activation_param):
    return torch.empty_like(y)


def train_forward_(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    preact: torch.Tensor | None,
) -> torch.Tensor:
    """The unsynchronized training forward in one call: batch statistics, running statistics updated with
    `momentum` (unbiased variance; left alone for an empty batch), then x <- act(...) in place.
    Returns the biased batch variance (what backward needs)."""
    return _impl(x).train_forward_(
        x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param, preact
    )


@_register_fake("train_forward_")
def _train_forward_fake(
    x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param, preact
):
    return x.new_empty(x.size(1), dtype=reference.accumulate_dtype(x.dtype))


def train_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of train_forward_ in one call: (dx, dweight, dbias), dweight and dbias in the dtypes of weight
    and bias (the accumulate dtype where they are None)."""
    return _impl(y).train_backward(y, dy, var, weight, bias, eps, activation, activation_param)


@_register_fake("train_backward")
def _train_backward_fake(y, dy, var, weight, bias, eps, activation, activation_param):
    acc = reference.accumulate_dtype(y.dtype)
    channels = y.size(1)
    return (
        torch.empty_like(y),
        y.new_empty(channels, dtype=acc if weight is None else weight.dtype),
        y.new_empty(channels, dtype=acc if bias is None else bias.dtype),
    )
