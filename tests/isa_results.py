"""Runs every CPU operator on the inputs saved in a file and saves the results: tests/test_cpu_kernels.py
runs it once per instruction set (INPLACE_ABN_CPU_ISA) and compares the files.

    python tests/isa_results.py INPUTS OUTPUT
"""

from __future__ import annotations

import sys

import torch

import inplace_abn  # noqa: F401  (loads the operators)


def run_case(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, b: torch.Tensor, activation: str, param: float):
    """Every operator on one input: the fused training step, the split operators and eval's input gradient."""
    ops = torch.ops.inplace_abn
    channels = x.shape[1]
    count = x.numel() // channels
    relu = activation == "relu"
    out: dict[str, torch.Tensor] = {}
    running_mean, running_var = torch.zeros(channels, dtype=x.dtype), torch.ones(channels, dtype=x.dtype)
    y = x.clone(memory_format=torch.preserve_format)
    preact = torch.empty_like(x) if relu else None
    var = ops.train_forward_(y, w, b, running_mean, running_var, 0.1, 1e-5, activation, param, preact)
    kept = preact if relu else y
    dx, dweight, dbias = ops.train_backward(kept, dy, var, w, b, 1e-5, activation, param)
    out.update(y=y, var=var, running_mean=running_mean, running_var=running_var, dx=dx, dweight=dweight, dbias=dbias)
    mean, var = ops.statistics(x)
    split = x.clone(memory_format=torch.preserve_format)
    split_preact = torch.empty_like(x) if relu else None
    ops.normalize_act_(split, mean, var, w, b, 1e-5, activation, param, split_preact)
    split_kept = split_preact if relu else split
    s1, s2 = ops.backward_reduce(split_kept, dy, w, b, 1e-5, activation, param)
    out.update(mean=mean, split_y=split, s1=s1, s2=s2)
    out["split_dx"] = ops.backward_input(split_kept, dy, var, w, b, s1, s2, count, 1e-5, activation, param)
    out["eval_dx"] = ops.backward_input(split_kept, dy, var, w, b, None, None, count, 1e-5, activation, param)
    return out


def main() -> None:
    cases = torch.load(sys.argv[1])
    results = {name: run_case(**case) for name, case in cases.items()}
    torch.save({"isa": torch.ops.inplace_abn.cpu_isa(), "results": results}, sys.argv[2])


if __name__ == "__main__":
    main()
