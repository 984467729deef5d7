"""The CUDA kernels' source, run on the CPU by tests/cuda_emulation (no GPU needed): every operator
against the float64 oracle for every dtype, layout and activation, with outputs poisoned, and with
the work split over several blocks per channel or not. It checks the kernels' index arithmetic,
vector and element-by-element paths, tails and reductions; test_cuda.py checks them on a GPU.

The emulator runs the threads of a block between barriers, and the blocks of a grid, in shuffled
order (other orders and seeds in test_emulated_schedules), poisons shared memory before every
block, checks the alignment of every vector access, and reports the blocks per wave of real GPUs
(SMs x resident blocks) where the tests ask for it, so that the work splits are an H100's.

Needs the repository's sources (src/cuda), a C++17 compiler and the CUDA headers (CUDA_HOME or
/usr/local/cuda); skipped otherwise. The library is built once per source version into a cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from oracle import assert_close, reference

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "tests" / "cuda_emulation" / name for name in ("emulator.h", "harness.cpp")] + sorted(
    [*(REPO / "src" / "cuda").glob("*.cu*"), *(REPO / "src" / "cuda").glob("*.h"), *(REPO / "src").glob("*.h")]
)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ACTIVATION_CODES = {"identity": 0, "leaky_relu": 1, "elu": 2, "relu": 3}


class Layout(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64 if name != "kind" else ctypes.c_int)
        for name in ("kind", "N", "C", "S", "stride_n", "stride_c", "stride_s")
    ]


class Vector(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64), ("dtype", ctypes.c_int)]


def _cuda_include() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emu():
    include = _cuda_include()
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if not all(p.exists() for p in SOURCES[:2]) or not (REPO / "src" / "cuda").is_dir():
        pytest.skip("the CUDA sources are not available (not a source checkout)")
    if include is None or compiler is None:
        pytest.skip("needs the CUDA headers (CUDA_HOME) and a C++17 compiler (CXX, default g++)")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "inplace_abn_cuda_emulation"
    cache.mkdir(exist_ok=True)
    library = cache / f"harness-{digest}.so"
    if not library.exists():
        partial = cache / f"harness-{digest}.{os.getpid()}.so"
        command = [
            compiler,
            "-std=c++17",
            "-O1",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Wextra",
            "-Wno-unknown-pragmas",
            f"-I{include}",
            str(SOURCES[1]),
            "-o",
            str(partial),
        ]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
        partial.replace(library)
    lib = ctypes.CDLL(str(library))
    for name in (
        "emu_statistics",
        "emu_normalize_act",
        "emu_backward_reduce",
        "emu_backward_input",
        "emu_train_forward",
        "emu_train_backward",
    ):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.emu_set_wave.argtypes = [ctypes.c_int64]
    lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    lib.emu_configure(SHUFFLED, 1, 1, 1)
    return lib


FIXED, REVERSED, SHUFFLED = 0, 1, 2
# Blocks of 256 threads per wave on real GPUs: SMs x resident blocks (8 for the element-wise
# kernels, 4 for the channels_last reductions, see src/cuda/resource_budgets.json).
H100, H200, B200 = 132 * 8, 142 * 4, 170 * 8


def setup(emu, wave: int, order: int = SHUFFLED, seed: int = 1, poison: bool = True, alignment: bool = True) -> None:
    """Blocks per wave, schedule and checks of the emulator for the next calls."""
    emu.emu_set_wave(wave)
    emu.emu_configure(order, seed, int(poison), int(alignment))


def channel_layout(t: torch.Tensor) -> Layout:
    """tensor_args.h's channel_layout (for the layouts used here)."""
    size, stride = t.shape, t.stride()
    s, stride_s, expected = 1, 1, -1
    for d in reversed(range(2, t.dim())):
        if size[d] == 1:
            continue
        if expected < 0:
            stride_s = stride[d]
        assert expected < 0 or stride[d] == expected
        expected = stride[d] * size[d]
        s *= size[d]
    planes = stride_s == 1 and (s > 1 or stride[1] != 1)
    assert planes or stride[1] == 1
    return Layout(0 if planes else 1, size[0], size[1], s, stride[0], stride[1], stride_s)


def vector(t: torch.Tensor | None) -> Vector:
    if t is None:
        return Vector(None, 0, 0)
    return Vector(t.data_ptr(), t.stride(0), DTYPE_CODES[t.dtype])


def check(error: bytes | None) -> None:
    assert error is None, error.decode()


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with the channels innermost in memory."""
    return t.movedim(1, -1).clone(memory_format=torch.contiguous_format).movedim(-1, 1)


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor holding `values` in `layout` (gaps filled with NaN)."""
    if layout == "contiguous":
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "channels_last":
        return channels_last(values)
    if layout == "misaligned":  # one element past a 16-byte boundary: element-by-element paths
        flat = torch.full((values.numel() + 1,), float("nan"), dtype=values.dtype)
        out = flat[1:].view(values.shape)
        out.copy_(values)
        return out
    if layout == "sliced_n":
        wide = torch.full((2 * values.size(0), *values.shape[1:]), float("nan"), dtype=values.dtype)
        wide[::2] = values
        return wide[::2]
    wide = torch.full((values.size(0), values.size(1) + 1, *values.shape[2:]), float("nan"), dtype=values.dtype)
    if layout == "channels_last_slice":
        wide = channels_last(wide)
    wide[:, 1:] = values
    return wide[:, 1:]


LAYOUTS = ["contiguous", "channels_last", "misaligned", "sliced_n", "channel_slice", "channels_last_slice"]
DENSE = {"contiguous", "channels_last", "misaligned"}


def run_emulated(emu, x, weight, bias, running_mean, running_var, training, activation, param, dy, layout, eps=1e-5):
    """The operators in the order functions.py calls them; every output starts as NaN."""
    code, act = DTYPE_CODES[x.dtype], ACTIVATION_CODES[activation]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, count = x.size(1), x.numel() // x.size(1)
    work = in_layout(x, layout)
    result = {}
    if training:
        mean, var = torch.full((c,), float("nan"), dtype=acc), torch.full((c,), float("nan"), dtype=acc)
        check(
            emu.emu_statistics(
                code,
                ctypes.c_void_p(work.data_ptr()),
                ctypes.byref(channel_layout(work)),
                ctypes.c_void_p(mean.data_ptr()),
                ctypes.c_void_p(var.data_ptr()),
            )
        )
        result.update(mean=mean, var=var)
    else:
        mean, var = running_mean, running_var
    preact = in_layout(torch.full_like(x, float("nan")), layout) if activation == "relu" else None
    check(
        emu.emu_normalize_act(
            code,
            ctypes.c_void_p(work.data_ptr()),
            ctypes.c_void_p(None if preact is None else preact.data_ptr()),
            ctypes.byref(channel_layout(work)),
            ctypes.byref(vector(mean)),
            ctypes.byref(vector(var)),
            ctypes.byref(vector(weight)),
            ctypes.byref(vector(bias)),
            ctypes.c_double(eps),
            act,
            ctypes.c_double(param),
        )
    )
    result["y"] = work
    kept = preact if preact is not None else work
    dy_in = in_layout(dy, layout)
    sum_dz, sum_dz_xhat = torch.full((c,), float("nan"), dtype=acc), torch.full((c,), float("nan"), dtype=acc)
    check(
        emu.emu_backward_reduce(
            code,
            ctypes.c_void_p(kept.data_ptr()),
            ctypes.c_void_p(dy_in.data_ptr()),
            ctypes.byref(channel_layout(kept)),
            ctypes.byref(vector(weight)),
            ctypes.byref(vector(bias)),
            ctypes.c_double(eps),
            act,
            ctypes.c_double(param),
            ctypes.c_void_p(sum_dz.data_ptr()),
            ctypes.c_void_p(sum_dz_xhat.data_ptr()),
        )
    )
    result.update(sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
    if layout in DENSE:
        dx = in_layout(torch.full_like(x, float("nan")), layout)
        sums = (sum_dz, sum_dz_xhat) if training else (None, None)
        check(
            emu.emu_backward_input(
                code,
                ctypes.c_void_p(kept.data_ptr()),
                ctypes.c_void_p(dy_in.data_ptr()),
                ctypes.c_void_p(dx.data_ptr()),
                ctypes.byref(channel_layout(kept)),
                ctypes.byref(vector(var)),
                ctypes.byref(vector(weight)),
                ctypes.byref(vector(bias)),
                ctypes.byref(vector(sums[0])),
                ctypes.byref(vector(sums[1])),
                ctypes.c_int64(count),
                ctypes.c_double(eps),
                act,
                ctypes.c_double(param),
            )
        )
        result["dx"] = dx
    return result


def random_case(shape, dtype, param_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    c = shape[1]

    def randn(*size):
        return torch.randn(*size, dtype=torch.float64, generator=generator)

    x = (randn(*shape) * 2 + 0.5).to(dtype)
    sign = torch.where(randn(c) < -0.5, -1.0, 1.0)
    weight = (sign * (randn(c).abs() * 0.5 + 0.5)).to(param_dtype)
    bias = (randn(c) * 0.5).to(param_dtype)
    running_mean = randn(c).to(param_dtype)
    running_var = (randn(c).abs() + 0.5).to(param_dtype)
    dy = randn(*shape).to(dtype)
    return x, weight, bias, running_mean, running_var, dy


def check_against_oracle(result, x, weight, bias, running_mean, running_var, training, activation, param, dy):
    dtype = x.dtype
    expected = reference(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, activation, param, dy)
    if training:
        x64 = x.double().transpose(0, 1).reshape(x.size(1), -1)
        assert_close(result["mean"], x64.mean(1), dtype, "mean")
        assert_close(result["var"], x64.var(1, unbiased=False), dtype, "var")
    assert_close(result["y"], expected.y, dtype, "output")
    assert_close(result["sum_dz"], expected.dbias, dtype, "sum_dz", factor=4)
    dweight = torch.where(weight < 0, -result["sum_dz_xhat"], result["sum_dz_xhat"])
    assert_close(dweight, expected.dweight, dtype, "sum_dz_xhat", factor=4)
    if "dx" in result:
        assert_close(result["dx"], expected.dx, dtype, "input gradient", factor=2)


ACTIVATIONS = [("leaky_relu", 0.1), ("elu", 0.7), ("identity", 0.0), ("relu", 0.0)]


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_emulated_kernels_match_oracle(emu, dtype, layout, activation, param):
    """Both modes; (3, 5, 6, 7) has planes of 42 values, not a multiple of any vector width."""
    setup(emu, 8, seed=hash((str(dtype), layout, activation)) % 1000)
    for training in (True, False):
        x, weight, bias, running_mean, running_var, dy = random_case((3, 5, 6, 7), dtype)
        result = run_emulated(emu, x, weight, bias, running_mean, running_var, training, activation, param, dy, layout)
        check_against_oracle(result, x, weight, bias, running_mean, running_var, training, activation, param, dy)


# Shapes and "device sizes" (blocks per wave) that take every branch of the work split: one channel
# split over many blocks (finished by a second kernel), many channels, planes and rows shorter than
# a vector or than a block, vectors crossing plane boundaries, element tails.
SPLITS = [
    ((2, 1), 1),
    ((1, 1, 2), 64),
    ((5, 1, 4099), 64),
    ((5, 1, 4099), 1),
    ((3, 40, 3), 8),
    ((4, 24, 64), 64),
    ((2, 3, 1000), 16),
    ((600, 3), 32),
    ((9, 5, 1, 1), 8),
    ((2, 8, 17, 16), 32),
    ((3, 70, 5), 4),
    # channels_last element-wise passes of several steps per thread: the grid is a multiple of
    # C / gcd(C, 256 * V) blocks (3 for C = 24; 35 for C = 70, more than the wave)
    ((16, 24, 40), 4),
    ((6, 70, 50), 8),
]


@pytest.mark.parametrize("shape,wave", SPLITS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_work_split(emu, shape, wave, layout, dtype):
    setup(emu, wave)
    x, weight, bias, _, _, dy = random_case(shape, dtype, param_dtype=torch.float32, seed=1)
    x = x * 3 + 1
    result = run_emulated(emu, x, weight, bias, None, None, True, "leaky_relu", 0.2, dy, layout)
    check_against_oracle(result, x, weight, bias, None, None, True, "leaky_relu", 0.2, dy)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_mixed_precision(emu, x_dtype):
    """16-bit input, float32 parameters and statistics; float64 and bfloat16 parameters too."""
    setup(emu, 8)
    for param_dtype in (torch.float32, torch.float64, torch.bfloat16):
        x, weight, bias, running_mean, running_var, dy = random_case((4, 6, 5, 8), x_dtype, param_dtype=param_dtype)
        for training in (True, False):
            result = run_emulated(
                emu, x, weight, bias, running_mean, running_var, training, "elu", 1.0, dy, "channels_last"
            )
            check_against_oracle(result, x, weight, bias, running_mean, running_var, training, "elu", 1.0, dy)


def test_emulated_statistics_with_large_offset(emu):
    """The shifted one-pass sums keep the variance of values with a large offset."""
    setup(emu, 16)
    x = torch.randn(4, 2, 3000, dtype=torch.float64) * 0.01 + 1000
    for values in (x.float(), channels_last(x.float())):
        mean = torch.empty(2)
        var = torch.empty(2)
        check(
            emu.emu_statistics(
                0,
                ctypes.c_void_p(values.data_ptr()),
                ctypes.byref(channel_layout(values)),
                ctypes.c_void_p(mean.data_ptr()),
                ctypes.c_void_p(var.data_ptr()),
            )
        )
        expected = values.double().var(dim=(0, 2), unbiased=False)
        assert ((var.double() - expected).abs() <= 1e-3 * expected).all(), (var, expected)


@pytest.mark.parametrize(
    "order,seed", [(FIXED, 0), (REVERSED, 0), (SHUFFLED, 1), (SHUFFLED, 2), (SHUFFLED, 3)], ids=str
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned", "channels_last_slice"])
def test_emulated_schedules(emu, order, seed, layout):
    """Threads and blocks in launch order, reversed, and shuffled with several seeds: the results
    must not depend on the order (a missing barrier, or a block that reads another's output, would)."""
    setup(emu, 16, order, seed)
    for dtype, shape in ((torch.float32, (3, 40, 33)), (torch.bfloat16, (6, 16, 5, 7))):
        x, weight, bias, _, _, dy = random_case(shape, dtype, param_dtype=torch.float32, seed=seed)
        result = run_emulated(emu, x, weight, bias, None, None, True, "elu", 0.5, dy, layout)
        check_against_oracle(result, x, weight, bias, None, None, True, "elu", 0.5, dy)


# Real GPUs' waves (SMs x resident blocks) on shapes large enough to be split over many blocks
# per channel (and channels_last rows over many ranges): the work splits of an H100, H200, B200.
REAL_WAVES = [
    ((4, 3, 24000), H100),
    ((2, 2, 40000), H200),
    ((40000, 8), B200),
    ((8, 48, 1000), H100),
]


@pytest.mark.parametrize("shape,wave", REAL_WAVES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_real_gpu_waves(emu, shape, wave, layout):
    setup(emu, wave, seed=wave)
    x, weight, bias, _, _, dy = random_case(shape, torch.float32, seed=2)
    result = run_emulated(emu, x, weight, bias, None, None, True, "leaky_relu", 0.1, dy, layout)
    check_against_oracle(result, x, weight, bias, None, None, True, "leaky_relu", 0.1, dy)


def emulated_statistics(emu, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    mean = torch.full((values.size(1),), 7.0, dtype=acc)
    var = torch.full((values.size(1),), 7.0, dtype=acc)
    check(
        emu.emu_statistics(
            DTYPE_CODES[values.dtype],
            ctypes.c_void_p(values.data_ptr()),
            ctypes.byref(channel_layout(values)),
            ctypes.c_void_p(mean.data_ptr()),
            ctypes.c_void_p(var.data_ptr()),
        )
    )
    return mean, var


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_emulated_statistics_of_no_values_are_nan(emu, shape, dtype):
    """C > 0 and N * S == 0: mean and variance NaN, as torch's (torch.var_mean over nothing)."""
    setup(emu, 8)
    mean, var = emulated_statistics(emu, torch.empty(shape, dtype=dtype))
    assert mean.isnan().all() and var.isnan().all(), (mean, var)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_statistics_accuracy(emu, layout):
    """float32 inputs far from zero or of huge magnitude: the variance within 1e-5 (relative) of the
    float64 variance of the same float32 values, finite where the values' moments are finite
    (a constant 1e36 channel, standard deviations of 5e17), also when split over many blocks."""
    setup(emu, H100)
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(8, 4, 64, 64, dtype=torch.float64, generator=generator)
    scales = torch.tensor([1e-2, 1.0, 5e17, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
    offsets = torch.tensor([1e4, -3e6, 0.0, 1e36], dtype=torch.float64).view(1, 4, 1, 1)
    values = (base * scales + offsets).float()
    if layout == "channels_last":
        values = channels_last(values)
    mean, var = emulated_statistics(emu, values)
    exact = values.double().transpose(0, 1).reshape(4, -1)
    expected_mean, expected_var = exact.mean(1), exact.var(1, unbiased=False)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all(), (mean, var)
    assert ((mean.double() - expected_mean).abs() <= 1e-6 * expected_mean.abs() + 1e-6 * expected_var.sqrt()).all()
    assert ((var.double() - expected_var).abs() <= 1e-5 * expected_var).all(), (var, expected_var)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_output_exact_for_a_mean_far_from_zero(emu, layout):
    """Mean 1e4 and std 1e-2 in float32: the kernels centre x on the batch mean before scaling, so the output
    is (x - mean) / std up to float32 rounding of the scale and product (x - mean is exact here), given the mean they
    computed. x * scale + (bias - mean * scale) would be off by ~0.03 (its shift, ~1e6, rounds to 0.06)."""
    setup(emu, 16)
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=generator) * 1e-2 + 1e4).float()
    weight, bias = torch.ones(3), torch.zeros(3)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    dy = torch.randn(x.shape, generator=generator)
    result = run_emulated(emu, x, weight, bias, running_mean, running_var, True, "identity", 0.0, dy, layout)
    mean, var = result["mean"].double().view(1, 3, 1, 1), result["var"].double().view(1, 3, 1, 1)
    expected = (x.double() - mean) / torch.sqrt(var + 1e-5)
    error = (result["y"].double() - expected).abs().max().item()
    assert error <= 1e-4, f"output error {error:.3g}"


# ---------------------------------------------------------------------------------------------
# train_forward / train_backward: the unsynchronized training step in one call each (what the CUDA
# operators train_forward_ / train_backward launch), against the oracle, outputs poisoned.


def run_emulated_train(emu, x, weight, bias, running_mean, running_var, momentum, activation, param, dy, layout):
    """train_forward then train_backward (dense layouts) on copies; returns y, var, the updated running
    statistics, dx, dweight and dbias (those last two in the parameters' dtypes, else the accumulate type)."""
    code, act = DTYPE_CODES[x.dtype], ACTIVATION_CODES[activation]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.size(1)
    work = in_layout(x, layout)
    running_mean = None if running_mean is None else running_mean.clone()
    running_var = None if running_var is None else running_var.clone()
    var = torch.full((c,), float("nan"), dtype=acc)
    preact = in_layout(torch.full_like(x, float("nan")), layout) if activation == "relu" else None
    check(
        emu.emu_train_forward(
            code,
            ctypes.c_void_p(work.data_ptr()),
            ctypes.c_void_p(None if preact is None else preact.data_ptr()),
            ctypes.byref(channel_layout(work)),
            ctypes.byref(vector(weight)),
            ctypes.byref(vector(bias)),
            ctypes.byref(vector(running_mean)),  # ChannelOutput has ChannelVector's layout
            ctypes.byref(vector(running_var)),
            ctypes.c_double(momentum),
            ctypes.c_double(1e-5),
            act,
            ctypes.c_double(param),
            ctypes.c_void_p(var.data_ptr()),
        )
    )
    result = {"y": work, "var": var, "running_mean": running_mean, "running_var": running_var}
    if layout not in DENSE:
        return result
    kept = preact if preact is not None else work
    dy_in = in_layout(dy, layout)
    dx = in_layout(torch.full_like(x, float("nan")), layout)
    dweight = torch.full((c,), float("nan"), dtype=acc if weight is None else weight.dtype)
    dbias = torch.full((c,), float("nan"), dtype=acc if bias is None else bias.dtype)
    check(
        emu.emu_train_backward(
            code,
            ctypes.c_void_p(kept.data_ptr()),
            ctypes.c_void_p(dy_in.data_ptr()),
            ctypes.c_void_p(dx.data_ptr()),
            ctypes.byref(channel_layout(kept)),
            ctypes.byref(vector(var)),
            ctypes.byref(vector(weight)),
            ctypes.byref(vector(bias)),
            ctypes.c_double(1e-5),
            act,
            ctypes.c_double(param),
            ctypes.byref(vector(dweight)),
            ctypes.byref(vector(dbias)),
        )
    )
    result.update(dx=dx, dweight=dweight, dbias=dbias)
    return result


def check_train_against_oracle(result, x, weight, bias, running_mean, running_var, momentum, activation, param, dy):
    dtype = x.dtype
    expected = reference(x, weight, bias, running_mean, running_var, True, momentum, 1e-5, activation, param, dy)
    x64 = x.double().transpose(0, 1).reshape(x.size(1), -1)
    assert_close(result["y"], expected.y, dtype, "output")
    assert_close(result["var"], x64.var(1, unbiased=False), dtype, "var")
    if running_mean is not None:
        assert result["running_mean"].dtype == running_mean.dtype and result["running_var"].dtype == running_var.dtype
        coarser = max(dtype, running_mean.dtype, key=_coarseness)  # the values are rounded to both
        assert_close(result["running_mean"], expected.running_mean, coarser, "running_mean")
        assert_close(result["running_var"], expected.running_var, coarser, "running_var")
    if "dx" in result:
        assert_close(result["dx"], expected.dx, dtype, "input gradient", factor=2)
        # Without weight / bias the outputs are the sums themselves: the oracle's gradients of ones / zeros.
        full = reference(
            x,
            weight if weight is not None else torch.ones(x.size(1), dtype=torch.float64),
            bias if bias is not None else torch.zeros(x.size(1), dtype=torch.float64),
            running_mean,
            running_var,
            True,
            momentum,
            1e-5,
            activation,
            param,
            dy,
        )
        for name in ("dweight", "dbias"):
            coarser = max(dtype, result[name].dtype, key=_coarseness)
            assert_close(result[name], getattr(full, name), coarser, name, factor=4)


def _coarseness(dtype: torch.dtype) -> float:
    return {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_emulated_train_step_matches_oracle(emu, dtype, layout, activation, param):
    """The fused training step: output, variance, running statistics (momentum 0.3), dx, dweight, dbias."""
    setup(emu, 8, seed=hash((str(dtype), layout, activation, "train")) % 1000)
    x, weight, bias, running_mean, running_var, dy = random_case((3, 5, 6, 7), dtype, seed=4)
    result = run_emulated_train(emu, x, weight, bias, running_mean, running_var, 0.3, activation, param, dy, layout)
    check_train_against_oracle(result, x, weight, bias, running_mean, running_var, 0.3, activation, param, dy)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_emulated_train_step_parameter_dtypes(emu, x_dtype, param_dtype):
    """Parameters and running statistics in another dtype than x: each output in its own tensor's dtype."""
    setup(emu, 8)
    x, weight, bias, running_mean, running_var, dy = random_case((4, 6, 5, 8), x_dtype, param_dtype=param_dtype)
    for layout in ("contiguous", "channels_last"):
        result = run_emulated_train(emu, x, weight, bias, running_mean, running_var, 1 / 3, "elu", 1.0, dy, layout)
        assert result["dweight"].dtype == param_dtype and result["dbias"].dtype == param_dtype
        check_train_against_oracle(result, x, weight, bias, running_mean, running_var, 1 / 3, "elu", 1.0, dy)


@pytest.mark.parametrize("shape,wave", SPLITS[:6] + REAL_WAVES[:1], ids=str)
def test_emulated_train_step_work_split(emu, shape, wave):
    """No weight, bias or running statistics; shapes and waves that split the reductions over many blocks."""
    setup(emu, wave)
    x, _, _, _, _, dy = random_case(shape, torch.float32, seed=6)
    for layout in ("contiguous", "channels_last"):
        result = run_emulated_train(emu, x, None, None, None, None, 0.1, "leaky_relu", 0.05, dy, layout)
        assert result["dweight"].dtype == torch.float32
        check_train_against_oracle(result, x, None, None, None, None, 0.1, "leaky_relu", 0.05, dy)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0)], ids=str)
def test_emulated_train_step_of_an_empty_batch(emu, shape):
    """No values: the running statistics stay as they are (torch's batch_norm), the variance is NaN, and
    the parameters' gradients are zero."""
    setup(emu, 8)
    x = torch.empty(shape)
    running_mean, running_var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.25, 3.0])
    result = run_emulated_train(
        emu, x, torch.ones(3), torch.zeros(3), running_mean, running_var, 0.1, "leaky_relu", 0.1, x, "contiguous"
    )
    assert torch.equal(result["running_mean"], running_mean) and torch.equal(result["running_var"], running_var)
    assert result["var"].isnan().all()
    assert torch.equal(result["dweight"], torch.zeros(3)) and torch.equal(result["dbias"], torch.zeros(3))
