"""Modules: ABN (BatchNorm + activation), InPlaceABN and InPlaceABNSync.

Drop-in compatible with mapillary's inplace_abn 1.1.0: same constructor arguments, attributes,
parameters, buffers and state_dict keys (checkpoints without num_batches_tracked load too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as functional

from .functions import check_activation, check_eps, check_momentum, inplace_abn, inplace_abn_sync

__all__ = ["ABN", "InPlaceABN", "InPlaceABNSync"]


class ABN(nn.Module):
    """Activated Batch Normalization: BatchNorm followed by an activation, not in place.

    Args:
        num_features: number of channels C of the (N, C, *) input.
        eps: added to the variance for numerical stability.
        momentum: weight of the current batch in the running statistics, or None for a cumulative
            moving average.
        affine: learn a per-channel scale (weight) and shift (bias).
        track_running_stats: keep running statistics for eval mode; without them, batch
            statistics are used in eval mode too.
        activation: "leaky_relu", "elu", "identity" or "relu".
        activation_param: negative slope of leaky_relu, or alpha of elu.
    """

    _version = 2
    __constants__: tuple[str, ...] = (
        "track_running_stats",
        "momentum",
        "eps",
        "num_features",
        "affine",
        "activation",
        "activation_param",
    )
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    activation: str
    activation_param: float

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        activation_param = check_activation(activation, activation_param)
        self.num_features = num_features
        self.eps = check_eps(eps)
        self.momentum = None if momentum is None else check_momentum(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = activation_param
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Resets running_mean to 0, running_var to 1 and num_batches_tracked to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Resets the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _counts_batch(self) -> bool:
        """Whether this forward counts a batch in num_batches_tracked (training with running statistics)."""
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _momentum_and_training(self, tensor_momentum: bool = False) -> tuple[Any, bool]:
        """Momentum of this step (1 / batches seen, this one included, for momentum=None) and whether to use
        batch statistics. num_batches_tracked is advanced by _count_batch, once the forward succeeded.

        With tensor_momentum, under torch.compile, momentum=None gives a tensor: a Python number read
        from num_batches_tracked would be an .item() in the graph (a device synchronization every step).
        """
        momentum: Any = 0.0 if self.momentum is None else self.momentum
        if self.momentum is None and self._counts_batch():
            if tensor_momentum and torch.compiler.is_compiling():
                momentum = 1.0 / (self.num_batches_tracked.double() + 1)
            else:
                momentum = 1.0 / (float(self.num_batches_tracked) + 1)
        training = self.training or (self.running_mean is None and self.running_var is None)
        return momentum, training

    def _count_batch(self) -> None:
        """Advances num_batches_tracked after a successful training forward (a failed one leaves it alone)."""
        if self.training and self.track_running_stats:
            batches = self.num_batches_tracked
            if batches is not None:
                batches.add_(1)

    def _running_stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.training and not self.track_running_stats:
            return None, None
        return self.running_mean, self.running_var

    def _functional_arguments(self, x: torch.Tensor) -> tuple[Any, ...]:
        """Checks x; the arguments of inplace_abn / inplace_abn_sync, in order.

        The same as _momentum_and_training(tensor_momentum=True) and _running_stats, with each module
        attribute read once (a parameter or buffer lookup goes through nn.Module.__getattr__).
        """
        self._check_input(x)
        module_training, track = self.training, self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        momentum: Any = self.momentum
        if momentum is None:
            momentum = 0.0
            batches = self.num_batches_tracked if module_training and track else None
            if batches is not None:  # 1 / batches seen, this one included (see _momentum_and_training)
                if torch.compiler.is_compiling():
                    momentum = 1.0 / (batches.double() + 1)
                else:
                    momentum = 1.0 / (float(batches) + 1)
        training = module_training or (running_mean is None and running_var is None)
        if module_training and not track:
            running_mean = running_var = None
        return (
            x,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            training,
            momentum,
            self.eps,
            self.activation,
            self.activation_param,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != self.num_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects an input of shape (N, {self.num_features}, *), "
                f"got {shape}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        momentum, training = self._momentum_and_training()
        running_mean, running_var = self._running_stats()
        x = functional.batch_norm(x, running_mean, running_var, self.weight, self.bias, training, momentum, self.eps)
        self._count_batch()
        if self.activation == "relu":
            return functional.relu(x, inplace=True)
        if self.activation == "leaky_relu":
            return functional.leaky_relu(x, negative_slope=self.activation_param, inplace=True)
        if self.activation == "elu":
            return functional.elu(x, alpha=self.activation_param, inplace=True)
        return x

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # Version 2 added num_batches_tracked; older checkpoints start it at 0.
            state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        rep = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"activation={self.activation}"
        )
        if self.activation in ("leaky_relu", "elu"):
            rep += f"[{self.activation_param}]"
        return rep


class InPlaceABN(ABN):
    """In-Place Activated Batch Normalization.

    Computes the same function as ABN, with the effective scale |weight| + eps, overwriting its
    input and keeping only its output for backward (about half the activation memory of BatchNorm
    + activation). Arguments are those of ABN; for activation "relu" (or activation_param=0) the
    gradients stay exact but no memory is saved.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = inplace_abn(*self._functional_arguments(x))
        self._count_batch()
        return y


class InPlaceABNSync(ABN):
    """InPlaceABN with batch statistics synchronized across the processes of a torch.distributed group.

    Arguments are those of ABN, plus `group`: the process group to synchronize with (None: the
    default group). Without an initialized process group it runs unsynchronized, with a warning.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param)
        self.group = group

    @classmethod
    def convert_sync_inplace_abn(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replaces every InPlaceABN in `module` by InPlaceABNSync (see inplace_abn.convert_sync_inplace_abn)."""
        from .convert import convert_sync_inplace_abn

        return convert_sync_inplace_abn(module, process_group)

    def set_group(self, group: Any) -> None:
        """Sets the process group to synchronize with (None: the default group); not between forward and backward."""
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = inplace_abn_sync(*self._functional_arguments(x), self.group)
        self._count_batch()
        return y
