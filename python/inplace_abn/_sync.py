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
    def statistics(
        self, mean: torch.Tensor, var: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
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

    def statistics(
        self, mean: torch.Tensor, var: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """Merges (count, mean, biased variance) of every rank: one all_gather of 2C + 1 float64 values.

        Pooled over ranks r with shares p_r = n_r / n: mean = sum p_r mean_r and
        var = sum p_r (var_r + (mean_r - mean)^2), Chan's parallel formula in closed form (exact for
        uneven batch sizes; a rank without samples has p_r = 0 and its undefined mean / var are masked).
        The count is a Python int, except under torch.compile, where it stays a tensor in the graph.
        """
        channels = mean.numel()
        local = torch.cat([mean.new_full((1,), float(count), dtype=torch.float64), mean.double(), var.double()])
        gathered = [torch.empty_like(local) for _ in range(distributed.get_world_size(self.group))]
        distributed.all_gather(gathered, local, group=self.group)
        stacked = torch.stack(gathered)
        counts = stacked[:, :1]
        present = counts > 0
        means = torch.where(present, stacked[:, 1 : 1 + channels], 0.0)
        variances = torch.where(present, stacked[:, 1 + channels :], 0.0)
        total = counts.sum()
        share = counts / total
        global_mean = (share * means).sum(0)
        global_var = (share * (variances + (means - global_mean) ** 2)).sum(0)
        global_count: int | torch.Tensor = total
        if not torch.compiler.is_compiling():
            global_count = int(total.item())
            if global_count <= 1:
                raise ValueError(
                    f"inplace_abn_sync is trying to compute batch statistics, but the process group holds "
                    f"{global_count} value(s) per channel: training needs more than one"
                )
        return global_mean.to(mean.dtype), global_var.to(var.dtype), global_count

    def sums(self, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum(dz) and sum(dz * xhat) over the group: one all_reduce of 2C values."""
        stacked = torch.cat([sum_dz, sum_dz_xhat])
        distributed.all_reduce(stacked, distributed.ReduceOp.SUM, group=self.group)
        return stacked[: sum_dz.numel()], stacked[sum_dz.numel() :]


def reduction_for_group(group: Any) -> GroupReduction:
    """The reduction over `group` (None: the default group)."""
    if group is distributed.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"inplace_abn_sync: process {distributed.get_rank()} is not a member of the process group it was given; "
            "only the members of a group may run layers synchronized over it (see active_group / set_active_group)"
        )
    return GroupReduction(distributed.group.WORLD if group is None else group)
