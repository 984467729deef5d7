"""The CUDA kernels: every operator against the float64 oracle for every dtype, layout and activation,
outputs poisoned so that every element must be written, sizes that stress the reductions, one tensor
above 2^31 elements, mixed precision, streams and determinism.

The module-level tests of test_correctness.py, test_ops.py and test_api.py also run on "cuda" (the
`device` fixture) when a GPU is present. Here the native operators are called directly, so these
tests check the CUDA kernels themselves.
"""

from __future__ import annotations

import pytest
import torch

from inplace_abn import InPlaceABN, _native, ops

from oracle import assert_close, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA GPU available to torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
)

OPS = ("statistics", "normalize_act_", "backward_reduce", "backward_input")
ACTIVATIONS = [
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.3),
    ("elu", 1.0),
    ("elu", 0.4),
    ("identity", 0.0),
    ("relu", 0.0),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Dense layouts are walked in 16-byte vectors (with a scalar tail); "misaligned" (a storage offset of
# one element), "sliced_n" (every other sample) and "channel_slice" (channels 1: of a wider tensor)
# take the element-by-element paths. The backward operators only ever see dense tensors.
LAYOUTS = ["contiguous", "channels_last", "misaligned", "sliced_n", "channel_slice", "channels_last_slice"]
DENSE = {"contiguous", "channels_last", "misaligned"}
SHAPES = [(2, 3, 5, 7), (4, 16, 8, 8), (3, 5, 33), (16, 24), (2, 6, 3, 4, 5)]


@pytest.fixture(scope="module")
def lib():
    """torch.ops.inplace_abn with CUDA kernels registered (loading the library if the package did not)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("inplace_abn::statistics", "CUDA"):
        path = _native.PACKAGE_DIR / _native.library_filename("cuda")
        if not path.exists():
            pytest.fail(f"the CUDA library {path.name} is not installed in {_native.PACKAGE_DIR}")
        torch.ops.load_library(str(path))
    return torch.ops.inplace_abn


def test_package_uses_the_cuda_kernels():
    """The loader loads the CUDA library under a CUDA torch, and the operators use it."""
    status = _native.load()
    assert "cuda" in status.libraries, "the loader does not know the CUDA library"
    assert status.libraries["cuda"].loaded, status.libraries["cuda"].problem
    assert ops.uses_native(torch.device("cuda"))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with the channels innermost in memory."""
    return t.movedim(1, -1).clone(memory_format=torch.contiguous_format).movedim(-1, 1)


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor holding `values` in `layout` (its own storage)."""
    if layout == "contiguous":
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "channels_last":
        return channels_last(values)
    if layout == "misaligned":
        flat = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
        out = flat[1:].view(values.shape)
        out.copy_(values)
        return out
    if layout == "sliced_n":
        wide = torch.empty((2 * values.size(0), *values.shape[1:]), dtype=values.dtype, device=values.device)
        wide.fill_(float("nan"))
        wide[::2] = values
        return wide[::2]
    wide_shape = (values.size(0), values.size(1) + 1, *values.shape[2:])
    wide = torch.full(wide_shape, float("nan"), dtype=values.dtype, device=values.device)
    if layout == "channels_last_slice":
        wide = channels_last(wide)
    assert layout in ("channel_slice", "channels_last_slice")
    wide[:, 1:] = values
    return wide[:, 1:]


def poison(*like: torch.Tensor) -> None:
    """Leaves NaN in the caching allocator's free blocks of these sizes: a kernel output that misses an
    element then shows NaN (outputs are allocated right after)."""
    blocks = [torch.full_like(t, float("nan")) for t in like]
    del blocks


def random_case(shape, dtype, param_dtype=None, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    param_dtype = param_dtype or dtype
    c = shape[1]

    def randn(*size):
        return torch.randn(*size, dtype=torch.float64, device="cuda", generator=generator)

    x = (randn(*shape) * 2 + 0.5).to(dtype)
    sign = torch.where(randn(c) < -0.5, -1.0, 1.0)
    weight = (sign * (randn(c).abs() * 0.5 + 0.5)).to(param_dtype)
    bias = (randn(c) * 0.5).to(param_dtype)
    running_mean = randn(c).to(param_dtype)
    running_var = (randn(c).abs() + 0.5).to(param_dtype)
    dy = randn(*shape).to(dtype)
    return x, weight, bias, running_mean, running_var, dy


def run_native(lib, x, weight, bias, running_mean, running_var, training, activation, param, dy, layout, eps=1e-5):
    """The operators in the order functions.py calls them, in `layout`, outputs poisoned."""
    count = x.numel() // x.size(1)
    work = in_layout(x, layout)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if training:
        poison(torch.empty(x.size(1), dtype=acc, device="cuda"))
        mean, var = lib.statistics(work)
    else:
        mean, var = running_mean, running_var
    preact = in_layout(torch.full_like(x, float("nan")), layout) if activation == "relu" else None
    lib.normalize_act_(work, mean, var, weight, bias, eps, activation, param, preact)
    result = {"mean": mean, "var": var, "y": work}
    kept = preact if preact is not None else work
    dy_in = in_layout(dy, layout)
    poison(torch.empty(x.size(1), dtype=acc, device="cuda"))
    sum_dz, sum_dz_xhat = lib.backward_reduce(kept, dy_in, weight, bias, eps, activation, param)
    result.update(sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
    if layout in DENSE:
        poison(kept)
        sums = (sum_dz, sum_dz_xhat) if training else (None, None)
        dx = lib.backward_input(kept, dy_in, var, weight, bias, *sums, count, eps, activation, param)
        assert dx.stride() == kept.stride() and dx.dtype == x.dtype
        result["dx"] = dx
    return result


def check_against_oracle(result, x, weight, bias, running_mean, running_var, training, activation, param, dy):
    dtype = x.dtype
    expected = reference(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, activation, param, dy)
    if training:
        x64 = x.double().transpose(0, 1).reshape(x.size(1), -1)
        assert_close(result["mean"], x64.mean(1), dtype, "mean")
        assert_close(result["var"], x64.var(1, unbiased=False), dtype, "var")
    assert_close(result["y"], expected.y, dtype, "output")
    # sum_dz and sum_dz_xhat are the bias and weight gradients; without batch statistics the oracle's
    # gradients still are those sums.
    assert_close(result["sum_dz"], expected.dbias, dtype, "sum_dz", factor=4)
    dweight = torch.where(weight < 0, -result["sum_dz_xhat"], result["sum_dz_xhat"])
    assert_close(dweight, expected.dweight, dtype, "sum_dz_xhat", factor=4)
    if "dx" in result:
        assert_close(result["dx"], expected.dx, dtype, "input gradient", factor=2)


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_operators_match_float64_oracle(lib, training, dtype, shape, layout, activation, param):
    x, weight, bias, running_mean, running_var, dy = random_case(shape, dtype)
    result = run_native(lib, x, weight, bias, running_mean, running_var, training, activation, param, dy, layout)
    check_against_oracle(result, x, weight, bias, running_mean, running_var, training, activation, param, dy)


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_operators_match_float64_oracle(lib, dtype, layout, activation, param):
    """train_forward_ / train_backward (one call each): output, variance, running statistics (momentum 0.3),
    dx, dweight and dbias against the oracle, with and without the affine parameters, outputs poisoned;
    opcheck on one case per dtype."""
    for affine in (True, False):
        x, weight, bias, running_mean, running_var, dy = random_case((4, 16, 9, 7), dtype, seed=3)
        weight, bias = (weight, bias) if affine else (None, None)
        expected = reference(x, weight, bias, running_mean, running_var, True, 0.3, 1e-5, activation, param, dy)
        work = in_layout(x, layout)
        preact = in_layout(torch.full_like(x, float("nan")), layout) if activation == "relu" else None
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        poison(torch.empty(x.size(1), dtype=acc, device="cuda"))
        var = lib.train_forward_(work, weight, bias, running_mean, running_var, 0.3, 1e-5, activation, param, preact)
        assert_close(work, expected.y, dtype, "output")
        assert_close(var, x.double().transpose(0, 1).reshape(x.size(1), -1).var(1, unbiased=False), dtype, "var")
        assert_close(running_mean, expected.running_mean, dtype, "running_mean")
        assert_close(running_var, expected.running_var, dtype, "running_var")
        if layout not in DENSE:
            continue
        kept = preact if preact is not None else work
        dy_in = in_layout(dy, layout)
        poison(kept, torch.empty(x.size(1), dtype=acc, device="cuda"))
        dx, dweight, dbias = lib.train_backward(kept, dy_in, var, weight, bias, 1e-5, activation, param)
        assert dx.stride() == kept.stride() and dx.dtype == dtype
        assert_close(dx, expected.dx, dtype, "input gradient", factor=2)
        if affine:
            assert dweight.dtype == weight.dtype and dbias.dtype == bias.dtype
            assert_close(dweight, expected.dweight, dtype, "dweight", factor=4)
            assert_close(dbias, expected.dbias, dtype, "dbias", factor=4)
        if affine and layout == "contiguous" and activation == "leaky_relu" and param == 0.01:
            args = (in_layout(x, layout), weight, bias, running_mean.clone(), running_var.clone(), 0.3, 1e-5)
            torch.library.opcheck(lib.train_forward_.default, (*args, activation, param, None))
            backward_args = (kept, dy_in, var, weight, bias, 1e-5, activation, param)
            torch.library.opcheck(lib.train_backward.default, backward_args)


# (shape, channels_last): one channel and 2048 channels; values per channel from 2 to 2^22, powers of
# two and not; tiny planes (S = 1, 3, 49) and long ones.
STRESS = [
    ((2, 1), False),
    ((1, 1, 2), False),
    ((1, 1, 2), True),
    ((3, 2048), False),
    ((7, 2048, 3), False),
    ((7, 2048, 3), True),
    ((5, 2048, 7, 7), False),
    ((5, 2048, 7, 7), True),
    ((3, 1, 65537), False),
    ((3, 1, 65537), True),
    ((1, 1, 1 << 22), False),
    ((1 << 22, 1), False),
    ((64, 1, 256, 256), True),
    ((4, 3, 1000, 1001), False),
    ((4, 3, 1000, 1001), True),
    ((9, 5, 1, 1), True),
    ((1000, 17, 3), False),
    ((1000, 17, 3), True),
    ((2, 2047, 1021), False),
    ((2, 2047, 1021), True),
]


@pytest.mark.parametrize("shape,last", STRESS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reduction_stress_sizes(lib, shape, last, dtype):
    x, weight, bias, _, _, dy = random_case(shape, dtype, param_dtype=torch.float32)
    x = x * 3 + 1  # a mean far from 0
    layout = "channels_last" if last else "contiguous"
    result = run_native(lib, x, weight, bias, None, None, True, "leaky_relu", 0.1, dy, layout)
    check_against_oracle(result, x, weight, bias, None, None, True, "leaky_relu", 0.1, dy)


def test_float32_statistics_do_not_cancel(lib):
    """One-pass statistics keep the variance of values with a large offset (mean 1000, std 0.01)."""
    x = torch.randn(32, 3, 256, 256, dtype=torch.float64, device="cuda") * 0.01 + 1000
    for values in (x.float(), channels_last(x.float())):
        mean, var = lib.statistics(values)
        x64 = values.double()
        expected = x64.var(dim=(0, 2, 3), unbiased=False)
        assert ((mean.double() - x64.mean(dim=(0, 2, 3))).abs() <= 1e-6 * 1000).all()
        assert ((var.double() - expected).abs() <= 1e-3 * expected).all(), (var, expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_statistics_of_huge_magnitudes(lib, layout):
    """Mean 1e4 with std 1e-2, a constant 1e36 channel, std 5e17 over 64x64 planes: finite, and the
    variance within 1e-5 of the float64 variance of the same float32 values."""
    base = torch.randn(8, 4, 64, 64, dtype=torch.float64, device="cuda")
    scales = torch.tensor([1e-2, 1.0, 5e17, 0.0], dtype=torch.float64, device="cuda").view(1, 4, 1, 1)
    offsets = torch.tensor([1e4, -3e6, 0.0, 1e36], dtype=torch.float64, device="cuda").view(1, 4, 1, 1)
    values = (base * scales + offsets).float()
    if layout == "channels_last":
        values = channels_last(values)
    mean, var = lib.statistics(values)
    expected = values.double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all(), (mean, var)
    assert ((var.double() - expected).abs() <= 1e-5 * expected).all(), (var, expected)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 5)], ids=str)
def test_statistics_of_no_values_are_nan(lib, shape):
    """C > 0 and N * S == 0: NaN mean and variance, as torch.var_mean over nothing."""
    mean, var = lib.statistics(torch.empty(shape, device="cuda"))
    assert mean.isnan().all() and var.isnan().all(), (mean, var)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mixed_precision_operators(lib, x_dtype, layout):
    """16-bit input with float32 weight, bias and statistics (as under autocast)."""
    x, weight, bias, running_mean, running_var, dy = random_case((8, 32, 9, 11), x_dtype, param_dtype=torch.float32)
    for training in (True, False):
        for activation, param in (("leaky_relu", 0.01), ("elu", 1.0), ("relu", 0.0)):
            result = run_native(
                lib, x, weight, bias, running_mean, running_var, training, activation, param, dy, layout
            )
            assert result["sum_dz"].dtype == torch.float32
            check_against_oracle(result, x, weight, bias, running_mean, running_var, training, activation, param, dy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("autocast_like", [True, False], ids=["float32-params", "all-16-bit"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_in_16_bit(lib, dtype, autocast_like, memory_format):
    """InPlaceABN with 16-bit inputs: float32 parameters and buffers, or a module converted with .half()."""
    layer = InPlaceABN(24, activation="leaky_relu", activation_param=0.01).cuda()
    with torch.no_grad():  # |weight| away from 0: xhat = (z - b) / (|w| + eps) is recovered from a 16-bit y
        layer.weight.uniform_(0.5, 1.5).mul_(torch.where(torch.rand(24, device="cuda") < 0.3, -1.0, 1.0))
        layer.bias.normal_()
    if not autocast_like:
        layer = layer.to(dtype)
    x = (torch.randn(6, 24, 10, 12, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    expected = reference(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, True, 0.1, 1e-5, "leaky_relu", 0.01, dy
    )
    leaf = x.clone().requires_grad_()
    y = layer(leaf.clone())
    y.backward(dy)
    assert y.dtype == dtype and layer.weight.grad.dtype == layer.weight.dtype
    assert_close(y.detach(), expected.y, dtype, "output")
    assert_close(leaf.grad, expected.dx, dtype, "input gradient", factor=2)
    assert_close(layer.weight.grad, expected.dweight, dtype, "weight gradient", factor=4)
    assert_close(layer.running_var, expected.running_var, dtype, "running_var")


def test_results_are_deterministic(lib):
    """Reductions merge partial results in a fixed order: repeated runs are bit-identical."""
    x, weight, bias, _, _, dy = random_case((32, 7, 61, 67), torch.float32)
    runs = [run_native(lib, x, weight, bias, None, None, True, "elu", 1.0, dy, "contiguous") for _ in range(3)]
    for run in runs[1:]:
        for key in ("mean", "var", "y", "sum_dz", "sum_dz_xhat", "dx"):
            assert torch.equal(run[key], runs[0][key]), key


def test_runs_on_the_current_stream(lib):
    """Kernels are queued on torch's current stream (a side stream here), after the work before them."""
    x, weight, bias, _, _, _ = random_case((64, 8, 64, 64), torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        work = x.clone()
        torch.cuda._sleep(20_000_000)  # a long kernel ahead of ours on the same stream
        work.mul_(2)
        mean, var = lib.statistics(work)
        lib.normalize_act_(work, mean, var, weight, bias, 1e-5, "identity", 0.0, None)
    torch.cuda.current_stream().wait_stream(stream)
    expected = reference(x * 2, weight, bias, None, None, True, 0.1, 1e-5, "identity", 0.0, None)
    assert_close(work, expected.y, torch.float32, "output")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device(lib):
    """The device guard: tensors on cuda:1 while cuda:0 is current."""
    x, weight, bias, _, _, dy = random_case((4, 6, 7, 9), torch.float32)
    x, weight, bias, dy = (t.to("cuda:1") for t in (x, weight, bias, dy))
    with torch.cuda.device(0):
        mean, var = lib.statistics(x)
        y = x.clone()
        lib.normalize_act_(y, mean, var, weight, bias, 1e-5, "leaky_relu", 0.1, None)
    assert mean.device == y.device == torch.device("cuda:1")
    expected = reference(x, weight, bias, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1, dy)
    assert_close(y, expected.y, torch.float32, "output")


def test_argument_errors_match_the_cpu_kernels(lib):
    x = torch.randn(4, 3, 5, device="cuda")
    mean, var = lib.statistics(x)
    cases = [
        (lambda: lib.normalize_act_(x, mean, var, torch.ones(3), None, 1e-5, "elu", 1.0, None), "weight must be on"),
        (lambda: lib.normalize_act_(x, mean[:2], var, None, None, 1e-5, "elu", 1.0, None), "mean must have shape"),
        (lambda: lib.normalize_act_(x, mean, var, None, None, 1e-5, "elu", 0.0, None), "not invertible"),
        (lambda: lib.normalize_act_(x, mean, var, None, None, 1e-5, "elu", 1.0, x.clone()), "preact is only"),
        (lambda: lib.statistics(x.int()), "x must be float32"),
        (lambda: lib.backward_reduce(x, x.double(), None, None, 1e-5, "identity", 0.0), "dy must have the dtype"),
        (lambda: lib.backward_input(x, x, var, None, None, mean, None, 20, 1e-5, "identity", 0.0), "given together"),
        (lambda: lib.statistics(x.expand(4, 3, 5).unsqueeze(0).expand(2, 4, 3, 5)), "overlapping"),
        (
            lambda: lib.train_forward_(x, None, None, torch.zeros(3), torch.ones(3), 0.1, 1e-5, "elu", 1.0, None),
            "running_mean must be on the input's device",
        ),
        (
            lambda: lib.train_forward_(x[:1, :, :1], None, None, None, None, 0.1, 1e-5, "elu", 1.0, None),
            "more than one value per channel",
        ),
        (lambda: lib.train_backward(x, x, var[:2], None, None, 1e-5, "elu", 1.0), "var must have shape"),
    ]
    before = x.clone()
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert torch.equal(x, before), "a call that raised modified its input"


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_huge_tensor_above_2_to_the_31_elements(lib, layout):
    """64-bit indexing: a float16 tensor of 2 channels and 2^31 + 2^20 + 6 elements, as (N, 2) rows or one
    (1, 2, S) plane pair; statistics, output, sums and input gradient are checked at both ends of each
    channel and across element 2^31."""
    n = (1 << 30) + (1 << 19) + 3  # values per channel
    needed = 3 * 2 * n * 2 + (1 << 31)  # x, dy and dx, plus working memory
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty((n, 2) if layout == "rows" else (1, 2, n), dtype=torch.float16, device="cuda")
    channels = [x[:, c] if layout == "rows" else x[0, c] for c in range(2)]

    def value(c: int, i: torch.Tensor) -> torch.Tensor:
        """Channel 0 cycles through 0..6, channel 1 through -3..3 and +4 in its last 3 values."""
        v = (i % 7).double() - 3 * c
        return v + 4 * ((i >= n - 3) & (c == 1))

    total, total_squares = [0.0, 0.0], [0.0, 0.0]
    for c, channel in enumerate(channels):
        for start in range(0, n, 1 << 26):
            v = value(c, torch.arange(start, min(n, start + (1 << 26)), device="cuda"))
            channel[start : start + v.numel()] = v.half()
            total[c] += v.sum().item()
            total_squares[c] += v.square().sum().item()
    assert x.numel() > 2**31
    expected_mean = [t / n for t in total]
    expected_var = [total_squares[c] / n - expected_mean[c] ** 2 for c in range(2)]

    mean, var = lib.statistics(x)
    for c in range(2):
        assert abs(mean[c].item() - expected_mean[c]) <= 1e-5 * 4, (c, mean[c].item(), expected_mean[c])
        assert abs(var[c].item() - expected_var[c]) <= 1e-4 * expected_var[c], (c, var[c].item(), expected_var[c])
    weight = torch.tensor([1.0, -2.0], device="cuda")
    bias = torch.tensor([0.5, -0.5], device="cuda")
    lib.normalize_act_(x, mean, var, weight, bias, 1e-5, "leaky_relu", 0.1, None)
    spots = torch.tensor([0, 1, 6, (1 << 30) - 1, 1 << 30, n - 4, n - 1], device="cuda")
    scale = (weight.abs() + 1e-5) * (var + 1e-5).rsqrt()
    for c in range(2):
        z = (value(c, spots) - mean[c].double()) * scale[c].double() + bias[c].double()
        expected_y = torch.where(z > 0, z, 0.1 * z)
        assert_close(channels[c][spots], expected_y, torch.float16, f"output of channel {c}")

    dy = torch.ones_like(x)
    sum_dz, sum_dz_xhat = lib.backward_reduce(x, dy, weight, bias, 1e-5, "leaky_relu", 0.1)
    for c in range(2):
        positive = sum((chunk > 0).sum().item() for chunk in channels[c].split(1 << 26))
        expected_dz = positive + 0.1 * (n - positive)
        assert abs(sum_dz[c].item() - expected_dz) <= 1e-5 * expected_dz
    dx = lib.backward_input(x, dy, var, weight, bias, sum_dz, sum_dz_xhat, n, 1e-5, "leaky_relu", 0.1)
    dx_channels = [dx[:, c] if layout == "rows" else dx[0, c] for c in range(2)]
    for c in range(2):
        y = channels[c][spots].double()
        z, dz = torch.where(y > 0, y, y / 0.1), torch.where(y > 0, 1.0, 0.1)
        xhat = (z - bias[c].double()) / (weight[c].abs().double() + 1e-5)
        expected_dx = scale[c].double() * (dz - sum_dz[c].double() / n - xhat * sum_dz_xhat[c].double() / n)
        assert_close(dx_channels[c][spots], expected_dx, torch.float16, f"input gradient of channel {c}", factor=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
def test_16_bit_values_round_trip_exactly(lib, dtype, layout):
    """Every 16-bit pattern survives load -> float -> store (x * 1 + 0; -0 becomes +0, NaN stays NaN)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(4, 1, -1).cuda()
    y = in_layout(x, layout)
    eps = 2.0**-20
    mean, var = torch.zeros(1, device="cuda"), torch.full((1,), 1 - eps, device="cuda")  # scale 1, shift 0
    lib.normalize_act_(y, mean, var, None, None, eps, "identity", 0.0, None)
    nan = x.isnan()
    assert torch.equal(y.isnan(), nan)
    expected = torch.where(x == 0, torch.zeros_like(x), x)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))
