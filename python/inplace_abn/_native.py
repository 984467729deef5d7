"""Finds and loads the native kernel libraries shipped next to this file, and explains failures.

torch is imported first (its libraries must be loaded before ours resolve their symbols). On
Windows, torch's lib folder and this package's folder are added to the DLL search path (Python
>= 3.8 ignores PATH for the dependencies of a DLL); the handles are kept, PATH is never changed,
and libraries are only ever loaded by absolute path from this package's folder.

The CPU library (inplace_abn_cpu) is always loaded. A wheel also carries one CUDA library per CUDA
major (inplace_abn_cuda12, inplace_abn_cuda13): under a CUDA build of torch, the one whose major is
torch.version.cuda's is loaded, and no other; under a CPU-only torch none is (a CUDA library links
torch_cuda, which a CPU-only torch does not have). Whether a GPU's architecture is covered is checked
the first time a tensor on that GPU reaches the kernels (checking at import would initialize CUDA).

The distribution is `torch-inplace-abn`; mapillary's `inplace-abn` installs the same `inplace_abn/`
folder. Traces of it (its compiled `_backend` module in this folder, or its metadata) are reported
with the exact commands that untangle the two.

A library that fails to load never breaks `import inplace_abn`: the affected devices fall back to
the pure-PyTorch reference implementation, with one warning that names torch's version and CUDA
version, what the binary was built for, the likely cause and the fix. `python -m inplace_abn
doctor` shows the same diagnosis.
"""

from __future__ import annotations

import importlib.metadata
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
DISTRIBUTION = "torch-inplace-abn"  # this package on PyPI; the import name is inplace_abn
MAPILLARY_DISTRIBUTION = "inplace-abn"  # mapillary's original, which installs the same inplace_abn/ folder
REINSTALL = f"pip install --force-reinstall --no-deps {DISTRIBUTION}"


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

    name: str  # the file's stem without "inplace_abn_": "cpu", "cuda12", "cuda13"
    path: str | None = None
    loaded: bool = False
    problem: Problem | None = None
    note: str | None = None  # why it was not loaded, when that is expected (no problem)
    info: dict[str, Any] = field(default_factory=dict)  # its entry in build_info.json (CUDA libraries)


@dataclass
class NativeStatus:
    """Outcome of loading the native libraries, for the operators and for `doctor`."""

    libraries: dict[str, LibraryStatus] = field(default_factory=dict)
    dll_directories: list[str] = field(default_factory=list)
    build_info: dict[str, Any] = field(default_factory=dict)
    torch_version: str = ""
    torch_cuda: str | None = None
    conflicts: list[Problem] = field(default_factory=list)  # mapillary's inplace-abn in the same folder

    def problems(self) -> list[Problem]:
        return self.conflicts + [lib.problem for lib in self.libraries.values() if lib.problem is not None]

    def cuda_info(self) -> dict[str, Any]:
        """Build information of the loaded CUDA library ({} when none is loaded)."""
        lib = self.libraries.get("cuda")
        return lib.info if lib is not None and lib.loaded else {}

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
    # The version of an installed distribution, None when it is not installed.
    distribution_version: Callable[[str], str | None] = field(default_factory=lambda: _distribution_version)


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_status: NativeStatus | None = None
_dll_handles: list[Any] = []  # os.add_dll_directory handles: the directories stay while they live
_covered_devices: dict[int, bool] = {}
_warned: set[str] = set()


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _major(cuda_version: str | None) -> str | None:
    return cuda_version.split(".")[0] if cuda_version else None


def library_filename(name: str, platform: str = sys.platform, torch_cuda: str | None = torch.version.cuda) -> str:
    """The file of library `name` ("cpu", "cuda12", ...); "cuda" names the one for torch's CUDA major."""
    if name == "cuda":
        name = f"cuda{_major(torch_cuda)}"
    return f"inplace_abn_{name}" + (".dll" if platform == "win32" else ".so")


def cuda_libraries(build_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The CUDA libraries build_info.json lists, by CUDA major ({"13": {"version": "13.0", ...}})."""
    libraries = build_info.get("cuda_libraries")
    return {str(k): v for k, v in libraries.items() if isinstance(v, dict)} if isinstance(libraries, dict) else {}


def _cuda_majors_present(env: Environment, build_info: dict[str, Any]) -> list[str]:
    """CUDA majors of the CUDA library files in the package folder (and those build_info.json lists)."""
    suffix = ".dll" if env.platform == "win32" else ".so"
    found = {p.name[len("inplace_abn_cuda") : -len(suffix)] for p in env.package_dir.glob(f"inplace_abn_cuda*{suffix}")}
    found.update(cuda_libraries(build_info))
    return sorted((m for m in found if m.isdigit()), key=int)


def read_build_info(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """What the binaries were built for (written by the build next to the libraries)."""
    try:
        return json.loads((package_dir / "build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _torch_description(env: Environment) -> str:
    return f"torch {env.torch_version} (CUDA {env.torch_cuda or 'none: a CPU-only build'})"


def _label(name: str) -> str:
    """ "cpu" -> "CPU", "cuda13" -> "CUDA 13"."""
    major = name.removeprefix("cuda")
    return f"CUDA {major}" if name.startswith("cuda") and major else name.upper()


def _built_for(build_info: dict[str, Any], name: str) -> str:
    text = f"torch >= {build_info.get('torch_target', '2.10')}"
    cuda = cuda_libraries(build_info).get(name.removeprefix("cuda")) if name.startswith("cuda") else None
    if cuda:
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
        f"the native {_label(name)} library {path.name} could not be loaded ({text.strip()}); "
        f"{_torch_description(env)}, library built for {_built_for(build_info, name)}"
    )
    reinstall = REINSTALL
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
    lib = LibraryStatus(name, info=cuda_libraries(status.build_info).get(name.removeprefix("cuda"), {}))
    path = env.package_dir / library_filename(name, env.platform)
    lib.path = str(path)
    try:
        env.load_library(str(path))
        lib.loaded = True
    except (OSError, RuntimeError) as error:
        lib.problem = diagnose_load_error(error, name, path, env, status.build_info)
    return lib


def find_conflicts(env: Environment) -> list[Problem]:
    """Traces of mapillary's inplace-abn, which installs the same inplace_abn/ folder as this package:
    its compiled `_backend` module next to these files, or its distribution's metadata."""
    backend = sorted(p.name for p in env.package_dir.glob("_backend*") if p.suffix in (".so", ".pyd"))
    version = env.distribution_version(MAPILLARY_DISTRIBUTION)
    if not backend and version is None:
        return []
    found = []
    if version is not None:
        found.append(f"the distribution {MAPILLARY_DISTRIBUTION} {version} is installed")
    if backend:
        found.append(f"its compiled module {', '.join(backend)} is in {env.package_dir}")
    return [
        Problem(
            "error",
            f"mapillary's {MAPILLARY_DISTRIBUTION} is installed beside {DISTRIBUTION} ({'; '.join(found)})",
            f"both install the folder inplace_abn/: whichever was installed last overwrote the other's files, and "
            f"uninstalling one deletes files of the other ({DISTRIBUTION} is the drop-in successor, same API)",
            f"pip uninstall -y {MAPILLARY_DISTRIBUTION} {DISTRIBUTION}, then pip install {DISTRIBUTION}"
            + (
                f" (and delete {', '.join(str(env.package_dir / b) for b in backend)} if it is still there)"
                if backend
                else ""
            ),
        )
    ]


def _cuda_status(env: Environment, status: NativeStatus) -> LibraryStatus | None:
    """Loads the CUDA library of torch's CUDA major, or says why there is none (None: this build has
    no CUDA library at all, reported when a GPU tensor first needs it)."""
    present = _cuda_majors_present(env, status.build_info)
    if env.torch_cuda is None:
        if not present:
            return None
        return LibraryStatus(
            "cuda",
            note=f"torch is a CPU-only build: the CUDA libraries (CUDA {', '.join(present)}) are not loaded",
        )
    major = _major(env.torch_cuda) or ""
    name = f"cuda{major}"
    path = env.package_dir / library_filename(name, env.platform)
    if path.exists():
        return _load(name, env, status)
    if not present:
        return None
    have = ", ".join(f"CUDA {m}" for m in present)
    if int(major) > max(int(m) for m in present):
        problem = Problem(
            "error",
            f"{_torch_description(env)} is newer than every CUDA library of this inplace_abn ({have}): GPU tensors "
            "use the slow pure-PyTorch fallback",
            f"CUDA {major} came after this release of {DISTRIBUTION} was built",
            f"pip install --upgrade {DISTRIBUTION} (a newer release may carry CUDA {major} kernels), or build from "
            f"source with a CUDA {major}.x nvcc: pip install --no-build-isolation --no-binary {DISTRIBUTION} "
            f"{DISTRIBUTION}",
        )
    else:
        problem = Problem(
            "error",
            f"this inplace_abn has no CUDA {major} library ({path.name}; it has {have}) but {_torch_description(env)}: "
            "GPU tensors use the slow pure-PyTorch fallback",
            f"a build from source with another CUDA toolkit (the {DISTRIBUTION} wheels carry CUDA 12 and 13)",
            f"pip install --force-reinstall {DISTRIBUTION} (the wheel), or build from source with nvcc {major}.x",
        )
    return LibraryStatus(name, str(path), problem=problem)


def load_native(env: Environment) -> NativeStatus:
    """Loads the native libraries for `env` and returns what happened (no warnings issued)."""
    status = NativeStatus(
        build_info=read_build_info(env.package_dir), torch_version=env.torch_version, torch_cuda=env.torch_cuda
    )
    status.conflicts = find_conflicts(env)
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
                f"pip install {DISTRIBUTION} (a prebuilt wheel), or build it: pip install --no-build-isolation . "
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
    cuda = _cuda_status(env, status)
    if cuda is not None:
        status.libraries["cuda"] = cuda
    return status


FALLBACK_NOTE = "inplace_abn uses its pure-PyTorch fallback for the CPU (correct, but slower, larger temporaries)"


def load() -> NativeStatus:
    """Loads the native libraries once (warning about each problem once) and returns what happened."""
    global _status
    if _status is None:
        _status = load_native(Environment())
        for problem in _status.conflicts:
            warnings.warn(f"inplace_abn: {problem.message()}", RuntimeWarning, stacklevel=2)
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
            "inplace_abn: this installation has no CUDA kernels (built from source without a CUDA compiler): "
            "tensors on the GPU use the slow pure-PyTorch fallback. Fix: pip install --force-reinstall "
            f"{DISTRIBUTION} (the wheel carries CUDA 12 and CUDA 13 kernels), or rebuild with nvcc "
            f"{_major(torch.version.cuda)}.x on PATH",
            RuntimeWarning,
            stacklevel=3,
        )
    if lib is None or not lib.loaded:
        return False
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _covered_devices:
        cuda_info = load().cuda_info()
        capability = torch.cuda.get_device_capability(index)
        _covered_devices[index] = gpu_is_covered(capability, cuda_info)
        if not _covered_devices[index]:
            problem = architecture_problem(capability, torch.cuda.get_device_name(index), cuda_info)
            warnings.warn(f"inplace_abn: {problem.message()}", RuntimeWarning, stacklevel=3)
    return _covered_devices[index]
