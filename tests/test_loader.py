"""The loader: every failure path gives a message naming torch's version and CUDA version, what the
binary was built for, the cause and the fix. Platforms and the library loader are faked, so the
Windows paths run here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inplace_abn import _native
from inplace_abn._native import Environment, gpu_is_covered, load_native

ARCHS = ["75", "80", "86", "89", "90", "100", "120"]
BUILD_INFO = {
    "torch_target": "2.10",
    "torch_built_with": "2.13",
    "compiler": "GNU 12.2.0",
    "cuda_libraries": {
        "12": {"version": "12.9", "torch_cuda": "12.6", "architectures": ARCHS, "ptx": "120"},
        "13": {"version": "13.0", "torch_cuda": "13.0", "architectures": ARCHS, "ptx": "120"},
    },
}


class WindowsError_(OSError):
    """An OSError as Windows raises it, with a winerror code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"[WinError {code}] {text}")
        self.winerror = code


def package(tmp_path: Path, platform: str = "linux", cuda: tuple[str, ...] = ("12", "13")) -> Path:
    """A fake installed package folder: the CPU library, the CUDA libraries of the majors `cuda`, and a
    build_info.json listing them."""
    suffix = ".dll" if platform == "win32" else ".so"
    (tmp_path / f"inplace_abn_cpu{suffix}").write_bytes(b"")
    for major in cuda:
        (tmp_path / f"inplace_abn_cuda{major}{suffix}").write_bytes(b"")
    info = dict(BUILD_INFO, cuda_libraries={m: BUILD_INFO["cuda_libraries"][m] for m in cuda})
    (tmp_path / "build_info.json").write_text(json.dumps(info))
    return tmp_path


def environment(
    tmp_path, platform="linux", torch_version="2.13.0", torch_cuda="13.0", fail=None, distributions=None, **kwargs
):
    """An Environment whose load_library records calls, raising fail[name] for the named library;
    `distributions` ({name: version}) are the installed distributions it sees."""
    loaded: list[str] = []

    def load_library(path: str) -> None:
        name = Path(path).stem.removeprefix("inplace_abn_")
        if fail and name in fail:  # wrapped as torch.ops.load_library does
            raise OSError(f"Could not load this library: {path}") from fail[name]
        loaded.append(name)

    env = Environment(
        package_dir=tmp_path,
        platform=platform,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        torch_lib_dir=tmp_path / "torch_lib",
        load_library=load_library,
        environ={},
        distribution_version=(distributions or {}).get,
        **kwargs,
    )
    return env, loaded


@pytest.mark.parametrize(
    "torch_version,torch_cuda,chosen",
    [
        ("2.10.0+cu128", "12.8", "cuda12"),
        ("2.12.0+cu126", "12.6", "cuda12"),
        ("2.14.1+cu130", "13.0", "cuda13"),
        ("2.15.0+cu132", "13.2", "cuda13"),
    ],
)
def test_loads_the_cuda_library_of_torchs_cuda_major(tmp_path, torch_version, torch_cuda, chosen):
    env, loaded = environment(package(tmp_path), torch_version=torch_version, torch_cuda=torch_cuda)
    status = load_native(env)
    assert loaded == ["cpu", chosen]  # and never the other major's
    assert status.problems() == []
    cuda = status.libraries["cuda"]
    assert cuda.name == chosen and cuda.loaded and cuda.path == str(tmp_path / f"inplace_abn_{chosen}.so")
    assert status.cuda_info() == BUILD_INFO["cuda_libraries"][chosen.removeprefix("cuda")]


def test_cpu_only_torch_loads_only_the_cpu_library(tmp_path):
    env, loaded = environment(package(tmp_path), torch_version="2.13.0+cpu", torch_cuda=None)
    status = load_native(env)
    assert loaded == ["cpu"]  # a CUDA library links torch_cuda: never loaded under a CPU-only torch
    assert status.problems() == []  # the one wheel serves CPU torch too: nothing to warn about
    assert status.libraries["cuda"].note == "torch is a CPU-only build: the CUDA libraries (CUDA 12, 13) are not loaded"
    assert status.cuda_info() == {}


def test_cpu_only_build_under_cuda_torch_has_no_cuda_entry(tmp_path):
    """A build without CUDA: nothing to load, the first GPU tensor warns (has_kernels_for)."""
    env, loaded = environment(package(tmp_path, cuda=()), torch_cuda="12.8")
    status = load_native(env)
    assert loaded == ["cpu"] and "cuda" not in status.libraries and status.problems() == []


def test_unknown_future_cuda_major_is_a_clear_error(tmp_path):
    env, loaded = environment(package(tmp_path), torch_version="3.1.0+cu140", torch_cuda="14.0")
    status = load_native(env)
    assert loaded == ["cpu"]
    (problem,) = status.problems()
    assert problem.severity == "error"
    assert problem.summary == (
        "torch 3.1.0+cu140 (CUDA 14.0) is newer than every CUDA library of this inplace_abn (CUDA 12, CUDA 13): "
        "GPU tensors use the slow pure-PyTorch fallback"
    )
    assert "pip install --upgrade torch-inplace-abn" in problem.fix and "CUDA 14.x nvcc" in problem.fix
    assert status.libraries["cuda"].path == str(tmp_path / "inplace_abn_cuda14.so")


def test_missing_cuda_major_of_a_partial_build(tmp_path):
    """A build with the CUDA 13 library only (as CI builds it) under a CUDA 12 torch."""
    env, loaded = environment(package(tmp_path, cuda=("13",)), torch_version="2.10.0+cu128", torch_cuda="12.8")
    status = load_native(env)
    assert loaded == ["cpu"]  # the CUDA 13 library is not loaded under a CUDA 12 torch
    (problem,) = status.problems()
    assert problem.summary == (
        "this inplace_abn has no CUDA 12 library (inplace_abn_cuda12.so; it has CUDA 13) but torch 2.10.0+cu128 "
        "(CUDA 12.8): GPU tensors use the slow pure-PyTorch fallback"
    )
    assert problem.fix.startswith("pip install --force-reinstall torch-inplace-abn")


MAPILLARY_FIX = "pip uninstall -y inplace-abn torch-inplace-abn, then pip install torch-inplace-abn"


def test_mapillary_backend_module_in_the_package_folder(tmp_path):
    """mapillary's build leaves its compiled _backend module in inplace_abn/ (same folder as ours)."""
    backend = package(tmp_path) / "_backend.cpython-311-x86_64-linux-gnu.so"
    backend.write_bytes(b"")
    env, loaded = environment(tmp_path)
    status = load_native(env)
    assert loaded == ["cpu", "cuda13"]  # our kernels still load
    (problem,) = status.problems()
    assert problem.severity == "error"
    assert problem.summary == (
        "mapillary's inplace-abn is installed beside torch-inplace-abn (its compiled module "
        f"_backend.cpython-311-x86_64-linux-gnu.so is in {tmp_path})"
    )
    assert problem.fix == f"{MAPILLARY_FIX} (and delete {backend} if it is still there)"


def test_mapillary_distribution_metadata(tmp_path):
    env, _ = environment(package(tmp_path), distributions={"inplace-abn": "1.1.0", "torch-inplace-abn": "2.0.0"})
    (problem,) = load_native(env).problems()
    assert "mapillary's inplace-abn is installed beside torch-inplace-abn (the distribution inplace-abn 1.1.0" in (
        problem.summary
    )
    assert problem.fix == MAPILLARY_FIX
    assert "uninstalling one deletes files of the other" in problem.cause


def test_mapillary_windows_backend_pyd_is_found_even_when_native_is_disabled(tmp_path):
    (package(tmp_path, "win32") / "_backend.cp311-win_amd64.pyd").write_bytes(b"")
    env, loaded = environment(tmp_path, platform="win32")
    env.environ = {_native.DISABLE_ENV: "1"}
    status = load_native(env)
    assert loaded == [] and len(status.conflicts) == 1
    assert "_backend.cp311-win_amd64.pyd" in status.conflicts[0].summary


def test_torch_older_than_target_is_refused_before_loading(tmp_path):
    env, loaded = environment(package(tmp_path), torch_version="2.9.1", torch_cuda="12.8")
    status = load_native(env)
    assert loaded == []
    (problem,) = status.problems()
    assert "torch 2.9.1 (CUDA 12.8) is older than torch 2.10" in problem.message()
    assert "pip install --upgrade 'torch>=2.10'" in problem.fix


def test_missing_library_says_how_to_get_it(tmp_path):
    (tmp_path / "build_info.json").write_text("{}")
    env, _ = environment(tmp_path)
    (problem,) = load_native(env).problems()
    assert "inplace_abn_cpu.so is not in" in problem.summary and "--no-build-isolation" in problem.fix


@pytest.mark.parametrize(
    "code,text,cause,fix",
    [
        (126, "The specified module could not be found", "a DLL it depends on was not found", "vc_redist"),
        (
            127,
            "The specified procedure could not be found",
            "a function it needs is missing",
            "upgrade torch to >= 2.10",
        ),
        (
            1114,
            "A dynamic link library (DLL) initialization routine failed",
            "outdated Microsoft Visual C++ runtime",
            "Visual C++ redistributable",
        ),
    ],
)
def test_windows_load_errors(tmp_path, code, text, cause, fix):
    added: list[str] = []
    env, _ = environment(
        package(tmp_path, "win32", cuda=()),
        platform="win32",
        fail={"cpu": WindowsError_(code, text)},
        add_dll_directory=added.append,
    )
    (tmp_path / "torch_lib").mkdir()
    status = load_native(env)
    (problem,) = status.problems()
    message = problem.message()
    assert f"[WinError {code}]" in message and cause in message and fix in message
    assert "torch 2.13.0 (CUDA 13.0)" in message and "built for torch >= 2.10" in message
    # torch's lib folder and the package folder were added before loading
    assert added == [str(tmp_path / "torch_lib"), str(tmp_path)] == status.dll_directories


def test_windows_missing_dependency_as_ctypes_reports_it(tmp_path):
    """CPython's ctypes turns error 126 into a FileNotFoundError with no winerror (text seen under Wine)."""
    dll = tmp_path / "inplace_abn_cpu.dll"
    cause = FileNotFoundError(
        f"Could not find module '{dll}' (or one of its dependencies). Try using the full path with constructor syntax."
    )
    env, _ = environment(package(tmp_path, "win32", cuda=()), platform="win32", fail={"cpu": cause})
    (problem,) = load_native(env).problems()
    assert "a DLL it depends on was not found" in problem.cause and "vc_redist" in problem.fix
    assert "(or one of its dependencies)" in problem.message()


def test_windows_dll_directories_are_added_and_kept(tmp_path):
    (tmp_path / "torch_lib").mkdir()
    handles: list[str] = []
    env, loaded = environment(package(tmp_path, "win32"), platform="win32", add_dll_directory=handles.append)
    path_before = os.environ.get("PATH")
    status = load_native(env)
    assert loaded == ["cpu", "cuda13"]
    assert status.dll_directories == [str(tmp_path / "torch_lib"), str(tmp_path)]
    assert os.environ.get("PATH") == path_before  # PATH is never changed
    env_skip, _ = environment(package(tmp_path, "win32"), platform="win32", add_dll_directory=handles.append)
    env_skip.environ = {_native.SKIP_DLL_DIRECTORIES_ENV: "1"}
    assert load_native(env_skip).dll_directories == []


def test_linux_undefined_symbol_is_an_abi_mismatch(tmp_path):
    error = OSError("inplace_abn_cpu.so: undefined symbol: torch_parallel_for")
    env, _ = environment(package(tmp_path, cuda=()), torch_version="2.10.0", fail={"cpu": error})
    (problem,) = load_native(env).problems()
    assert "undefined symbol: torch_parallel_for" in problem.summary
    assert "torch is older than the library was built for" in problem.cause


def test_cuda_library_failure_keeps_cpu_kernels(tmp_path):
    error = OSError("libcudart.so.13: cannot open shared object file: No such file or directory")
    env, loaded = environment(package(tmp_path), fail={"cuda13": error})
    status = load_native(env)
    assert loaded == ["cpu"] and status.libraries["cpu"].loaded and not status.libraries["cuda"].loaded
    (problem,) = status.problems()
    assert "the native CUDA 13 library inplace_abn_cuda13.so could not be loaded" in problem.summary
    assert "library built for torch >= 2.10, CUDA 13.0" in problem.summary
    assert problem.fix.endswith("then pip install --force-reinstall --no-deps torch-inplace-abn")


@pytest.mark.parametrize(
    "capability,covered",
    [
        ((8, 6), True),  # sm_86 cubin
        ((8, 7), True),  # sm_86 cubin runs on 8.7 (same major, higher minor)
        ((9, 0), True),
        ((12, 1), True),  # sm_120 cubin
        ((13, 0), True),  # PTX sm_120 is compiled by the driver for newer GPUs
        ((7, 0), False),  # Volta: older than the oldest architecture
        ((6, 1), False),
    ],
)
def test_gpu_architecture_coverage(capability, covered):
    assert gpu_is_covered(capability, BUILD_INFO["cuda_libraries"]["13"]) is covered


def test_uncovered_gpu_message_lists_what_is_covered():
    problem = _native.architecture_problem((7, 0), "Tesla V100", BUILD_INFO["cuda_libraries"]["13"])
    text = problem.message()
    assert "Tesla V100 (sm_70) is not covered" in text
    assert "sm_75, sm_80, sm_86, sm_89, sm_90, sm_100, sm_120 and PTX for sm_120" in text
    assert "INPLACE_ABN_CUDA_ARCHS=70" in problem.fix


def test_import_without_torch_names_the_fix(tmp_path):
    """With torch missing, `import inplace_abn` fails with an ImportError that says what to install."""
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('No module named torch (blocked for this test)')\n")
    run = subprocess.run(
        [sys.executable, "-c", "import inplace_abn"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        timeout=120,
    )
    assert run.returncode != 0
    assert "inplace_abn needs PyTorch >= 2.10" in run.stderr and "pip install torch" in run.stderr


def test_doctor_reports_and_exits_zero_when_healthy():
    run = subprocess.run(
        [sys.executable, "-m", "inplace_abn", "doctor", "--json"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(run.stdout)
    disabled = os.environ.get(_native.DISABLE_ENV, "") not in ("", "0")
    assert report["self_test"]["cpu"] == "ok"
    assert report["libraries"]["cpu"]["loaded"] is not disabled
    assert report["inplace_abn"]["build"]["torch_target"] == "2.10"
    assert run.returncode == (1 if any(p["severity"] == "error" for p in report["problems"]) else 0)
    text = subprocess.run(
        [sys.executable, "-m", "inplace_abn", "doctor"], capture_output=True, text=True, timeout=300
    ).stdout
    assert "torch CUDA" in text and "CPU kernels" in text and "self-test     cpu: ok" in text


@pytest.mark.parametrize("cap", ["baseline", "AVX2"])
def test_doctor_reports_the_cpu_instruction_set_cap(cap):
    """INPLACE_ABN_CPU_ISA caps the kernels' instruction set; doctor shows the one in use and flags a value
    that is not a known name (ignored by the library) with the names it accepts."""
    if os.environ.get(_native.DISABLE_ENV, "") not in ("", "0"):
        pytest.skip("the native operators are disabled")
    env = dict(os.environ, INPLACE_ABN_CPU_ISA=cap)
    run = subprocess.run(
        [sys.executable, "-m", "inplace_abn", "doctor", "--json"], capture_output=True, text=True, timeout=300, env=env
    )
    report = json.loads(run.stdout)
    warnings = [p for p in report["problems"] if "INPLACE_ABN_CPU_ISA" in p["summary"]]
    if cap == "baseline":
        assert report["cpu_kernels"] == "baseline" and not warnings
    else:
        best = subprocess.run(
            [sys.executable, "-c", "import torch, inplace_abn; print(torch.ops.inplace_abn.cpu_isa())"],
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "INPLACE_ABN_CPU_ISA"},
        ).stdout.strip()
        assert report["cpu_kernels"] == best
        assert len(warnings) == 1 and "'AVX2' is not an instruction set" in warnings[0]["summary"]
        assert ", ".join(reversed(_native.read_build_info()["cpu_isas"])) in warnings[0]["fix"]


def _doctor_in(environment: str) -> subprocess.CompletedProcess:
    """Runs doctor in a fresh process whose loader status comes from `_native.Environment(<environment>)`."""
    script = (
        "import sys, inplace_abn._native as n\n"
        f"n._status = n.load_native(n.Environment({environment}))\n"
        "from inplace_abn.doctor import main\n"
        "sys.exit(main([]))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_doctor_exits_non_zero_when_broken(tmp_path):
    """A broken install (library file that cannot load) makes doctor fail, naming the cause."""
    run = _doctor_in(
        "load_library=lambda p: (_ for _ in ()).throw(OSError(p + ': undefined symbol: aoti_torch_dtype_float32'))"
    )
    assert run.returncode == 1
    assert "ERROR: the native CPU library inplace_abn_cpu" in run.stdout
    assert "undefined symbol: aoti_torch_dtype_float32" in run.stdout and "fix:" in run.stdout


def test_installed_cuda_libraries_match_build_info():
    """Every CUDA library build_info.json lists is installed, and every installed one is listed."""
    info = _native.read_build_info()
    listed = set(_native.cuda_libraries(info))
    suffix = ".dll" if sys.platform == "win32" else ".so"
    files = {p.name for p in _native.PACKAGE_DIR.glob(f"inplace_abn_cuda*{suffix}")}
    assert files == {f"inplace_abn_cuda{major}{suffix}" for major in listed}
    assert "cuda" not in info and "variant" not in info  # the schema before one wheel served every torch


def test_doctor_names_what_to_uninstall_when_mapillarys_package_is_installed():
    run = _doctor_in("distribution_version={'inplace-abn': '1.1.0'}.get")
    assert run.returncode == 1
    assert "ERROR: mapillary's inplace-abn is installed beside torch-inplace-abn" in run.stdout
    assert "  fix:   pip uninstall -y inplace-abn torch-inplace-abn, then pip install torch-inplace-abn" in run.stdout


@pytest.mark.parametrize(
    "code,text,cause,fix",
    [
        (
            4551,
            "An Application Control policy has blocked this file",
            "Smart App Control or an App Control for Business (WDAC) policy",
            "allow the DLL",
        ),
        (
            1455,
            "The paging file is too small for this operation to complete",
            "Windows ran out of commit memory",
            "enlarge the paging file",
        ),
    ],
)
def test_windows_policy_and_paging_file_errors(tmp_path, code, text, cause, fix):
    """Errors Windows users report that are not the library's fault: each gets its own cause and fix."""
    env, _ = environment(
        package(tmp_path, "win32", cuda=()), platform="win32", torch_cuda=None, fail={"cpu": WindowsError_(code, text)}
    )
    (problem,) = load_native(env).problems()
    assert f"[WinError {code}] {text}" in problem.summary
    assert cause in problem.cause and fix in problem.fix
    assert "unexpected loader error" not in problem.cause


@pytest.mark.parametrize("json_output", [False, True])
def test_doctor_survives_torch_failing_to_import(tmp_path, json_output):
    """torch installed but broken (its DLLs fail to load): `python -m inplace_abn doctor` reports it."""
    blocker = tmp_path / "torch.py"
    error = "[WinError 1114] A dynamic link library (DLL) initialization routine failed. Error loading c10.dll"
    blocker.write_text(f"raise OSError({error!r})\n")
    run = subprocess.run(
        [sys.executable, "-m", "inplace_abn", "doctor", *(["--json"] if json_output else [])],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    if json_output:
        (problem,) = json.loads(run.stdout)["problems"]
        text = " ".join(problem.values())
    else:
        text = run.stdout
        assert "torch         cannot be imported" in text
    assert f"torch cannot be imported: OSError: {error}" in text
    assert "its libraries fail to load" in text and 'python -c "import torch"' in text


def test_import_with_broken_torch_names_the_fix(tmp_path):
    """torch installed but failing with OSError: `import inplace_abn` raises an ImportError with the fix."""
    (tmp_path / "torch.py").write_text("raise OSError('[WinError 126] The specified module could not be found')\n")
    run = subprocess.run(
        [sys.executable, "-c", "import inplace_abn"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        timeout=120,
    )
    assert run.returncode != 0
    assert "ImportError: inplace_abn needs PyTorch >= 2.10" in run.stderr
    assert "[WinError 126]" in run.stderr and "its libraries fail to load" in run.stderr
