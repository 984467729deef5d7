"""Export of eval-mode In-Place ABN as standard operators: torch.export (aten batch_norm + activation, no
custom operator: the exported program runs without this package), torch.jit.trace, and ONNX
(BatchNormalization + LeakyRelu / Elu / Relu) run with onnxruntime.

Expected values come from torch's own batch_norm in float64 with weight |w| + eps (tests/oracle.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from inplace_abn import InPlaceABN, InPlaceABNSync

from oracle import assert_close, reference

ACTIVATIONS = [("leaky_relu", 0.1), ("elu", 0.7), ("identity", 0.0), ("relu", 0.0)]
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "onnxscript"))
# torch's exporters emit their own deprecation and progress warnings.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:inplace_abn with activation='relu'"),
]


def randomized(layer: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(layer.num_features)
    c = layer.num_features
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=generator) * 2 - 1)  # both signs: |w| + eps matters
        layer.bias.copy_(torch.randn(c, generator=generator))
        layer.running_mean.copy_(torch.randn(c, generator=generator))
        layer.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return layer.eval()


def expected_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float64 oracle: torch's batch_norm with weight |w| + eps, then the activation."""
    return reference(
        x,
        layer.weight,
        layer.bias,
        layer.running_mean,
        layer.running_var,
        False,
        0.1,
        layer.eps,
        layer.activation,
        layer.activation_param,
        None,
    ).y


def layer_and_input(activation: str, param: float, sync: bool = False) -> tuple[nn.Module, torch.Tensor]:
    cls = InPlaceABNSync if sync else InPlaceABN
    layer = randomized(cls(6, eps=1e-4, activation=activation, activation_param=param))
    x = torch.randn(3, 6, 5, 4, generator=torch.Generator().manual_seed(7)) * 2
    return layer, x


def call_targets(graph: torch.fx.Graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("sync", [False, True], ids=["InPlaceABN", "InPlaceABNSync"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
def test_torch_export_uses_standard_operators(activation, param, sync):
    layer, x = layer_and_input(activation, param, sync)
    batch = torch.export.Dim("batch")
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    targets = call_targets(program.run_decompositions().graph)
    assert not any("inplace_abn" in t for t in targets), targets
    assert any("batch_norm" in t for t in targets), targets
    activation_op = {"leaky_relu": "leaky_relu", "elu": "elu", "relu": "relu", "identity": None}[activation]
    if activation_op is not None:
        assert any(activation_op in t for t in targets), targets
    for n in (3, 5):  # dynamic batch size
        xn = torch.randn(n, 6, 5, 4, dtype=torch.float32)
        out = program.module()(xn.clone())
        assert_close(out, expected_output(layer, xn), torch.float32, "exported program output")
    assert torch.equal(x, layer_and_input(activation, param, sync)[1]), "export does not overwrite the input"


def test_exported_program_runs_without_this_package(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), randomized(InPlaceABN(6, activation="elu", activation_param=1.0))
    )
    model.eval()
    x = torch.randn(2, 3, 5, 4)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        """
        import sys, torch
        program = torch.export.load(sys.argv[1] + "/model.pt2")
        torch.save(program.module()(torch.load(sys.argv[1] + "/x.pt")), sys.argv[1] + "/y.pt")
        assert "inplace_abn" not in sys.modules
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300, env=env)
    with torch.no_grad():
        expected = nn.functional.elu(
            nn.functional.batch_norm(
                model[0](x).double(),
                model[1].running_mean.double(),
                model[1].running_var.double(),
                model[1].weight.double().abs() + 1e-5,
                model[1].bias.double(),
                False,
                0.0,
                1e-5,
            )
        )
    assert_close(torch.load(tmp_path / "y.pt"), expected, torch.float32, "output of the loaded program", 4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the argument checks read sizes
def test_jit_trace_uses_standard_operators():
    layer, x = layer_and_input("leaky_relu", 0.2)
    traced = torch.jit.trace(layer, (x.clone(),))
    assert "inplace_abn::" not in str(traced.graph) and "aten::batch_norm" in str(traced.graph)
    assert_close(traced(x.clone()), expected_output(layer, x), torch.float32, "traced output")


@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxruntime and onnxscript")
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
def test_onnx_export_runs_in_onnxruntime(activation, param):
    import onnxruntime

    layer, x = layer_and_input(activation, param)
    model = nn.Sequential(layer).eval()
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    nodes = [(node.domain, node.op_type) for node in program.model_proto.graph.node]
    assert all(domain in ("", "ai.onnx") for domain, _ in nodes), nodes  # standard operators only
    op_types = {op for _, op in nodes}
    assert "BatchNormalization" in op_types, nodes
    activation_op = {"leaky_relu": "LeakyRelu", "elu": "Elu", "relu": "Relu", "identity": None}[activation]
    if activation_op is not None:
        assert activation_op in op_types, nodes
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (3, 7):
        xn = torch.randn(n, 6, 5, 4, generator=torch.Generator().manual_seed(n))
        (out,) = session.run(None, {session.get_inputs()[0].name: xn.numpy()})
        assert_close(torch.from_numpy(out), expected_output(layer, xn), torch.float32, "onnxruntime output", 4)


@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxruntime and onnxscript")
def test_onnx_export_of_a_network():
    """Conv + InPlaceABN blocks: ONNX folds BatchNormalization into the convolutions; standard operators."""
    import onnxruntime

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        randomized(InPlaceABN(8, activation="leaky_relu", activation_param=0.1)),
        nn.Conv2d(8, 6, 1),
        randomized(InPlaceABN(6, activation="elu", activation_param=1.0)),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(model, (x,), dynamo=True)
    assert all(node.domain in ("", "ai.onnx") for node in program.model_proto.graph.node)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        h = expected_output(model[1], model[0](x).double()).float()
        expected = expected_output(model[3], model[2](h).double())
    assert_close(torch.from_numpy(out), expected, torch.float32, "onnxruntime output", 8)
