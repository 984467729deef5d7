"""Finds and loads the native kernel libraries shipped next to this file, and explains failures.

torch is imported first (its libraries must be loaded before ours resolve their symbols). On
Windows, torch's lib folder and this package's folder are added to the DLL search path (Python
>= 3.8 ignores PATH for the dependencies of a DLL); the handles are kept, PATH is never changed,
and libraries are only ever loaded by absolute path from this package's folder.

The CPU library is always loaded. The CUDA library is loaded only when torch is a CUDA build of
the same CUDA major as the library; whether a GPU's architecture is covered is checked the first
time a tensor on that GPU reaches the kernels (checking at import would initialize CUDA).

A library that fails to load never breaks `import inplace_abn`: the affected devices fall back to
the pure-PyTorch reference implementation, with one warning that names torch's version and CUDA
version, what the binary was built for, the likely cause and the fix. `python -m inplace_abn
doctor` shows the same diagnosis.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
DISABLE_ENV = "INPLACE_ABN_DISABLE_NATIVE"
# Testing aid: skip the DLL-directory step on Windows, to show the failure it prevents.
SKIP_DLL_DIRECTORIES_ENV = "INPLACE_ABN_SKIP_DLL_DIRECTORIES"
OLDEST_TORCH = (2, 10)
VC_REDIST_URL = "https://aka.ms/vs/17/release/vc_redist.x64.exe"


@dataclass
class Problem:
    """Something that keeps (part of) the native kernels from working, and what to do about it."""

    severity: str  # "error": kernels a user needs are unavailable; "warning": degraded or surprising
    summary: str
    cause: str
    fix: str

    def message(self) -> str:
        return f"{self.summary}. Cause: {self.cause}. Fix: {self.fix}"


@dataclass
class LibraryStatus:
    """What happened when loading one native library."""

    name: str
    path: str | None = None
    loaded: bool = False
    problem: Problem | None = None


@dataclass
class NativeStatus:
    """Outcome of loading the native libraries, for the operators and for `doctor`."""

    libraries: dict[str, LibraryStatus] = field(default_factory=dict)
    dll_directories: list[str] = field(default_factory=list)
    build_info: dict[str, Any] = field(default_factory=dict)
    torch_version: str = ""
    torch_cuda: str | None = None

    def problems(self) -> list[Problem]:
        return [lib.problem for lib in self.libraries.values() if lib.problem is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Environment:
    """What the loader looks at, injectable so that tests can drive every path."""

    package_dir: Path = PACKAGE_DIR
    platform: str = sys.platform
    torch_version: str = torch.__version__
    torch_cuda: str | None = torch.version.cuda
    torch_lib_dir: Path = Path(torch.__file__).resolve().parent / "lib"
    load_library: Callable[[str], None] = torch.ops.load_library
    add_dll_directory: Callable[[str], Any] | None = field(
        default_factory=lambda: getattr(os, "add_dll_directory", None)
    )
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)


_status: NativeStatus | None = None
_dll_handles: list[Any] = []  # os.add_dll_directory handles: the directories stay while they live
_covered_devices: dict[int, bool] = {}
_warned: set[str] = set()


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _major(cuda_version: str | None) -> str | None:
    return cuda_version.split(".")[0] if cuda_version else None


def library_filename(name: str, platform: str = sys.platform) -> str:
    return f"inplace_abn_{name}" + (".dll" if platform == "win32" else ".so")


def read_build_info(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """What the binaries were built for (written by the build next to the libraries)."""
    try:
        return json.loads((package_dir / "build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _torch_description(env: Environment) -> str:
    return f"torch {env.torch_version} (CUDA {env.torch_cuda or 'none: a CPU-only build'})"


def _built_for(build_info: dict[str, Any], name: str) -> str:
    text = f"torch >= {build_info.get('torch_target', '2.10')}"
    cuda = build_info.get("cuda")
    if name == "cuda" and isinstance(cuda, dict):
        text += f", CUDA {cuda.get('version')}"
    return text


def diagnose_load_error(error: BaseException, name: str, path: Path, env: Environment, build_info: dict) -> Problem:
    """Turns a failed load of the library `name` into a cause and a fix."""
    # torch.ops.load_library re-raises the loader's error as "Could not load this library: <path>":
    # the system's reason (and the Windows error code) is on the chain of causes.
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    text = "; ".join(str(e) for e in reversed(chain) if str(e))
    winerror = next((e.winerror for e in chain if getattr(e, "winerror", None)), None)
    if winerror is None:
        match = re.search(r"\[WinError (\d+)\]", text)
        winerror = int(match.group(1)) if match else None
    summary = (
        f"the native {name.upper()} library {path.name} could not be loaded ({text.strip()}); "
        f"{_torch_description(env)}, library built for {_built_for(build_info, name)}"
    )
    reinstall = "pip install --force-reinstall --no-deps inplace-abn (the variant matching torch, see the README)"
    # ctypes reports error 126 as a FileNotFoundError without a winerror: "Could not find module '<path>'
    # (or one of its dependencies)".
    missing = ("cannot open shared object file", "No such file", "(or one of its dependencies)")
    if winerror == 126 or any(marker in text for marker in missing):
        cause = (
            "a DLL it depends on was not found: torch's DLLs (torch is imported first and its lib folder added to "
            "the DLL search path, so a broken torch install or a CUDA library loaded under a CPU-only torch), or "
            "the Microsoft Visual C++ runtime"
        )
        fix = f"reinstall torch, install the latest Visual C++ redistributable ({VC_REDIST_URL}), then {reinstall}"
    elif winerror == 127 or "undefined symbol" in text or "procedure could not be found" in text:
        cause = (
            "a function it needs is missing from torch's libraries: torch is older than the library was built for, "
            "or the library is not from this package's build"
        )
        fix = f"upgrade torch to >= {build_info.get('torch_target', '2.10')}, then {reinstall}"
    elif winerror == 1114:
        cause = "a DLL's initialization failed, most often an outdated Microsoft Visual C++ runtime"
        fix = f"install the latest Visual C++ redistributable ({VC_REDIST_URL}) and restart Python"
    elif winerror == 4551 or "Application Control policy has blocked" in text:
        cause = (
            "Windows' application control blocked the DLL (error 4551): Smart App Control or an App Control for "
            "Business (WDAC) policy, which refuse DLLs without a trusted signature"
        )
        fix = (
            "ask the administrator to allow the DLL (or this environment's folder) in the App Control policy; on a "
            "personal PC, Smart App Control can be turned off in Windows Security > App & browser control; meanwhile "
            "the pure-PyTorch fallback works"
        )
    elif winerror == 1455 or "paging file is too small" in text:
        cause = (
            "Windows ran out of commit memory (error 1455): each process that loads torch's CUDA DLLs reserves "
            "gigabytes, typically many DataLoader worker processes at once, and the paging file cannot back them"
        )
        fix = (
            "enlarge the paging file (System > About > Advanced system settings > Performance > Virtual memory: "
            "system managed, on a drive with free space) and restart, or use fewer DataLoader workers (num_workers)"
        )
    else:
        cause = "unexpected loader error"
        fix = f"{reinstall}; if it persists, report `python -m inplace_abn doctor --json`"
    return Problem("error", summary, cause, fix)


def _add_dll_directories(env: Environment, status: NativeStatus) -> None:
    if env.platform != "win32" or env.environ.get(SKIP_DLL_DIRECTORIES_ENV, "") not in ("", "0"):
        return
    if env.add_dll_directory is None:
        return
    for folder in (env.torch_lib_dir, env.package_dir):
        if Path(folder).is_dir():
            _dll_handles.append(env.add_dll_directory(str(folder)))
            status.dll_directories.append(str(folder))


def _load(name: str, env: Environment, status: NativeStatus) -> LibraryStatus:
    lib = LibraryStatus(name)
    path = env.package_dir / library_filename(name, env.platform)
    lib.path = str(path)
    try:
        env.load_library(str(path))
        lib.loaded = True
    except (OSError, RuntimeError) as error:
        lib.problem = diagnose_load_error(error, name, path, env, status.build_info)
    return lib


def load_native(env: Environment) -> NativeStatus:
    """Loads the native libraries for `env` and returns what happened (no warnings issued)."""
    status = NativeStatus(
        build_info=read_build_info(env.package_dir), torch_version=env.torch_version, torch_cuda=env.torch_cuda
    )
    if env.environ.get(DISABLE_ENV, "") not in ("", "0"):
        problem = Problem(
            "warning", "the native kernels are disabled", f"{DISABLE_ENV}=1 is set", f"unset {DISABLE_ENV}"
        )
        status.libraries["cpu"] = LibraryStatus("cpu", problem=problem)
        return status
    cpu_path = env.package_dir / library_filename("cpu", env.platform)
    if not cpu_path.exists():
        status.libraries["cpu"] = LibraryStatus(
            "cpu",
            str(cpu_path),
            problem=Problem(
                "error",
                f"the native CPU library is not installed ({cpu_path.name} is not in {env.package_dir})",
                "a source checkout on sys.path, or an incomplete install",
                "pip install inplace-abn (a prebuilt wheel), or build it: pip install --no-build-isolation . "
                "in an environment that has torch",
            ),
        )
        return status
    if _version_tuple(env.torch_version) < OLDEST_TORCH:
        oldest = ".".join(map(str, OLDEST_TORCH))
        status.libraries["cpu"] = LibraryStatus(
            "cpu",
            str(cpu_path),
            problem=Problem(
                "error",
                f"{_torch_description(env)} is older than torch {oldest}, the oldest the native kernels load in",
                f"the kernels use torch's stable C ABI as of torch {oldest}",
                f"pip install --upgrade 'torch>={oldest}'",
            ),
        )
        return status
    _add_dll_directories(env, status)
    status.libraries["cpu"] = _load("cpu", env, status)
    if not status.libraries["cpu"].loaded:
        return status

    cuda_path = env.package_dir / library_filename("cuda", env.platform)
    cuda_info = status.build_info.get("cuda")
    if not cuda_path.exists():
        return status
    built = cuda_info.get("version") if isinstance(cuda_info, dict) else None
    if env.torch_cuda is None:
        status.libraries["cuda"] = LibraryStatus(
            "cuda",
            str(cuda_path),
            problem=Problem(
                "warning",
                f"this inplace-abn has CUDA kernels (CUDA {built}) but {_torch_description(env)}: "
                "using the CPU kernels",
                "torch was installed without CUDA support",
                "install a CUDA build of torch (https://pytorch.org/get-started/locally/) to use the GPU, or the "
                "+cpu variant of inplace-abn to silence this warning",
            ),
        )
    elif built is not None and _major(built) != _major(env.torch_cuda):
        status.libraries["cuda"] = LibraryStatus(
            "cuda",
            str(cuda_path),
            problem=Problem(
                "error",
                f"the CUDA kernels were built for CUDA {built} but {_torch_description(env)}: GPU tensors use the "
                "slow pure-PyTorch fallback",
                f"a CUDA {_major(built)}.x build of inplace-abn with a CUDA {_major(env.torch_cuda)}.x build of torch",
                f"install the +cu{_major(env.torch_cuda)} variant of inplace-abn (see the README), or a torch "
                f"built for CUDA {_major(built)}",
            ),
        )
    else:
        status.libraries["cuda"] = _load("cuda", env, status)
    return status


FALLBACK_NOTE = "inplace_abn uses its pure-PyTorch fallback for the CPU (correct, but slower, larger temporaries)"


def load() -> NativeStatus:
    """Loads the native libraries once (warning about each problem once) and returns what happened."""
    global _status
    if _status is None:
        _status = load_native(Environment())
        for name, lib in _status.libraries.items():
            if lib.problem is not None:
                note = f" ({FALLBACK_NOTE})" if name == "cpu" else ""
                warnings.warn(f"inplace_abn: {lib.problem.message()}{note}", RuntimeWarning, stacklevel=2)
    return _status


def gpu_is_covered(capability: tuple[int, int], cuda_info: dict[str, Any]) -> bool:
    """Whether code for `capability` is in the library: a cubin of the same major and a minor not above
    it, or PTX of an architecture not above it (compiled by the driver)."""
    major, minor = capability
    for arch in cuda_info.get("architectures", []):
        arch_major, arch_minor = divmod(int(arch), 10)
        if arch_major == major and arch_minor <= minor:
            return True
    ptx = cuda_info.get("ptx")
    return ptx is not None and divmod(int(ptx), 10) <= (major, minor)


def architecture_problem(capability: tuple[int, int], gpu_name: str, cuda_info: dict[str, Any]) -> Problem:
    covered = ", ".join(f"sm_{a}" for a in cuda_info.get("architectures", []))
    ptx = cuda_info.get("ptx")
    return Problem(
        "error",
        f"{gpu_name} (sm_{capability[0]}{capability[1]}) is not covered by the CUDA kernels: they hold code for "
        f"{covered}" + (f" and PTX for sm_{ptx}" if ptx else "") + "; tensors on it use the slow pure-PyTorch fallback",
        "the GPU is older than the oldest architecture the wheel was built for",
        "build from source for this GPU: pip install --no-build-isolation -C "
        f"cmake.define.INPLACE_ABN_CUDA_ARCHS={capability[0]}{capability[1]} .",
    )


def has_kernels_for(device: torch.device | str) -> bool:
    """Whether tensors on `device` run native kernels (else the reference implementation)."""
    device = torch.device(device)
    lib = load().libraries.get(device.type)
    if device.type == "cuda" and lib is None and "no-cuda-kernels" not in _warned:
        _warned.add("no-cuda-kernels")
        warnings.warn(
            "inplace_abn: this installation has no CUDA kernels (the +cpu variant, or built without a CUDA compiler): "
            "tensors on the GPU use the slow pure-PyTorch fallback. Fix: install the inplace-abn variant for "
            f"torch's CUDA {torch.version.cuda} (see the README), e.g. +cu{_major(torch.version.cuda)}",
            RuntimeWarning,
            stacklevel=3,
        )
    if lib is None or not lib.loaded:
        return False
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _covered_devices:
        cuda_info = load().build_info.get("cuda") or {}
        capability = torch.cuda.get_device_capability(index)
        _covered_devices[index] = gpu_is_covered(capability, cuda_info)
        if not _covered_devices[index]:
            problem = architecture_problem(capability, torch.cuda.get_device_name(index), cuda_info)
            warnings.warn(f"inplace_abn: {problem.message()}", RuntimeWarning, stacklevel=3)
    return _covered_devices[index]
