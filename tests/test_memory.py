"""What In-Place ABN keeps for backward, and what it allocates.

Saved tensors are counted with torch.autograd.graph.saved_tensors_hooks over unique storages;
allocations with the profiler's per-operator memory records.
"""

from __future__ import annotations

import os

import pytest
import torch
from saved_memory import conv_stack, saved_storages
from torch.profiler import ProfilerActivity, profile

from inplace_abn import InPlaceABN, _native, functions

needs_native = pytest.mark.skipif(
    os.environ.get(_native.DISABLE_ENV, "") not in ("", "0"), reason="the fallback allocates temporaries"
)


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_keeps_only_its_output(activation, param, channels_last):
    x = torch.randn(4, 8, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaf = x.clone().requires_grad_()
    layer = InPlaceABN(8, activation=activation, activation_param=param)
    inputs = leaf * 2  # mul by a Python number saves nothing
    outputs = []
    saved = saved_storages(lambda: outputs.append(layer(inputs)))
    large = {address: size for address, size in saved.items() if size >= x.nbytes}
    assert list(large) == [outputs[0].untyped_storage().data_ptr()]
    small = sum(size for size in saved.values() if size < x.nbytes)
    assert small <= 4 * 8 * 8  # per-channel vectors only: variance, weight, bias


def test_relu_keeps_its_pre_activation_too():
    """ReLU is not invertible: exact gradients need the pre-activation (documented: no saving)."""
    x = torch.randn(4, 8, 16, 16)
    layer = InPlaceABN(8, activation="relu")
    functions._warned.discard("relu")
    with pytest.warns(RuntimeWarning, match="not invertible") as record:
        inputs = x.clone().requires_grad_() * 2
        saved = saved_storages(lambda: layer(inputs))
        layer(x.clone().requires_grad_() * 2)  # warned once only
    assert len([w for w in record if "not invertible" in str(w.message)]) == 1
    assert sum(1 for size in saved.values() if size >= x.nbytes) == 1
    assert inputs.untyped_storage().data_ptr() not in saved


def test_conv_stack_keeps_at_most_55_percent_of_batchnorm_stack():
    x = torch.randn(4, 16, 32, 32)
    kept = {}
    for in_place_abn in (False, True):
        model = conv_stack(8, 16, in_place_abn)
        kept[in_place_abn] = sum(saved_storages(lambda model=model: model(x)).values())
    ratio = kept[True] / kept[False]
    assert ratio <= 0.55, f"InPlaceABN stack keeps {kept[True]} bytes, BatchNorm stack {kept[False]}: {ratio:.3f}"


def allocations(event) -> list[int]:
    """Sizes of the allocations made by a profiler event and its descendants."""
    sizes = [event.self_cpu_memory_usage] if event.self_cpu_memory_usage > 0 else []
    for child in event.cpu_children:
        sizes += allocations(child)
    return sizes


def large_allocations(prof, name: str, threshold: int) -> list[int]:
    roots = [e for e in prof.events() if e.name == name]
    assert roots, f"no profiler event named {name}"
    return [size for root in roots for size in allocations(root) if size >= threshold]


@needs_native
# torch 2.10 and 2.11 warn once per process, from profile(), that events are cleared at the end of each
# profiling cycle (each profile() here is one cycle): a notice about the profiler, not about this package.
@pytest.mark.filterwarnings("ignore:.*Profiler clears events at the end of each cycle:UserWarning")
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_allocate_no_full_size_temporaries(channels_last):
    x = torch.randn(4, 8, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = x.clone().requires_grad_() * 2
    layer = InPlaceABN(8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = layer(inputs)
    assert large_allocations(prof, "_InPlaceABN", x.nbytes // 2) == []
    dy = torch.randn_like(y)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y.backward(dy)
    # Only the input gradient.
    assert large_allocations(prof, "_InPlaceABNBackward", x.nbytes // 2) == [x.nbytes]
