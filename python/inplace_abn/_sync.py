"""How batch statistics and backward sums are combined across processes.

LocalReduction keeps them per process; GroupReduction merges them over a torch.distributed process
group: counts, means and variances with Chan's formula (uneven batch sizes, and ranks with no
samples, are exact), and sum(dz), sum(dz * xhat) by all-reduce.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as distributed


class Reduction(Protocol):
    def statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Combines per-channel (mean, biased variance, count) into the batch statistics."""
        ...

    def sums(self, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combines per-channel backward sums."""
        ...


class LocalReduction:
    """Statistics of this process only."""

    def statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return mean, var, count

    def sums(self, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sum_dz, sum_dz_xhat


class GroupReduction:
    """Statistics of all processes of a torch.distributed group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        channels = mean.numel()
        local = torch.cat([mean.new_full((1,), float(count), dtype=torch.float64), mean.double(), var.double()])
        gathered = [torch.empty_like(local) for _ in range(distributed.get_world_size(self.group))]
        distributed.all_gather(gathered, local, group=self.group)
        stacked = torch.stack(gathered)
        counts = stacked[:, :1]
        present = counts > 0  # a rank without samples contributes nothing (its mean / var are undefined)
        means = torch.where(present, stacked[:, 1 : 1 + channels], 0.0)
        variances = torch.where(present, stacked[:, 1 + channels :], 0.0)
        total = int(counts.sum().item())
        if total <= 1:
            raise ValueError(
                f"inplace_abn_sync is trying to compute batch statistics, but the process group holds {total} "
                "value(s) per channel: training needs more than one"
            )
        share = counts / total
        global_mean = (share * means).sum(0)
        global_var = (share * (variances + (means - global_mean) ** 2)).sum(0)
        return global_mean.to(mean.dtype), global_var.to(var.dtype), total

    def sums(self, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.cat([sum_dz, sum_dz_xhat])
        distributed.all_reduce(stacked, distributed.ReduceOp.SUM, group=self.group)
        return stacked[: sum_dz.numel()], stacked[sum_dz.numel() :]


def reduction_for_group(group: Any) -> GroupReduction:
    """The reduction over `group` (None: the default group)."""
    return GroupReduction(distributed.group.WORLD if group is None else group)
