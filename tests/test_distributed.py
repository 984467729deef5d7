"""InPlaceABNSync over torch.distributed: 2 and 3 processes with gloo on the CPU, uneven batch sizes per
rank (one rank with no samples), against single-process InPlaceABN on the concatenated batch and the
float64 oracle.

The relations asserted (rank r holds rows B_r of the global batch X, W ranks, L = sum_r L_r with
L_r = sum(y_r * dY_r)):
- outputs, running statistics: y_r = Y[B_r], running stats equal the single-process ones on X;
- input gradients: the backward all-reduces sum(dz) and sum(dz * xhat), so x_r.grad = dL/dX[B_r];
- weight and bias gradients: each rank's local gradient is its share of the sums, so
  sum_r w_r.grad = dL/dw; DistributedDataParallel averages, so after it every rank holds dL/dw / W,
  which is the single-process gradient of L / W (and the input gradient of L / W is x_r.grad / W).

One spawn per world size runs every scenario (start-up dominates); a process group timeout and a
deadline on the whole spawn keep a hang from stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from inplace_abn import InPlaceABN, InPlaceABNSync, active_group, inplace_abn_sync, set_active_group

from oracle import assert_close as _assert_close
from oracle import reference

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

SPAWN_DEADLINE_S = 240  # the whole spawn, start-up included
COLLECTIVE_TIMEOUT_S = 60  # one collective
# Per scenario step, per rank: uneven sizes, a rank without samples and a rank with one sample.
BATCHES = {
    2: [[3, 5], [0, 4], [1, 2]],
    3: [[3, 0, 2], [2, 4, 1], [1, 3, 0]],
}
# (activation, activation_param, dtype, trailing shape, channels_last)
LAYER_CASES = [
    ("leaky_relu", 0.1, torch.float64, (5, 7), False),
    ("elu", 0.8, torch.float64, (4, 6), True),
    ("relu", 0.0, torch.float64, (3, 3), False),
    ("identity", 0.0, torch.float32, (6,), False),
    ("leaky_relu", 0.01, torch.float64, (), False),
]
CHANNELS = 4
DDP_STEPS = 3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0):
    """oracle.assert_close, which also accepts the empty tensors of a rank without samples."""
    if expected.numel() == 0:
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        return
    _assert_close(actual, expected, dtype, what, factor)


# ----------------------------------------------------------------------------------------------------
# Data and models, built identically in the test process and in every rank.


def global_batch(seed: int, sizes: list[int], tail: tuple[int, ...], channels: int, dtype: torch.dtype):
    """(X, dY) of the whole (concatenated) batch; rank r holds rows offsets[r]:offsets[r + 1]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), channels, *tail)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def rows(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def init_layer(layer: nn.Module, seed: int) -> nn.Module:
    """Weights of both signs, nonzero bias and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        channels = layer.num_features
        sign = torch.where(torch.rand(channels, generator=generator) < 0.3, -1.0, 1.0)
        layer.weight.copy_(sign * (torch.rand(channels, generator=generator) + 0.5))
        layer.bias.copy_(torch.randn(channels, generator=generator) * 0.3)
        layer.running_mean.copy_(torch.randn(channels, generator=generator))
        layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return layer


def make_layer(cls, case_index: int) -> nn.Module:
    activation, param, dtype, _, _ = LAYER_CASES[case_index]
    layer = cls(CHANNELS, momentum=0.3, activation=activation, activation_param=param)
    return init_layer(layer, 100 + case_index).to(dtype)


def layer_input(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf requiring grad, non-leaf input holding x in the requested layout)."""
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    leaf = x.clone().requires_grad_()
    return leaf, leaf.clone()


def make_model(sync: bool) -> nn.Sequential:
    norm = InPlaceABNSync if sync else InPlaceABN
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        norm(6, momentum=0.2),
        nn.Conv2d(6, 5, 3, padding=1),
        norm(5, activation="elu", activation_param=1.0, momentum=None),
    )
    init_layer(model[1], 1)
    init_layer(model[3], 3)
    return model.double()


def ddp_batch(step: int, sizes: list[int]):
    x, _ = global_batch(1000 + step, sizes, (5, 5), 3, torch.float64)
    _, dy = global_batch(2000 + step, sizes, (5, 5), 5, torch.float64)
    return x, dy


def group_sizes(world_size: int) -> tuple[list[int], list[int]]:
    """Batch sizes and the active ranks (all but rank 1) of the process-group scenarios."""
    sizes = [3, 2, 4][:world_size]
    return sizes, [r for r in range(world_size) if r != 1]


# ----------------------------------------------------------------------------------------------------
# What each rank runs.


def _layer_scenario(rank: int, world_size: int) -> list[dict]:
    results = []
    for index, (_, _, dtype, tail, channels_last) in enumerate(LAYER_CASES):
        sizes = BATCHES[world_size][index % len(BATCHES[world_size])]
        x, dy = global_batch(index, sizes, tail, CHANNELS, dtype)
        layer = make_layer(InPlaceABNSync, index)
        leaf, inputs = layer_input(x[rows(sizes, rank)], channels_last)
        y = layer(inputs)
        y.backward(dy[rows(sizes, rank)])
        results.append(
            dict(
                y=y.detach(),
                dx=leaf.grad,
                dweight=layer.weight.grad,
                dbias=layer.bias.grad,
                running_mean=layer.running_mean.clone(),
                running_var=layer.running_var.clone(),
            )
        )
    return results


def _ddp_scenario(rank: int, world_size: int) -> list[dict]:
    model = nn.parallel.DistributedDataParallel(make_model(sync=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = []
    for step in range(DDP_STEPS):
        sizes = BATCHES[world_size][step]
        x, dy = ddp_batch(step, sizes)
        leaf = x[rows(sizes, rank)].clone().requires_grad_()
        y = model(leaf)
        (y * dy[rows(sizes, rank)]).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        steps.append(dict(y=y.detach(), dx=leaf.grad, grads=grads))
    return [*steps, dict(state=model.module.state_dict())]


COMPILED_BATCHES = [[3, 5], [2, 4], [4, 2]]  # no empty batch: Dynamo specializes sizes 0 and 1


def _compiled_ddp_scenario(rank: int, world_size: int) -> dict:
    """torch.compile(DistributedDataParallel(model)) with InPlaceABNSync: the collectives are traced too."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    model = make_model(sync=True)
    compiled = torch.compile(nn.parallel.DistributedDataParallel(model), backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outputs = []
    for step, sizes in enumerate(COMPILED_BATCHES):
        x, dy = ddp_batch(step, sizes)
        y = compiled(x[rows(sizes, rank)])
        (y * dy[rows(sizes, rank)]).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(y.detach())
    # The graphs and their subgraphs (the autograd.Function's forward and backward are nested graphs).
    nodes = [
        node
        for gm in graphs
        for sub in gm.modules()
        if isinstance(sub, torch.fx.GraphModule)
        for node in sub.graph.nodes
    ]
    # .item() of a computed tensor (the global count would be one); not of a graph input (DDP's graph
    # splitting passes dynamic float attributes as tensors).
    reads = [
        node.format_node()
        for node in nodes
        if node.op != "placeholder"
        and (node.target == "item" or "local_scalar_dense" in str(node.target))
        and not (isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder")
    ]
    collectives = sum("all_gather" in str(node.target) for node in nodes)
    # Without DDP (whose own code breaks the graph), the whole model compiles with fullgraph=True: no graph
    # break and no value read back into Python on the synchronized path, also with a dynamic batch size.
    bare = torch.compile(make_model(sync=True), backend="aot_eager", fullgraph=True)
    bare_outputs = []
    for step, sizes in enumerate(COMPILED_BATCHES[:2]):
        x, dy = ddp_batch(step, sizes)
        y = bare(x[rows(sizes, rank)])
        (y * dy[rows(sizes, rank)]).sum().backward()
        bare_outputs.append(y.detach())
    return dict(
        outputs=outputs,
        state=model.state_dict(),
        scalar_reads=reads,
        traced_all_gathers=collectives,
        fullgraph_outputs=bare_outputs,
    )


def _group_scenario(rank: int, world_size: int) -> dict:
    """The group argument, set_group, the functional group argument, active_group / set_active_group."""
    sizes, active = group_sizes(world_size)
    x, dy = global_batch(500, sizes, (3, 4), CHANNELS, torch.float64)
    mine, my_dy = x[rows(sizes, rank)], dy[rows(sizes, rank)]
    group = dist.new_group(active)  # every rank takes part in creating a group
    cached = active_group(rank in active)
    assert active_group(rank in active) is cached, "active_group creates a group once per set of ranks"
    assert active_group(True) is dist.group.WORLD
    result: dict = {}
    if rank not in active:
        layer = make_layer(InPlaceABNSync, 0).double()
        layer.set_group(group)
        try:
            layer(mine.clone())
        except ValueError as error:
            result["outsider_error"] = str(error)
        return result

    def run(layer_or_fn) -> dict:
        leaf, inputs = layer_input(mine, False)
        y = layer_or_fn(inputs)
        y.backward(my_dy)
        return dict(y=y.detach(), dx=leaf.grad)

    by_argument = make_layer(lambda c, **kw: InPlaceABNSync(c, group=group, **kw), 0).double()
    result["argument"] = run(by_argument) | dict(running_var=by_argument.running_var.clone())
    by_setter = make_layer(InPlaceABNSync, 0).double()
    by_setter.set_group(group)
    result["set_group"] = run(by_setter) | dict(running_var=by_setter.running_var.clone())
    functional = make_layer(InPlaceABNSync, 0).double()
    w, b, rm, rv = functional.weight, functional.bias, functional.running_mean, functional.running_var
    result["functional"] = run(lambda t: inplace_abn_sync(t, w, b, rm, rv, True, 0.3, 1e-5, "leaky_relu", 0.1, group))
    result["functional"]["running_var"] = rv.clone()
    model = nn.Sequential(make_layer(InPlaceABNSync, 0), nn.Identity()).double()
    set_active_group(model, cached)
    assert model[0].group is cached
    result["active_group"] = run(model) | dict(running_var=model[0].running_var.clone())
    return result


def _eval_scenario(rank: int, world_size: int) -> dict:
    """Eval mode uses the running statistics: no collective, so one rank alone may run it."""
    x, _ = global_batch(600, [2], (3, 3), CHANNELS, torch.float64)
    result = {}
    if rank == 0:
        layer = make_layer(InPlaceABNSync, 0).double().eval()
        with torch.no_grad():
            result["y"] = layer(x.clone())
    dist.barrier()
    return result


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = dict(
                layer=_layer_scenario(rank, world_size),
                ddp=_ddp_scenario(rank, world_size),
                group=_group_scenario(rank, world_size),
                eval=_eval_scenario(rank, world_size),
            )
            if world_size == 2:
                results["compiled"] = _compiled_ddp_scenario(rank, world_size)
        results["warnings"] = [str(w.message) for w in caught]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, out_dir: Path) -> list[dict]:
    """Runs _worker in world_size spawned processes; fails (never hangs) on error or past the deadline."""
    context = mp.start_processes(
        _worker, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                errors = "".join(p.read_text() for p in out_dir.glob("*.error"))
                pytest.fail(f"{world_size} processes did not finish within {SPAWN_DEADLINE_S} s\n{errors}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_ranks(world_size, tmp_path_factory.mktemp(f"ranks{world_size}"))


# ----------------------------------------------------------------------------------------------------
# The same computations in this process, and the assertions.


def single_process_layer(index: int, x: torch.Tensor, dy: torch.Tensor) -> dict:
    _, _, _, _, channels_last = LAYER_CASES[index]
    layer = make_layer(InPlaceABN, index)
    leaf, inputs = layer_input(x, channels_last)
    y = layer(inputs)
    y.backward(dy)
    return dict(
        y=y.detach(),
        dx=leaf.grad,
        dweight=layer.weight.grad,
        dbias=layer.bias.grad,
        running_mean=layer.running_mean,
        running_var=layer.running_var,
    )


@pytest.mark.parametrize("index", range(len(LAYER_CASES)), ids=[f"{c[0]}-{c[2]}-{len(c[3]) + 2}d" for c in LAYER_CASES])
def test_layer_matches_single_process_on_concatenated_batch(ranks, index):
    world_size, results = ranks
    activation, param, dtype, tail, _ = LAYER_CASES[index]
    sizes = BATCHES[world_size][index % len(BATCHES[world_size])]
    x, dy = global_batch(index, sizes, tail, CHANNELS, dtype)
    single = single_process_layer(index, x, dy)
    init = make_layer(InPlaceABN, index)
    oracle = reference(
        x, init.weight, init.bias, init.running_mean, init.running_var, True, 0.3, 1e-5, activation, param, dy
    )
    per_rank = [results[r]["layer"][index] for r in range(world_size)]
    for r, result in enumerate(per_rank):
        assert result["y"].shape[0] == sizes[r]
        for key, expected in (("y", single["y"]), ("dx", single["dx"])):
            assert_close(result[key], expected[rows(sizes, r)], dtype, f"rank {r} {key} vs single process", 4)
        assert_close(result["y"], oracle.y[rows(sizes, r)], dtype, f"rank {r} output vs oracle")
        assert_close(result["dx"], oracle.dx[rows(sizes, r)], dtype, f"rank {r} input gradient vs oracle", 4)
        for key in ("running_mean", "running_var"):
            assert_close(result[key], single[key], dtype, f"rank {r} {key} vs single process")
        assert_close(result["running_mean"], oracle.running_mean, dtype, f"rank {r} running_mean vs oracle")
        assert_close(result["running_var"], oracle.running_var, dtype, f"rank {r} running_var vs oracle")
    # Each rank's parameter gradients are its share of the sums: together, the whole batch's.
    for key, expected in (("dweight", oracle.dweight), ("dbias", oracle.dbias)):
        total = sum(result[key].double() for result in per_rank)
        assert_close(total, single[key], dtype, f"sum of {key} over ranks vs single process", 4)
        assert_close(total, expected, dtype, f"sum of {key} over ranks vs oracle", 4)


def test_ddp_training_matches_single_process(ranks):
    """A few SGD steps under DistributedDataParallel against one process on the whole batch, loss / W."""
    world_size, results = ranks
    model = make_model(sync=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(DDP_STEPS):
        sizes = BATCHES[world_size][step]
        x, dy = ddp_batch(step, sizes)
        leaf = x.clone().requires_grad_()
        y = model(leaf)
        ((y * dy).sum() / world_size).backward()
        for r in range(world_size):
            result = results[r]["ddp"][step]
            what = f"step {step} rank {r}"
            assert_close(result["y"], y.detach()[rows(sizes, r)], torch.float64, f"{what} output", 100)
            # Input gradients are not averaged: rank r holds dL/dX[B_r] = W * d(L / W)/dX[B_r].
            assert_close(result["dx"], world_size * leaf.grad[rows(sizes, r)], torch.float64, f"{what} dx", 100)
            for name, p in model.named_parameters():
                assert_close(result["grads"][name], p.grad, torch.float64, f"{what} gradient of {name}", 100)
        optimizer.step()
        optimizer.zero_grad()
    for r in range(world_size):
        final = results[r]["ddp"][-1]["state"]
        assert list(final) == list(model.state_dict())
        for name, expected in model.state_dict().items():
            if expected.is_floating_point():
                assert_close(final[name], expected, torch.float64, f"rank {r} final {name}", 100)
            else:
                assert torch.equal(final[name], expected), name
    assert int(model[1].num_batches_tracked) == DDP_STEPS


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
def test_compiled_ddp_training_matches_single_process(ranks):
    """torch.compile(DDP(model)) with InPlaceABNSync: traced collectives, no value read back into Python
    (the global count stays a tensor), and the same training as one process on the whole batch."""
    world_size, results = ranks
    if world_size != 2:
        pytest.skip("run with 2 ranks only (compilation is slow)")
    model = make_model(sync=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step, sizes in enumerate(COMPILED_BATCHES):
        x, dy = ddp_batch(step, sizes)
        y = model(x)
        ((y * dy).sum() / world_size).backward()
        optimizer.step()
        optimizer.zero_grad()
        for r in range(world_size):
            actual = results[r]["compiled"]["outputs"][step]
            assert_close(actual, y.detach()[rows(sizes, r)], torch.float64, f"step {step} rank {r} output", 100)
    for step, sizes in enumerate(COMPILED_BATCHES[:2]):
        x, _ = ddp_batch(step, sizes)
        y = make_model(sync=False)(x).detach()  # no optimizer step in between: the initial parameters
        for r in range(world_size):
            actual = results[r]["compiled"]["fullgraph_outputs"][step]
            assert_close(actual, y[rows(sizes, r)], torch.float64, f"fullgraph step {step} rank {r} output", 100)
    for r in range(world_size):
        compiled = results[r]["compiled"]
        assert compiled["scalar_reads"] == [] and compiled["traced_all_gathers"] >= 2
        for name, expected in model.state_dict().items():
            if expected.is_floating_point():
                assert_close(compiled["state"][name], expected, torch.float64, f"rank {r} final {name}", 100)


@pytest.mark.parametrize("how", ["argument", "set_group", "functional", "active_group"])
def test_subgroup_synchronizes_its_members_only(ranks, how):
    world_size, results = ranks
    sizes, active = group_sizes(world_size)
    x, dy = global_batch(500, sizes, (3, 4), CHANNELS, torch.float64)
    members = torch.cat([x[rows(sizes, r)] for r in active])
    members_dy = torch.cat([dy[rows(sizes, r)] for r in active])
    init = make_layer(InPlaceABN, 0).double()
    expected = reference(
        members, init.weight, init.bias, init.running_mean, init.running_var, True, 0.3, 1e-5, "leaky_relu", 0.1,
        members_dy,
    )  # fmt: skip
    offset = 0
    for r in active:
        result = results[r]["group"][how]
        part = slice(offset, offset + sizes[r])
        offset += sizes[r]
        assert_close(result["y"], expected.y[part], torch.float64, f"rank {r} output")
        assert_close(result["dx"], expected.dx[part], torch.float64, f"rank {r} input gradient", 4)
        assert_close(result["running_var"], expected.running_var, torch.float64, f"rank {r} running_var")


def test_process_outside_the_group_gets_a_clear_error(ranks):
    _, results = ranks
    error = results[1]["group"]["outsider_error"]
    assert "not a member of the process group" in error


def test_eval_mode_needs_no_other_rank(ranks):
    _, results = ranks
    x, _ = global_batch(600, [2], (3, 3), CHANNELS, torch.float64)
    layer = make_layer(InPlaceABN, 0).double()
    expected = reference(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, False, 0.3, 1e-5, "leaky_relu", 0.1, None
    )
    assert_close(results[0]["eval"]["y"], expected.y, torch.float64, "eval output")


def test_no_warning_with_an_initialized_process_group(ranks):
    world_size, results = ranks
    for r in range(world_size):
        unexpected = [w for w in results[r]["warnings"] if "not initialized" in w or "inplace_abn" in w]
        # ReLU's (documented) warning is the only one expected.
        assert all("is ReLU, which is not invertible" in w for w in unexpected), unexpected


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="NCCL needs at least 2 GPUs",
)
def test_nccl_two_gpus(tmp_path):
    """The same module over NCCL: rank r on cuda:r, against the CPU single-process result."""
    context = mp.start_processes(
        _nccl_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("NCCL processes did not finish")
    sizes = [3, 5]
    x, dy = global_batch(0, sizes, (5, 7), CHANNELS, torch.float32)
    single = single_process_layer(0, x.double(), dy.double())
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt")
        assert_close(result["y"], single["y"][rows(sizes, r)], torch.float32, f"rank {r} output", 4)
        assert_close(result["dx"], single["dx"][rows(sizes, r)], torch.float32, f"rank {r} input gradient", 4)
        assert_close(result["running_var"], single["running_var"], torch.float32, f"rank {r} running_var")


def _nccl_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        sizes = [3, 5]
        x, dy = global_batch(0, sizes, (5, 7), CHANNELS, torch.float32)
        layer = make_layer(InPlaceABNSync, 0).float().cuda()
        leaf, inputs = layer_input(x[rows(sizes, rank)].cuda(), False)
        y = layer(inputs)
        y.backward(dy[rows(sizes, rank)].cuda())
        result = dict(y=y.detach().cpu(), dx=leaf.grad.cpu(), running_var=layer.running_var.cpu())
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
