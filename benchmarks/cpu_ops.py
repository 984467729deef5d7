"""CPU time of each native operator (statistics, normalize_act_, backward_reduce, backward_input, and
the fused train_backward where the build has it) on one thread: min over repeats of the calling
thread's CPU time, steadier than wall time on a loaded machine. Used to compare two builds in
alternating processes (the same operator names cannot be loaded twice into one process):

    python benchmarks/cpu_ops.py PACKAGE_DIR|- SHAPE contiguous|cl DTYPE ACTIVATION

PACKAGE_DIR is put first on sys.path (a copied install of another build); "-" uses the installed one.
backward_input and train_backward allocate their output, so their time includes page faults and varies
with the allocator.
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> None:
    if sys.argv[1] != "-":
        sys.path.insert(0, sys.argv[1])
    import inplace_abn  # noqa: F401  (loads the operators)

    torch.set_num_threads(1)
    ops = torch.ops.inplace_abn
    shape = tuple(int(s) for s in sys.argv[2].split(","))
    fmt = torch.channels_last if sys.argv[3] == "cl" else torch.contiguous_format
    dtype = getattr(torch, sys.argv[4])
    act = sys.argv[5]
    p = 0.01 if act == "leaky_relu" else 1.0
    channels = shape[1]
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    w, b = torch.ones(channels), torch.zeros(channels)
    fused = hasattr(ops, "train_backward")
    times: dict[str, list[float]] = {k: [] for k in ("statistics", "normalize", "reduce", "input", "train_backward")}
    for i in range(80):
        t0 = time.thread_time()
        m, v = ops.statistics(x)
        t1 = time.thread_time()
        ops.normalize_act_(x, m, v, w, b, 1e-5, act, p, None)
        t2 = time.thread_time()
        s1, s2 = ops.backward_reduce(x, dy, w, b, 1e-5, act, p)
        t3 = time.thread_time()
        ops.backward_input(x, dy, v, w, b, s1, s2, x.numel() // channels, 1e-5, act, p)
        t4 = time.thread_time()
        if fused:
            ops.train_backward(x, dy, v, w, b, 1e-5, act, p)
        t5 = time.thread_time()
        if i >= 3:
            steps = {"statistics": (t0, t1), "normalize": (t1, t2), "reduce": (t2, t3), "input": (t3, t4)}
            if fused:
                steps["train_backward"] = (t4, t5)
            for k, (start, end) in steps.items():
                times[k].append(end - start)
    print(
        f"{sys.argv[1]} {shape} {sys.argv[3]} {sys.argv[4]} {act} (ms, min of 77): "
        + " ".join(f"{k} {min(v) * 1e3:.2f}" for k, v in times.items() if v)
    )


if __name__ == "__main__":
    main()
