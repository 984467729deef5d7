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

BUILD_INFO = {
    "torch_target": "2.10",
    "torch_built_with": "2.13",
    "compiler": "GNU 12.2.0",
    "cuda": {"version": "13.0", "architectures": ["75", "80", "86", "89", "90", "100", "120"], "ptx": "120"},
}


class WindowsError_(OSError):
    """An OSError as Windows raises it, with a winerror code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"[WinError {code}] {text}")
        self.winerror = code


def package(tmp_path: Path, platform: str = "linux", cuda: bool = True, build_info: dict | None = None) -> Path:
    """A fake installed package folder with library files and build_info.json."""
    suffix = ".dll" if platform == "win32" else ".so"
    (tmp_path / f"inplace_abn_cpu{suffix}").write_bytes(b"")
    if cuda:
        (tmp_path / f"inplace_abn_cuda{suffix}").write_bytes(b"")
    (tmp_path / "build_info.json").write_text(json.dumps(build_info or BUILD_INFO))
    return tmp_path


def environment(tmp_path, platform="linux", torch_version="2.13.0", torch_cuda="13.0", fail=None, **kwargs):
    """An Environment whose load_library records calls, raising fail[name] for the named library."""
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
        **kwargs,
    )
    return env, loaded


def test_loads_cpu_and_matching_cuda_library(tmp_path):
    env, loaded = environment(package(tmp_path), torch_cuda="13.2")
    status = load_native(env)
    assert loaded == ["cpu", "cuda"]
    assert status.problems() == []


def test_cuda_wheel_with_cpu_only_torch_falls_back_to_cpu_kernels(tmp_path):
    env, loaded = environment(package(tmp_path), torch_version="2.13.0+cpu", torch_cuda=None)
    status = load_native(env)
    assert loaded == ["cpu"]  # the CUDA library is never loaded under a CPU-only torch
    (problem,) = status.problems()
    assert problem.severity == "warning"
    text = problem.message()
    assert "CUDA 13.0" in text and "torch 2.13.0+cpu (CUDA none: a CPU-only build)" in text
    assert "using the CPU kernels" in text and "+cpu variant" in text


def test_cuda_major_mismatch_is_not_loaded(tmp_path):
    env, loaded = environment(package(tmp_path), torch_version="2.12.0+cu128", torch_cuda="12.8")
    status = load_native(env)
    assert loaded == ["cpu"]
    (problem,) = status.problems()
    assert problem.severity == "error"
    text = problem.message()
    assert "built for CUDA 13.0 but torch 2.12.0+cu128 (CUDA 12.8)" in text
    assert "install the +cu12 variant" in text


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
        package(tmp_path, "win32", cuda=False),
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
    env, _ = environment(package(tmp_path, "win32", cuda=False), platform="win32", fail={"cpu": cause})
    (problem,) = load_native(env).problems()
    assert "a DLL it depends on was not found" in problem.cause and "vc_redist" in problem.fix
    assert "(or one of its dependencies)" in problem.message()


def test_windows_dll_directories_are_added_and_kept(tmp_path):
    (tmp_path / "torch_lib").mkdir()
    handles: list[str] = []
    env, loaded = environment(package(tmp_path, "win32"), platform="win32", add_dll_directory=handles.append)
    path_before = os.environ.get("PATH")
    status = load_native(env)
    assert loaded == ["cpu", "cuda"]
    assert status.dll_directories == [str(tmp_path / "torch_lib"), str(tmp_path)]
    assert os.environ.get("PATH") == path_before  # PATH is never changed
    env_skip, _ = environment(package(tmp_path, "win32"), platform="win32", add_dll_directory=handles.append)
    env_skip.environ = {_native.SKIP_DLL_DIRECTORIES_ENV: "1"}
    assert load_native(env_skip).dll_directories == []


def test_linux_undefined_symbol_is_an_abi_mismatch(tmp_path):
    error = OSError("inplace_abn_cpu.so: undefined symbol: torch_parallel_for")
    env, _ = environment(package(tmp_path, cuda=False), torch_version="2.10.0", fail={"cpu": error})
    (problem,) = load_native(env).problems()
    assert "undefined symbol: torch_parallel_for" in problem.summary
    assert "torch is older than the library was built for" in problem.cause


def test_cuda_library_failure_keeps_cpu_kernels(tmp_path):
    error = OSError("libcudart.so.13: cannot open shared object file: No such file or directory")
    env, loaded = environment(package(tmp_path), fail={"cuda": error})
    status = load_native(env)
    assert loaded == ["cpu"] and status.libraries["cpu"].loaded and not status.libraries["cuda"].loaded
    (problem,) = status.problems()
    assert "CUDA library inplace_abn_cuda.so could not be loaded" in problem.summary
    assert "library built for torch >= 2.10, CUDA 13.0" in problem.summary


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
    assert gpu_is_covered(capability, BUILD_INFO["cuda"]) is covered


def test_uncovered_gpu_message_lists_what_is_covered():
    problem = _native.architecture_problem((7, 0), "Tesla V100", BUILD_INFO["cuda"])
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


def test_doctor_exits_non_zero_when_broken(tmp_path):
    """A broken install (library file that cannot load) makes doctor fail, naming the cause."""
    script = (
        "import sys, inplace_abn._native as n\n"
        "n._status = n.load_native(n.Environment(load_library=lambda p: (_ for _ in ()).throw("
        "OSError(p + ': undefined symbol: aoti_torch_dtype_float32'))))\n"
        "from inplace_abn.doctor import main\n"
        "sys.exit(main([]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "ERROR: the native CPU library inplace_abn_cpu" in run.stdout
    assert "undefined symbol: aoti_torch_dtype_float32" in run.stdout and "fix:" in run.stdout


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
        package(tmp_path, "win32", cuda=False), platform="win32", fail={"cpu": WindowsError_(code, text)}
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
