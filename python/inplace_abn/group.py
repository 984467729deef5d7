"""Process-group helpers of the original package, for InPlaceABNSync."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as distributed
import torch.nn as nn

__all__ = ["active_group", "set_active_group"]

_group_cache: dict[frozenset[int], Any] = {}


def active_group(active: bool) -> Any:
    """A process group of the ranks that pass active=True (None if none does).

    Every rank of the default group must call it. Groups are created once per set of ranks and cached.
    """
    world_size = distributed.get_world_size()
    rank = distributed.get_rank()
    if not _group_cache:
        _group_cache[frozenset(range(world_size))] = distributed.group.WORLD
        _group_cache[frozenset()] = None
    device = torch.device("cuda", torch.cuda.current_device()) if distributed.get_backend() == "nccl" else "cpu"
    mine = torch.tensor(rank if active else -1, dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    distributed.all_gather(everyone, mine)
    ranks = frozenset(int(r) for r in everyone if int(r) != -1)
    if ranks not in _group_cache:
        _group_cache[ranks] = distributed.new_group(sorted(ranks))
    return _group_cache[ranks]


def set_active_group(module: nn.Module, group: Any) -> None:
    """Passes `group` to every submodule that has a set_group method (e.g. InPlaceABNSync)."""

    def _set_group(m: nn.Module) -> None:
        if hasattr(m, "set_group"):
            m.set_group(group)

    module.apply(_set_group)
