"""Functional In-Place ABN: argument checks, autograd, and running-statistics updates.

The forward overwrites x with y = act(BatchNorm(x)) and keeps only y (plus per-channel vectors)
for backward, which recovers the normalized input by inverting the activation and the affine
step. "relu" (and leaky_relu / elu with activation_param=0) is not invertible where y = 0: for it
the pre-activation is kept as well, so gradients stay exact but no memory is saved.

Under torch.compile Dynamo traces the same operators and backward (fake kernels give shapes), out of
place (see _TracedABN): the compiler plans the buffers, and the layer still keeps only its output for
backward. While exporting (torch.export, torch.onnx.export, torch.jit.trace), eval mode is written
with standard operators instead (batch_norm with weight |w| + eps, then the activation), so that
exported programs need no custom operator.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
import torch.distributed as distributed
import torch.nn.functional as functional
from torch.autograd.function import once_differentiable

from . import ops
from ._sync import LocalReduction, Reduction, reduction_for_group

__all__ = ["ACTIVATIONS", "batch_norm_act", "inplace_abn", "inplace_abn_sync"]

ACTIVATIONS = ("leaky_relu", "elu", "identity", "relu")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[str] = set()
_LOCAL = LocalReduction()  # stateless: one instance serves every call


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# Under torch.compile the call runs once while tracing (a constant result to Dynamo), not in the graph
# (a warning there would break it). This is what torch.compiler.assume_constant_result does, without
# importing torch._dynamo (seconds) when this package is imported.
_warn_once._dynamo_marked_constant = True  # type: ignore[attr-defined]


def native_activation(activation: str, activation_param: float) -> str:
    """The kernels' activation: leaky_relu / elu with parameter 0 are ReLU, which is not invertible."""
    if activation in ("leaky_relu", "elu") and activation_param == 0:
        return "relu"
    return activation


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def real_number(value: Any, name: str) -> float:
    """`value` as a float when it is a real number (int, float, NumPy scalar), as torch accepts; else ValueError."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_eps(eps: Any) -> float:
    """eps as a float; ValueError unless it is a finite number > 0."""
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case, without the generic number checks
        return eps
    value = real_number(eps, "eps")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return value


def check_momentum(momentum: Any) -> float:
    """momentum as a float; ValueError unless it is a finite number."""
    if type(momentum) is float and -math.inf < momentum < math.inf:
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not math.isfinite(momentum):
        raise ValueError(f"momentum must be a finite number when updating running statistics, got {momentum!r}")
    return float(momentum)


def check_activation(activation: Any, activation_param: Any) -> float:
    """activation_param as a float; ValueError unless `activation` is supported and `activation_param` is a finite
    number >= 0. While tracing (torch.compile) activation_param is returned as it is (it may be symbolic)."""
    if type(activation_param) is float and 0.0 <= activation_param < math.inf and activation in ACTIVATIONS:
        return activation_param  # the common case: a valid float (returned as it is, also while tracing)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}")
    if torch.compiler.is_compiling():
        return activation_param  # may be symbolic while tracing; the operators check it again
    value = real_number(activation_param, "activation_param")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"activation_param must be a finite number >= 0 (the negative slope of leaky_relu or the alpha of elu), "
            f"got {activation_param}"
        )
    return value


_CREATION_META_DEFAULT = getattr(getattr(torch._C._autograd, "CreationMeta", None), "DEFAULT", None)


def _creation_meta(view: torch.Tensor) -> Any:
    """How autograd recorded the view `view` (torch's CreationMeta); DEFAULT where torch does not say."""
    get = getattr(torch._C._autograd, "_get_creation_meta", None)
    if get is None or _CREATION_META_DEFAULT is None:
        return _CREATION_META_DEFAULT
    try:
        return get(view)
    except RuntimeError:  # not a differentiable view
        return _CREATION_META_DEFAULT


def _check_writable(x: torch.Tensor, records_grad: bool, buffers: tuple[torch.Tensor | None, ...]) -> None:
    """Raises torch's in-place errors before anything is written (autograd raises them only after the write).

    `records_grad`: autograd records the call (grad mode on and an input that requires grad); `buffers`
    are also written in place (the running statistics in training).
    """
    if not torch.is_inference_mode_enabled():
        for name, t in (("the input", x), ("running_mean", buffers[0]), ("running_var", buffers[1])):
            if t is not None and t.is_inference():
                raise RuntimeError(
                    f"inplace_abn writes {name} in place, but it is an inference tensor (created in "
                    "torch.inference_mode), which torch allows to modify only inside inference mode: clone it "
                    "outside inference mode, or run the call inside torch.inference_mode()"
                )
    if not records_grad:
        return
    if x._is_view():
        meta = _creation_meta(x)
        if meta != _CREATION_META_DEFAULT:
            reason = {
                "MULTI_OUTPUT_NODE": "an output of a function that returns several views (split, chunk, unbind, ...)",
                "NO_GRAD_MODE": "a view created in no_grad mode, modified with grad mode enabled",
                "INFERENCE_MODE": "a view created in inference mode, modified outside it",
                "IN_CUSTOM_FUNCTION": "a view created inside a custom autograd.Function",
            }.get(getattr(meta, "name", ""), f"a view autograd forbids to modify in place ({meta})")
            raise RuntimeError(
                f"inplace_abn overwrites its input, but the input is {reason}: autograd forbids modifying such a "
                "view in place (nothing was modified). Pass x.clone(), or use ABN, which is not in place"
            )
        base = x._base
        if x.requires_grad and base is not None and base.is_leaf:
            raise RuntimeError(
                "inplace_abn overwrites its input, but the input is a view of a leaf tensor that requires grad, "
                "whose value autograd must keep (nothing was modified): pass x.clone(), or use ABN, which is not "
                "in place"
            )
    if x.requires_grad and x.is_leaf:
        raise RuntimeError(
            "inplace_abn overwrites its input, but the input is a leaf tensor that requires grad, whose value "
            "autograd must keep: pass a non-leaf tensor (e.g. the output of the previous layer), x.clone(), "
            "or use ABN, which is not in place"
        )


def _check_arguments(
    x: Any,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: Any,
    eps: Any,
    activation: Any,
    activation_param: Any,
    min_values_per_channel: int,
    tracing: bool,
) -> tuple[Any, Any, Any, bool]:
    """Every check happens before x is touched, so a failed call leaves every tensor unmodified.

    `tracing`: torch.compiler.is_compiling(), looked up once by the caller. Returns (momentum, eps,
    activation_param, records_grad): the numbers as floats (momentum may be a tensor, and all three symbolic,
    under torch.compile); records_grad: whether autograd records the call.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inplace_abn expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"inplace_abn expects an input of shape (N, C, *) with at least 2 dimensions, got shape {_shape(x)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"inplace_abn supports float32, float64, float16 and bfloat16 inputs, got {x.dtype}")
    activation_param = check_activation(activation, activation_param)
    # While tracing (torch.compile, export) numbers may be symbolic and momentum a tensor: their values
    # were checked when the module was built and are checked again by the operators.
    if not tracing:
        eps = check_eps(eps)
    shape = x.shape
    channels, device = shape[1], x.device
    expected = (channels,)
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(v).__name__}")
        if v.shape != expected:
            raise ValueError(
                f"{name} has shape {_shape(v)} but the input has {channels} channels (input shape {_shape(x)}): "
                f"expected {name} of shape ({channels},)"
            )
        if v.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but the input is on {device}: move them to the same device")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(
            "training=False normalizes with the running statistics, but running_mean and running_var are None"
        )
    if training and running_mean is not None and not tracing and not isinstance(momentum, torch.Tensor):
        momentum = check_momentum(momentum)
    if not x.is_contiguous() and any(size > 1 and stride == 0 for size, stride in zip(shape, x.stride(), strict=True)):
        raise ValueError(
            "the input has overlapping memory (an expanded tensor) and cannot be written in place: pass x.contiguous()"
        )
    if training:
        # An empty batch (no values at all) is fine, as for torch's batch_norm: nothing to normalize, and the
        # running statistics stay as they are. One value per channel has no variance.
        values = x.numel() // channels if channels else 0
        if values < min_values_per_channel and values != 0:
            raise ValueError(
                f"inplace_abn is trying to compute batch statistics, but the input of shape {_shape(x)} has "
                f"{values} value(s) per channel: training needs more than one"
            )
    records_grad = torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    )
    if not tracing:
        _check_writable(x, records_grad, (running_mean, running_var) if training else (None, None))
    return momentum, eps, activation_param, records_grad


def _kernel_layout(t: torch.Tensor) -> bool:
    """Layouts the kernels walk directly: contiguous (NCHW) or channels innermost (NHWC)."""
    return t.is_contiguous() or t.movedim(1, -1).is_contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(size <= 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True))


def _update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int | torch.Tensor,
    momentum: float | torch.Tensor,
) -> None:
    """EMA of the batch mean and of the unbiased batch variance (global count): r <- r + momentum * (b - r).

    `count` is a tensor for synchronized statistics under torch.compile, `momentum` a tensor for
    momentum=None (1 / batches seen) under torch.compile: no value leaves the graph.
    """
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.to(running_mean.dtype)
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float | torch.Tensor,
    eps: float,
    activation: str,
    activation_param: float,
    reduction: Reduction,
    keep_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor, torch.Tensor | None]:
    """Normalizes x in place. Returns (what backward keeps, variance used, count, preact)."""
    work = x if _kernel_layout(x) else x.contiguous()
    count = x.numel() // x.size(1)
    native = native_activation(activation, activation_param)
    preact = torch.empty_like(work) if native == "relu" and keep_preact else None
    if training and isinstance(reduction, LocalReduction) and not torch.compiler.is_compiling():
        # The lean path: statistics, running statistics and normalization in one operator call.
        var = ops.train_forward_(
            work, weight, bias, running_mean, running_var, momentum, eps, native, activation_param, preact
        )
    elif training:
        mean, var = ops.statistics(work)
        mean, var, count = reduction.statistics(mean, var, count)
        # An empty batch leaves the running statistics alone (torch's batch_norm does the same).
        if running_mean is not None and running_var is not None and not (isinstance(count, int) and count == 0):
            _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        ops.normalize_act_(work, mean, var, weight, bias, eps, native, activation_param, preact)
    else:
        assert running_mean is not None and running_var is not None
        var = running_var
        ops.normalize_act_(work, running_mean, var, weight, bias, eps, native, activation_param, preact)
    if work is not x:
        x.copy_(work)
    return (preact if preact is not None else x), var, count, preact


def _forward_for_backward(ctx: Any, x: torch.Tensor, *args: Any) -> None:
    """Normalizes x in place (`args`: those of _forward after x) and records in ctx what backward needs."""
    kept, var, count, _ = _forward(x, *args, keep_preact=True)
    weight, bias, _, _, training, _, eps, activation, activation_param, reduction = args
    ctx.training = training
    ctx.eps = eps
    ctx.activation = native_activation(activation, activation_param)
    ctx.activation_param = activation_param
    # The local count follows from the kept tensor's shape in backward (a count recorded here would be
    # a constant to torch.compile, which would then recompile for every batch size).
    ctx.count = None if isinstance(reduction, LocalReduction) else count
    ctx.reduction = reduction
    ctx.save_for_backward(kept, var, weight, bias)


class _InPlaceABN(torch.autograd.Function):
    """Overwrites x with the output (mark_dirty) and keeps only the output for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        _forward_for_backward(ctx, x, *args)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, var, weight, bias = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not _kernel_layout(kept):
            kept = kept.contiguous()
        compiling = torch.compiler.is_compiling()
        if compiling:
            # A stride-by-stride comparison trips Dynamo with dynamic shapes; the kernels need dy laid out
            # like kept, which these calls give (without a copy where it already is).
            dy = dy.contiguous() if kept.is_contiguous() else dy.movedim(1, -1).contiguous().movedim(-1, 1)
        elif dy.stride() != kept.stride() and not _same_strides(dy, kept):
            dy = torch.empty_like(kept).copy_(dy)
        param = ctx.activation_param if ctx.activation != "relu" else 0.0
        if ctx.training and ctx.count is None and need_x and not compiling:
            # The lean path (unsynchronized training): both reductions and dx in one operator call.
            dx, dweight, dbias = ops.train_backward(kept, dy, var, weight, bias, ctx.eps, ctx.activation, param)
            return (
                dx,
                dweight if need_weight and weight is not None else None,
                dbias if need_bias and bias is not None else None,
            ) + (None,) * 8
        sum_dz = sum_dz_xhat = None
        if need_weight or need_bias or (need_x and ctx.training):
            sum_dz, sum_dz_xhat = ops.backward_reduce(kept, dy, weight, bias, ctx.eps, ctx.activation, param)
        dx = None
        if need_x:
            count = ctx.count if ctx.count is not None else kept.numel() // kept.size(1)
            if not compiling and isinstance(count, int) and count == 0:
                count = 1  # an empty batch: no values, zero sums
            if ctx.training:
                assert sum_dz is not None and sum_dz_xhat is not None
                global_dz, global_dz_xhat = ctx.reduction.sums(sum_dz, sum_dz_xhat)
                if isinstance(count, torch.Tensor) or compiling:
                    # The operator's count is a plain int, which torch.compile would specialize on (a
                    # recompilation per batch size); a symbolic count (or the synchronized count tensor)
                    # divides the sums in the graph instead.
                    global_dz, global_dz_xhat = global_dz / count, global_dz_xhat / count
                    count = 1
            else:
                global_dz = global_dz_xhat = None
                if compiling:
                    count = 1  # unused without sums
            dx = ops.backward_input(
                kept, dy, var, weight, bias, global_dz, global_dz_xhat, count, ctx.eps, ctx.activation, param
            )
        dweight = dbias = None
        if need_weight and weight is not None and sum_dz_xhat is not None:
            # d|w|/dw = sign(w); the original library uses +1 at w = 0.
            dweight = torch.where(weight < 0, -sum_dz_xhat, sum_dz_xhat).to(weight.dtype)
        if need_bias and bias is not None and sum_dz is not None:
            dbias = sum_dz.to(bias.dtype)
        return (dx, dweight, dbias) + (None,) * 8


class _TracedABN(_InPlaceABN):
    """The same under torch.compile, on a copy of x and without mark_dirty.

    AOTAutograd (torch 2.13, 2.14) gets the input gradient of an autograd.Function that marks a graph
    input dirty wrong: a compiled region that starts at the layer (a graph break or a DistributedDataParallel
    bucket boundary before it, or a compiled InPlaceABN alone) would silently get wrong gradients.
    Out of place there is no such input. Inductor removes the copy where x is not used afterwards
    (normalizing in place), and the layer still keeps only its output for backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        y = x.clone()
        _forward_for_backward(ctx, y, *args)
        return y


def _exporting() -> bool:
    """Whether the call is being recorded for export (torch.export, torch.onnx.export, torch.jit.trace)."""
    # torch.onnx.export uses torch.export (dynamo=True, the default) or torch.jit.trace (dynamo=False).
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    activation: str,
    activation_param: float,
) -> torch.Tensor:
    """Eval-mode In-Place ABN in standard operators, not in place: batch_norm with weight |w| + eps, then the
    activation. Exported programs (torch.export, ONNX: BatchNormalization + LeakyRelu / Elu / Relu) use it."""
    scale = None if weight is None else weight.abs() + eps
    y = functional.batch_norm(x, running_mean, running_var, scale, bias, False, 0.0, eps)
    if activation == "leaky_relu":
        return functional.leaky_relu(y, activation_param)
    if activation == "elu":
        return functional.elu(y, activation_param)
    if activation == "relu":
        return functional.relu(y)
    return y


def _apply(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    reduction: Reduction,
    records_grad: bool,
    tracing: bool,
) -> torch.Tensor:
    """Runs the checked call: through autograd when `records_grad`, else directly (`tracing`: under torch.compile)."""
    if native_activation(activation, activation_param) == "relu":
        what = "activation='relu'" if activation == "relu" else f"activation={activation!r} with activation_param=0"
        _warn_once(
            "relu",
            f"inplace_abn with {what} is ReLU, which is not invertible: the layer keeps its pre-activation for "
            "backward and saves no memory. Use leaky_relu with a small positive slope (e.g. 0.01) for the saving.",
        )
    args = (weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, reduction)
    if records_grad:
        return (_TracedABN if tracing else _InPlaceABN).apply(x, *args)
    with torch.no_grad():
        _forward(x, *args, keep_preact=False)
    # The kernels write through the dispatcher without autograd's bookkeeping: bump the version so a
    # tensor that autograd saved earlier is known to be overwritten.
    torch.autograd.graph.increment_version(x)
    return x


def _checked_call(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: Any,
    eps: Any,
    activation: Any,
    activation_param: Any,
    group: Any,
    sync: bool,
) -> torch.Tensor:
    """The body of inplace_abn (`sync` False) and inplace_abn_sync (`sync` True, statistics synchronized over
    `group` when torch.distributed is initialized): every check first, then the export form or the call."""
    synchronized = sync and training and distributed.is_available() and distributed.is_initialized()
    tracing = torch.compiler.is_compiling()
    momentum, eps, activation_param, records_grad = _check_arguments(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        activation,
        activation_param,
        min_values_per_channel=0 if synchronized else 2,
        tracing=tracing,
    )
    if not training and _exporting():
        assert running_mean is not None and running_var is not None
        return batch_norm_act(x, weight, bias, running_mean, running_var, eps, activation, activation_param)
    reduction: Reduction = _LOCAL
    if synchronized:
        reduction = reduction_for_group(group)
    elif sync and training:
        _warn_once(
            "sync",
            "inplace_abn_sync is called but torch.distributed is not initialized: running unsynchronized "
            "(like inplace_abn)",
        )
    return _apply(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        activation,
        activation_param,
        reduction,
        records_grad,
        tracing,
    )


def inplace_abn(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """In-Place Activated Batch Normalization: x <- act((|weight| + eps) * (x - mu) / sqrt(var + eps) + bias).

    Args:
        x: input of shape (N, C, *), overwritten with the result (which is also returned).
        weight: affine scale of shape (C,), or None; the effective scale is |weight| + eps.
        bias: affine shift of shape (C,), or None.
        running_mean: running mean of shape (C,), or None.
        running_var: running (unbiased) variance of shape (C,), or None.
        training: if True, normalize with the batch statistics (and update the running ones when
            given); otherwise with running_mean / running_var.
        momentum: weight of the current batch in the running statistics update.
        eps: added to the variance, and to |weight|.
        activation: "leaky_relu", "elu", "identity" or "relu".
        activation_param: negative slope of leaky_relu, or alpha of elu (>= 0). With 0 (and for
            "relu") gradients stay exact but the layer keeps its pre-activation: no memory saving.

    Returns:
        x, holding the result.
    """
    return _checked_call(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, None, False
    )


def inplace_abn_sync(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    group: Any = None,
) -> torch.Tensor:
    """In-Place ABN with batch statistics synchronized across the processes of `group`.

    Every process of the group must call it (inputs may differ in batch size). Arguments are those
    of `inplace_abn`, plus `group`: the torch.distributed process group, None for the default one.
    Without an initialized process group it runs unsynchronized, with a warning.
    """
    return _checked_call(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, group, True
    )
