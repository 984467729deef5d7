"""torch.compile: InPlaceABN traces without graph breaks (Dynamo traces its autograd.Function, the
in-place forward included, into the custom operators with their fake kernels), trains like torch's
BatchNorm + activation, does not recompile every step, and keeps its memory saving.

Most tests use the aot_eager backend (Dynamo + AOTAutograd + functionalization: everything but code
generation, and fast); one test runs Inductor. The reference is an eager float64 torch BatchNorm2d +
activation model with weight |w| + eps (positive weights, so both parameterizations follow the same
SGD trajectory).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from saved_memory import conv_stack, saved_storages

from inplace_abn import InPlaceABN, InPlaceABNSync, functions, inplace_abn

from oracle import assert_close

# torch.compile's own deprecation warnings (e.g. Dynamo instantiating an autograd.Function while tracing
# it, Inductor using torch.jit.script_method): torch-internal, hidden from users by default.
# Dynamo also reads .grad of non-leaf graph inputs while building the graph (a torch-internal UserWarning).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch"),
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"),
]

ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Backend:
    """aot_eager, recording the graphs Dynamo captures (one per compilation)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def scalar_reads(self) -> list[str]:
        """Calls that read a tensor's value into Python (.item(), a GPU synchronization) in the graphs."""
        return scalar_reads(self.graphs)


def scalar_reads(graphs: list[torch.fx.GraphModule]) -> list[str]:
    """.item() calls in the graphs and their subgraphs (the autograd.Function's forward and backward are
    nested graphs), except on Python numbers that Dynamo passes as tensors (a dynamic float attribute)."""

    def python_number(node: torch.fx.Node) -> bool:
        grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
        return bool(getattr(grapharg, "pass_arg_as_tensor", False))

    return [
        node.format_node()
        for gm in graphs
        for sub in gm.modules()
        if isinstance(sub, torch.fx.GraphModule)
        for node in sub.graph.nodes
        if node.op != "placeholder"
        and (node.target in ("item", "tolist") or "local_scalar_dense" in str(node.target))
        and not (node.args and isinstance(node.args[0], torch.fx.Node) and python_number(node.args[0]))
    ]


def torch_activation(activation: str, param: float) -> nn.Module:
    return {
        "leaky_relu": lambda: nn.LeakyReLU(param),
        "elu": lambda: nn.ELU(param),
        "relu": lambda: nn.ReLU(),
        "identity": lambda: nn.Identity(),
    }[activation]()


def models(activation: str, param: float, momentum: float | None = 0.1, sync: bool = False):
    """(In-Place ABN model, the same model with torch BatchNorm2d + activation), float64, same parameters."""
    norm = InPlaceABNSync if sync else InPlaceABN
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        norm(4, momentum=momentum, activation=activation, activation_param=param),
        nn.Conv2d(4, 3, 1, bias=False),
        norm(3, momentum=momentum, activation="elu", activation_param=0.5),
    ).double()
    reference = nn.Sequential(
        model[0],
        nn.BatchNorm2d(4, momentum=momentum),
        torch_activation(activation, param),
        model[2],
        nn.BatchNorm2d(3, momentum=momentum),
        nn.ELU(0.5),
    ).double()
    reference = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, bn in ((model[1], reference[1]), (model[3], reference[4])):
            layer.weight.copy_(torch.rand(layer.num_features, generator=generator, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=generator, dtype=torch.float64) * 0.2)
            bn.weight.copy_(layer.weight.abs() + EPS)
            bn.bias.copy_(layer.bias)
    return model, reference


def batches(sizes, channels_last=False):
    generator = torch.Generator().manual_seed(2)
    for n in sizes:
        x = torch.randn(n, 3, 6, 5, generator=generator, dtype=torch.float64) * 2 + 1
        target = torch.randn(n, 3, 6, 5, generator=generator, dtype=torch.float64)
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), target


def train(model: nn.Module, data, no_recompile_after_first_step: bool = False) -> list[dict]:
    """SGD steps on an MSE loss; returns per step the output, the input gradient and the parameters after it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    steps = []
    for step, (x, target) in enumerate(data):
        leaf = x.clone().requires_grad_()
        with torch._dynamo.config.patch(error_on_recompile=no_recompile_after_first_step and step > 0):
            y = model(leaf)
        ((y - target) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(dict(y=y.detach(), dx=leaf.grad, params=[p.detach().clone() for p in model.parameters()]))
    return steps


def assert_same_training(actual: list[dict], expected: list[dict], what: str) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a["y"], e["y"], torch.float64, f"{what} step {step}: output", 100)
        assert_close(a["dx"], e["dx"], torch.float64, f"{what} step {step}: input gradient", 100)
        for i, (pa, pe) in enumerate(zip(a["params"], e["params"], strict=True)):
            # In-Place ABN weights w and BatchNorm weights |w| + eps: compare as BatchNorm weights.
            if pa.shape != pe.shape:
                continue
            assert_close(pa, pe, torch.float64, f"{what} step {step}: parameter {i}", 100)


def bn_params_as_iabn(steps: list[dict], model: nn.Module) -> list[dict]:
    """Reference parameters in the In-Place ABN model's order (BatchNorm weight |w| + eps -> w = weight - eps)."""
    converted = []
    for step in steps:
        p = step["params"]  # conv0 w, b, bn1 w, b, conv2 w, bn4 w, b
        as_iabn = [p[0], p[1], p[2] - EPS, p[3], p[4], p[5] - EPS, p[6]]
        assert [t.shape for t in as_iabn] == [q.shape for q in model.parameters()]
        converted.append(dict(step, params=as_iabn))
    return converted


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
def test_compiled_training_matches_batchnorm_without_recompiling(activation, param):
    model, reference = models(activation, param)
    backend = Backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: any graph break fails
    data = list(batches([4, 4, 4, 4]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "inplace_abn with activation='relu'")
        actual = train(compiled, data, no_recompile_after_first_step=True)
    expected = bn_params_as_iabn(train(reference, data), model)
    assert_same_training(actual, expected, f"compiled {activation}")
    assert len(backend.graphs) == 1 and backend.scalar_reads() == []
    for layer, bn in ((model[1], reference[1]), (model[3], reference[4])):
        assert_close(layer.running_mean, bn.running_mean, torch.float64, "running_mean")
        assert_close(layer.running_var, bn.running_var, torch.float64, "running_var")
        assert int(layer.num_batches_tracked) == 4


@pytest.mark.parametrize(
    "variant", ["channels_last", "momentum_none", "eval", "changing_batch_size", "sync_without_process_group"]
)
def test_compiled_variants(variant):
    momentum = None if variant == "momentum_none" else 0.1
    model, reference = models("leaky_relu", 0.1, momentum=momentum, sync=variant == "sync_without_process_group")
    if variant == "eval":
        with torch.no_grad():
            for layer, bn in ((model[1], reference[1]), (model[3], reference[4])):
                layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
                bn.running_mean.copy_(layer.running_mean), bn.running_var.copy_(layer.running_var)
        model.eval(), reference.eval()
    sizes = [2, 3, 4, 5, 6] if variant == "changing_batch_size" else [4, 4, 4, 4]
    data = list(batches(sizes, channels_last=variant == "channels_last"))
    backend = Backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    functions._warned.discard("sync")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train(compiled, data)
    expected = bn_params_as_iabn(train(reference, data), model)
    assert_same_training(actual, expected, variant)
    # One graph; with changing batch sizes, one more with a dynamic batch dimension. No value is read back
    # into Python: momentum=None's 1 / num_batches_tracked stays a tensor.
    assert len(backend.graphs) == (2 if variant == "changing_batch_size" else 1)
    assert backend.scalar_reads() == []
    for layer, bn in ((model[1], reference[1]), (model[3], reference[4])):
        assert_close(layer.running_mean, bn.running_mean, torch.float64, "running_mean")
        assert_close(layer.running_var, bn.running_var, torch.float64, "running_var")
    messages = [str(w.message) for w in caught]
    if variant == "sync_without_process_group":
        assert len([m for m in messages if "torch.distributed is not initialized" in m]) == 1, messages
    else:
        assert messages == []


@pytest.mark.parametrize("where", ["layer_alone", "after_graph_break"])
def test_layer_at_the_start_of_a_compiled_region(where):
    """The layer's input is an input of the compiled graph (a compiled layer alone, a graph break just before
    it, a DistributedDataParallel bucket boundary): AOTAutograd mishandles an autograd.Function that marks
    such an input dirty (wrong input gradients with torch 2.13 and 2.14), so compiled code runs out of place."""
    model, reference = models("elu", 0.3)

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.rest = model[0], model[1], model[2:]

        def forward(self, x):
            x = self.conv(x)
            torch._dynamo.graph_break()
            return self.rest(self.norm(x))

    if where == "layer_alone":
        model[1] = torch.compile(model[1], backend="aot_eager", fullgraph=True)
        compiled = model
    else:
        compiled = torch.compile(Split(), backend="aot_eager")
    data = list(batches([4, 4]))
    expected = bn_params_as_iabn(train(reference, data), model)
    assert_same_training(train(compiled, data), expected, where)


def test_functional_call_in_compiled_function():
    weight, bias = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    running_mean, running_var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def f(x):
        return inplace_abn(x * 2, weight, bias, running_mean, running_var, True, 0.1, EPS, "elu", 1.0)

    x = torch.randn(5, 4, 3, dtype=torch.float64)
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    z = nn.functional.batch_norm(x * 2, None, None, weight.abs() + EPS, bias, True, 0.1, EPS)
    assert_close(y, nn.functional.elu(z), torch.float64, "output")
    assert_close(running_var, 0.9 + 0.1 * (x * 2).var(dim=(0, 2)), torch.float64, "running_var")


def test_memory_saving_holds_under_compile():
    """A compiled conv stack keeps one full-size tensor per In-Place ABN layer (its output, which the next
    convolution keeps anyway), where the compiled BatchNorm + LeakyReLU stack keeps two per layer.

    aot_eager_decomp_partition runs Inductor's decompositions and partitioner (which decides what is kept
    for backward) without code generation: the same saved tensors as Inductor, in a fraction of the time.
    The bytes, eager and under Inductor, for larger models: benchmarks/compile_memory.py.
    """
    blocks, x = 4, torch.randn(2, 8, 8, 8)
    large = {}
    for in_place_abn in (False, True):
        stack = torch.compile(conv_stack(blocks, 8, in_place_abn), backend="aot_eager_decomp_partition")
        stack(x.clone().requires_grad_())  # compile outside the measurement
        saved = saved_storages(lambda stack=stack: stack(x.clone().requires_grad_()))
        large[in_place_abn] = sorted(size for size in saved.values() if size >= x.nbytes)
    # In-Place ABN: the stack's input and each layer's output.
    assert large[True] == [x.nbytes] * (blocks + 1), large
    # BatchNorm + LeakyReLU: the input, each convolution's output, each activation's output but the last.
    assert large[False] == [x.nbytes] * (2 * blocks), large


@pytest.mark.skipif(sys.platform == "win32", reason="Inductor needs a C++ compiler setup on Windows")
def test_inductor_trains_like_batchnorm():
    """Inductor's generated code around the custom operators (layouts, buffer reuse, in-place reinplacing)."""
    model, reference = models("leaky_relu", 0.01)
    compiled = torch.compile(model, fullgraph=True)
    data = list(batches([4, 4, 4]))
    expected = bn_params_as_iabn(train(reference, data), model)
    assert_same_training(train(compiled, data), expected, "inductor")


def test_import_does_not_load_dynamo():
    """The torch.compile support costs nothing at import: torch._dynamo takes seconds to import."""
    script = "import sys, inplace_abn; assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
