"""What autograd keeps for backward, and the conv stack the memory tests measure it on."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from inplace_abn import InPlaceABN


def saved_storages(fn: Callable[[], object]) -> dict[int, int]:
    """Runs fn() and returns {storage address: bytes} of every tensor autograd saved meanwhile."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def conv_stack(blocks: int, channels: int, in_place_abn: bool) -> nn.Sequential:
    """`blocks` times (3x3 convolution, then InPlaceABN or BatchNorm2d + LeakyReLU(0.01))."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if in_place_abn:
            layers.append(InPlaceABN(channels))
        else:
            layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*layers)
