"""Loader checks run by a Windows CPython under Wine (scripts/windows/wine_job.sh), one case per process.

    python checks.py loader          `import inplace_abn` with torch not yet imported: the loader adds
                                     torch's lib folder and the package folder, the CPU library loads
    python checks.py loader-skip     the same with INPLACE_ABN_SKIP_DLL_DIRECTORIES=1: what really happens
                                     when the loader's DLL-directory step is off
    python checks.py missing-dll     the failure that step guards against, for real: the library loaded the
                                     way torch.ops.load_library loads it, before torch's lib folder is on
                                     the DLL search path; then with the folders the loader adds
    python checks.py cuda-unused     the package holds a CUDA library and torch is a CPU build: the loader
                                     never loads it (nor torch_cuda.dll), and doctor notes why
    python checks.py doctor          `python -m inplace_abn doctor --json`, in a fresh process, lists the
                                     DLL folders the loader added, and finds the kernels working

Each prints what it saw and exits 0 when every check holds, 1 otherwise (the first failed check is
named). Only the standard library is imported before a case says so: the point of most cases is what
happens when torch is not imported yet.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP_ENV = "INPLACE_ABN_SKIP_DLL_DIRECTORIES"


class CheckFailed(Exception):
    pass


def check(condition: object, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"  ok: {what}")


def installed_folders() -> tuple[Path, Path]:
    """(inplace_abn's package folder, torch's lib folder) without importing either."""
    package = importlib.util.find_spec("inplace_abn")
    torch = importlib.util.find_spec("torch")
    check(package is not None and package.origin, "inplace_abn is installed")
    check(torch is not None and torch.origin, "torch is installed")
    return Path(package.origin).parent, Path(torch.origin).parent / "lib"


def module_is_loaded(name: str) -> bool:
    """Whether a DLL of this name is mapped into the process (GetModuleHandleW does not load it)."""
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.GetModuleHandleW.restype = ctypes.c_void_p
    kernel32.GetModuleHandleW.argtypes = [ctypes.c_wchar_p]
    return kernel32.GetModuleHandleW(name) is not None


def same_folder(a: str | Path, b: str | Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def kernels_work() -> None:
    """The native operators are registered and compute what the reference computes."""
    import torch

    from inplace_abn import _native, reference

    check(_native.has_kernels_for("cpu"), "inplace_abn reports native CPU kernels")
    isa = torch.ops.inplace_abn.cpu_isa()
    print(f"  CPU kernels: {isa}")
    forced = os.environ.get("INPLACE_ABN_CPU_ISA")
    if forced:
        check(isa == forced, f"INPLACE_ABN_CPU_ISA={forced} selects the {forced} kernels")
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    mean, var = torch.ops.inplace_abn.statistics(x)
    ref_mean, ref_var = reference.statistics(x)
    check(
        torch.allclose(mean, ref_mean, rtol=0, atol=1e-12) and torch.allclose(var, ref_var, rtol=0, atol=1e-12),
        "torch.ops.inplace_abn.statistics matches the reference",
    )


def case_loader() -> None:
    check(os.environ.get(SKIP_ENV, "") in ("", "0"), f"{SKIP_ENV} is not set")
    package_dir, torch_lib = installed_folders()
    check("torch" not in sys.modules, "torch is not imported before `import inplace_abn`")
    import inplace_abn  # noqa: F401  (the loader imports torch, adds the DLL folders, loads the library)
    from inplace_abn import _native

    status = _native.load()
    cpu = status.libraries["cpu"]
    check(cpu.loaded, "the CPU library loaded" + (f" ({cpu.problem.message()})" if cpu.problem else ""))
    print(f"  DLL folders the loader added: {status.dll_directories}")
    check(
        len(status.dll_directories) == 2
        and same_folder(status.dll_directories[0], torch_lib)
        and same_folder(status.dll_directories[1], package_dir),
        "the loader added exactly torch's lib folder and the package folder",
    )
    kernels_work()


def case_loader_skip() -> None:
    check(os.environ.get(SKIP_ENV, "") not in ("", "0"), f"{SKIP_ENV}=1 is set")
    check("torch" not in sys.modules, "torch is not imported before `import inplace_abn`")
    import torch

    # The loader's first step is `import torch`; see what torch's own __init__ did to the process.
    preloaded = module_is_loaded("torch_cpu.dll")
    print(f"  after `import torch`: torch_cpu.dll mapped into the process: {preloaded}")
    from inplace_abn import _native

    status = _native.load()
    check(status.dll_directories == [], f"with {SKIP_ENV}=1 the loader added no DLL folder")
    cpu = status.libraries["cpu"]
    print(f"  CPU library loaded: {cpu.loaded}; problem: {cpu.problem.message() if cpu.problem else None}")
    # What happens is decided by torch, not by us: torch/__init__.py (_load_dll_libraries) calls
    # os.add_dll_directory(torch\lib) itself and LoadLibraryExW's every DLL in it, and Windows resolves
    # our import of torch_cpu.dll against the module already loaded under that name. The step is then
    # redundant, and the library loads. Should torch stop preloading, the library must fail with the
    # missing-dependency error that the `missing-dll` case reproduces.
    check(preloaded, "torch preloaded torch_cpu.dll on import (why the DLL-directory step is redundant today)")
    check(cpu.loaded, "so the CPU library loads even without the loader's DLL-directory step")
    kernels_work()
    del torch


def case_missing_dll() -> None:
    package_dir, torch_lib = installed_folders()
    library = package_dir / "inplace_abn_cpu.dll"
    check(library.is_file(), f"{library.name} is installed")
    check("torch" not in sys.modules and not module_is_loaded("torch_cpu.dll"), "torch and its DLLs are not loaded")

    # torch.ops.load_library(path) is ctypes.CDLL(path): LoadLibraryExW with the DLL's own folder and the
    # default folders (the application's, System32, those added with os.add_dll_directory); PATH is not
    # searched. Setting PATH shows that it does not help.
    os.environ["PATH"] = f"{torch_lib}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        ctypes.CDLL(str(library))
        raise CheckFailed(f"{library.name} loaded although torch's lib folder was not on the DLL search path")
    except OSError as error:
        failure = error
    print(f"  without torch's lib folder (PATH has it): {type(failure).__name__}: {failure}")
    # CPython turns ERROR_MOD_NOT_FOUND (126) into FileNotFoundError with this text (and no winerror).
    check(
        isinstance(failure, FileNotFoundError) and "(or one of its dependencies)" in str(failure),
        "the load fails with Windows' missing-dependency error (126, ERROR_MOD_NOT_FOUND)",
    )

    # The fix is the loader's DLL-directory step: the same folders, added the same way.
    handles = [os.add_dll_directory(str(folder)) for folder in (torch_lib, package_dir)]
    ctypes.CDLL(str(library))
    check(module_is_loaded("torch_cpu.dll"), "after os.add_dll_directory(torch's lib folder) the same load succeeds")
    del handles

    # The loader's diagnosis of that real error, wrapped the way torch.ops.load_library wraps it.
    import torch

    from inplace_abn import _native

    try:
        raise OSError(f"Could not load this library: {library}") from failure
    except OSError as wrapped:
        problem = _native.diagnose_load_error(wrapped, "cpu", library, _native.Environment(), {})
    print(f"  the loader's diagnosis: {problem.message()}")
    check(
        "depends on was not found" in problem.cause,
        "the loader diagnoses it as a missing dependent DLL (not as an unexpected error)",
    )
    del torch


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    """`python -m inplace_abn doctor ARGS` in a fresh process, as a user would run it, with this
    interpreter's options (bytecode cache, warning filters) passed on. Its output goes to files, not
    pipes: a Wine service that the child starts (explorer.exe /desktop, the first time a process needs a
    window station) inherits its handles and would keep a pipe open for minutes after the child ended."""
    options = ["-X", "utf8", *(f"-W{w}" for w in sys.warnoptions)]
    if sys.pycache_prefix:
        options += ["-X", f"pycache_prefix={sys.pycache_prefix}"]
    command = [sys.executable, *options, "-m", "inplace_abn", "doctor", *args]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out, tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        returncode = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=600).returncode
        out.seek(0)
        err.seek(0)
        run = subprocess.CompletedProcess(command, returncode, out.read(), err.read())
    if run.stderr.strip():
        print("  doctor's stderr: " + run.stderr.strip().replace("\n", "\n    "))
    check(run.returncode == 0, f"`python -m inplace_abn doctor {' '.join(args)}` exits with 0 (got {run.returncode})")
    return run


def cuda_libraries(package_dir: Path) -> list[Path]:
    return sorted(package_dir.glob("inplace_abn_cuda*.dll"))


def case_cuda_unused() -> None:
    package_dir, _ = installed_folders()
    cuda = cuda_libraries(package_dir)
    check(len(cuda) == 1, f"one CUDA library is installed ({[p.name for p in cuda]})")
    import torch

    check(torch.version.cuda is None, f"torch {torch.__version__} is a CPU build")
    from inplace_abn import _native

    status = _native.load()
    check(status.libraries["cpu"].loaded, "the CPU library loaded")
    loaded = [lib.name for lib in status.libraries.values() if lib.loaded]
    print(f"  libraries loaded: {loaded}; CUDA library status: {status.libraries.get('cuda')}")
    check(loaded == ["cpu"], "only the CPU library is loaded")
    check(not module_is_loaded(cuda[0].name), f"{cuda[0].name} is not mapped into the process")
    check(not module_is_loaded("torch_cuda.dll"), "torch_cuda.dll is not mapped into the process")
    check(_native.has_kernels_for("cpu"), "CPU tensors use the native kernels")
    # What loading it anyway (a hand-copied DLL, another loader) gives: Windows error 126, torch_cuda.dll
    # being missing, and the loader's diagnosis of it.
    try:
        ctypes.CDLL(str(cuda[0]))
        raise CheckFailed(f"{cuda[0].name} loaded under a CPU torch")
    except OSError as error:
        failure = error
    print(f"  loading {cuda[0].name} anyway: {type(failure).__name__}: {failure}")
    check("(or one of its dependencies)" in str(failure), "loading it anyway fails: a DLL it needs is missing (126)")
    check(not module_is_loaded("torch_cuda.dll"), "torch_cuda.dll is still not loaded (a CPU torch has none)")
    problem = _native.diagnose_load_error(failure, "cuda", cuda[0], _native.Environment(), status.build_info)
    print(f"  the loader's diagnosis: {problem.message()}")
    check("CUDA library loaded under a CPU-only torch" in problem.cause, "the diagnosis names that case")
    del torch
    # What a user sees: doctor's report names the CUDA library as not loaded, and why.
    text = run_doctor().stdout
    print("  doctor:\n    " + text.strip().replace("\n", "\n    "))
    lines = [line for line in text.splitlines() if line.startswith("library cuda")]
    check(
        len(lines) == 1 and "not loaded: torch is a CPU-only build" in lines[0],
        "doctor: `library cuda  not loaded: torch is a CPU-only build: ...`",
    )
    # A CPU torch is a supported setup (the one wheel carries CUDA libraries for CUDA torch builds): a note,
    # not a warning or an error.
    check(not any(line.startswith(("WARNING", "ERROR")) for line in text.splitlines()), "doctor reports no problem")


def case_doctor() -> None:
    package_dir, torch_lib = installed_folders()
    report = json.loads(run_doctor("--json").stdout)
    folders = report.get("dll_directories")
    print(f"  doctor: CPU kernels {report.get('cpu_kernels')}, built {report['inplace_abn']['build']}")
    print(f"  doctor: dll_directories {folders}")
    check(isinstance(folders, list), 'doctor --json has a "dll_directories" list')
    check(
        len(folders) == 2 and same_folder(folders[0], torch_lib) and same_folder(folders[1], package_dir),
        "doctor lists the DLL folders the loader added: torch's lib folder and the package folder",
    )
    check(report["libraries"]["cpu"]["loaded"], "doctor: the CPU library is loaded")
    check(report["self_test"].get("cpu") == "ok", "doctor: the CPU self-test passed")
    # With a CUDA library in the package and a CPU torch, the only problem may be a warning about it.
    has_cuda = bool(cuda_libraries(package_dir))
    unexpected = [
        p for p in report["problems"] if not (has_cuda and p["severity"] == "warning" and "CUDA" in p["summary"])
    ]
    check(not unexpected, f"doctor found no problem ({report['problems']})")


CASES = {
    "loader": case_loader,
    "loader-skip": case_loader_skip,
    "missing-dll": case_missing_dll,
    "cuda-unused": case_cuda_unused,
    "doctor": case_doctor,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CASES:
        print(f"usage: python checks.py {{{','.join(CASES)}}} [args]", file=sys.stderr)
        return 2
    if sys.platform != "win32":
        print(f"these checks run on Windows (here: {sys.platform})", file=sys.stderr)
        return 2
    print(f"case {argv[0]}: Python {sys.version.split()[0]} at {sys.executable}")
    try:
        CASES[argv[0]](*argv[1:])
    except CheckFailed as failed:
        print(f"  FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
