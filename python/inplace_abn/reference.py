"""Pure-PyTorch implementation of the native operators, with the same signatures and semantics.

It is the oracle the native kernels are tested against, and the fallback used when the native
library cannot be loaded. The math (see also src/abn_math.h), per channel over all other dims:

    s = |w| + eps,  invstd = 1 / sqrt(var + eps)
    forward:   z = s * (x - mean) * invstd + b,  y = act(z)
    backward:  z = act^-1(y), dz = dy * act'(z), xhat = (z - b) / s
               sum_dz = sum(dz), sum_dz_xhat = sum(dz * xhat)
               dx = s * invstd * (dz - sum_dz / n - xhat * sum_dz_xhat / n)   (training)
               dx = s * invstd * dz                                            (eval)

For "relu" the backward operators take the pre-activation z in place of y.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulate_dtype",
    "backward_input",
    "backward_reduce",
    "normalize_act_",
    "statistics",
    "train_backward",
    "train_forward_",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and backward sums are computed and returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast over a (N, C, *) tensor."""
    return v.reshape([1, -1] + [1] * (like.dim() - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _scale_and_bias(
    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, channels: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulate_dtype(like.dtype)
    s = weight.to(acc).abs() + eps if weight is not None else like.new_ones(channels, dtype=acc)
    b = bias.to(acc) if bias is not None else like.new_zeros(channels, dtype=acc)
    return s, b


def _activate(z: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return torch.where(z > 0, z, z * param)
    if activation == "elu":
        return torch.where(z > 0, z, param * torch.expm1(z))
    if activation == "relu":
        return torch.clamp_min(z, 0)
    return z


def _recover(saved: torch.Tensor, dy: torch.Tensor, activation: str, param: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, dz) from what backward keeps: the output y, or the pre-activation z for relu.

    A NaN y gives z = NaN and the derivative torch's backward gives at NaN: the slope for
    leaky_relu (`z > 0` is false), 1 for relu (`z <= 0` is false), NaN for elu (see src/abn_math.h).
    """
    if activation == "leaky_relu":
        positive = saved > 0
        return torch.where(positive, saved, saved / param), torch.where(positive, dy, dy * param)
    if activation == "elu":
        positive = saved > 0
        # Clamp 1 + y / alpha away from 0: outputs that rounded to -alpha give a finite z.
        ratio = torch.clamp_min(1 + saved / param, torch.finfo(saved.dtype).eps)
        return torch.where(positive, saved, torch.log(ratio)), torch.where(positive, dy, dy * (saved + param))
    if activation == "relu":
        return saved, torch.where(saved <= 0, torch.zeros_like(dy), dy)
    return saved, dy


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a (N, C, *) tensor (zeros when it holds no values, as the kernels)."""
    acc = accumulate_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros(x.size(1), dtype=acc), x.new_zeros(x.size(1), dtype=acc)
    dims = _reduce_dims(x)
    var, mean = torch.var_mean(x.to(acc), dim=dims, correction=0)
    # var_mean's (Welford) mean of a channel holding an infinity is NaN; batch_norm's is +-inf.
    return torch.where(mean.isnan(), x.to(acc).mean(dims), mean), var


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
    """x <- act(s * (x - mean) * invstd + b) in place; preact receives z for relu."""
    acc = accumulate_dtype(x.dtype)
    s, b = _scale_and_bias(weight, bias, eps, x.size(1), x)
    scale = s * torch.rsqrt(var.to(acc) + eps)
    shift = b - mean.to(acc) * scale
    z = x.to(acc) * _per_channel(scale, x) + _per_channel(shift, x)
    if preact is not None:
        preact.copy_(z)
    x.copy_(_activate(z, activation, activation_param))


def backward_reduce(
    y: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum(dz) and sum(dz * xhat)."""
    acc = accumulate_dtype(y.dtype)
    s, b = _scale_and_bias(weight, bias, eps, y.size(1), y)
    z, dz = _recover(y.to(acc), dy.to(acc), activation, activation_param)
    dims = _reduce_dims(y)
    return dz.sum(dims), (dz * (z - _per_channel(b, y))).sum(dims) / s


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
    """Input gradient; without sum_dz / sum_dz_xhat the statistics are constants (eval mode)."""
    acc = accumulate_dtype(y.dtype)
    s, b = _scale_and_bias(weight, bias, eps, y.size(1), y)
    z, dz = _recover(y.to(acc), dy.to(acc), activation, activation_param)
    grad = dz
    if sum_dz is not None and sum_dz_xhat is not None:
        xhat = (z - _per_channel(b, y)) / _per_channel(s, y)
        grad = dz - _per_channel(sum_dz.to(acc) / count, y) - xhat * _per_channel(sum_dz_xhat.to(acc) / count, y)
    dx = grad * _per_channel(s * torch.rsqrt(var.to(acc) + eps), y)
    return dx.to(y.dtype)


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
    """Statistics, running statistics r <- r + momentum * (b - r) (unbiased variance; not for an empty batch),
    normalize_act_; returns the biased batch variance."""
    mean, var = statistics(x)
    count = x.numel() // x.size(1) if x.size(1) else 0
    if running_mean is not None and running_var is not None and count > 0:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
    normalize_act_(x, mean, var, weight, bias, eps, activation, activation_param, preact)
    return var


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
    """(dx, dweight = sign(w) * sum(dz * xhat), dbias = sum(dz)) of a training step."""
    sum_dz, sum_dz_xhat = backward_reduce(y, dy, weight, bias, eps, activation, activation_param)
    count = max(y.numel() // y.size(1) if y.size(1) else 0, 1)
    dx = backward_input(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, activation, activation_param)
    dweight = sum_dz_xhat if weight is None else torch.where(weight < 0, -sum_dz_xhat, sum_dz_xhat).to(weight.dtype)
    dbias = sum_dz if bias is None else sum_dz.to(bias.dtype)
    return dx, dweight, dbias
