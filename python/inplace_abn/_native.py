"""Finds and loads the native kernel libraries shipped next to this file.

torch is imported first (its libraries must be loaded before ours resolve their symbols). On
Windows, torch's lib folder and this package's folder are added to the DLL search path: since
Python 3.8, PATH is not searched for the dependencies of a DLL. A library that fails to load
never breaks the import: the operators fall back to the pure-PyTorch reference, with one warning
that names the cause and the fix.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
DISABLE_ENV = "INPLACE_ABN_DISABLE_NATIVE"
# Testing aid: skip the DLL-directory step on Windows, to show the failure it prevents.
SKIP_DLL_DIRECTORIES_ENV = "INPLACE_ABN_SKIP_DLL_DIRECTORIES"


@dataclass
class LibraryStatus:
    """What happened when loading one native library."""

    name: str
    path: str | None = None
    loaded: bool = False
    error: str | None = None


@dataclass
class NativeStatus:
    """Outcome of loading the native libraries, for diagnostics."""

    libraries: dict[str, LibraryStatus] = field(default_factory=dict)
    dll_directories: list[str] = field(default_factory=list)
    build_info: dict = field(default_factory=dict)


_status: NativeStatus | None = None
_dll_handles: list = []  # os.add_dll_directory handles must stay alive


def _library_file(name: str) -> Path | None:
    suffix = ".dll" if sys.platform == "win32" else ".so"
    path = PACKAGE_DIR / f"inplace_abn_{name}{suffix}"
    return path if path.exists() else None


def _add_dll_directories(status: NativeStatus) -> None:
    if sys.platform != "win32" or os.environ.get(SKIP_DLL_DIRECTORIES_ENV, "") not in ("", "0"):
        return
    for folder in (Path(torch.__file__).resolve().parent / "lib", PACKAGE_DIR):
        if folder.is_dir():
            _dll_handles.append(os.add_dll_directory(str(folder)))
            status.dll_directories.append(str(folder))


def _read_build_info() -> dict:
    try:
        return json.loads((PACKAGE_DIR / "build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _load_library(name: str, status: NativeStatus) -> LibraryStatus:
    lib = LibraryStatus(name)
    path = _library_file(name)
    if path is None:
        lib.error = (
            f"the native {name.upper()} library is not installed (no inplace_abn_{name} library in {PACKAGE_DIR}); "
            "this happens when running from a source checkout or an incomplete install. "
            "Fix: pip install a prebuilt wheel, or build from source with "
            "`pip install --no-build-isolation .` in an environment that has torch"
        )
        return lib
    lib.path = str(path)
    try:
        torch.ops.load_library(str(path))
        lib.loaded = True
    except (OSError, RuntimeError) as error:
        built_for = status.build_info.get("torch_target", "unknown")
        lib.error = (
            f"loading {path} failed: {error}. torch is {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}); the library was built for torch>={built_for}. "
            "Fix: install torch>=2.10 and reinstall inplace-abn for this platform "
            "(pip install --force-reinstall inplace-abn)"
        )
    return lib


def load() -> NativeStatus:
    """Loads the native libraries once and returns what happened."""
    global _status
    if _status is not None:
        return _status
    status = NativeStatus(build_info=_read_build_info())
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        status.libraries["cpu"] = LibraryStatus("cpu", error=f"the native kernels are disabled by {DISABLE_ENV}=1")
    else:
        _add_dll_directories(status)
        status.libraries["cpu"] = _load_library("cpu", status)
    if not status.libraries["cpu"].loaded:
        warnings.warn(
            f"inplace_abn: using the pure-PyTorch fallback (correct, but slower, with larger temporaries) "
            f"because {status.libraries['cpu'].error}",
            RuntimeWarning,
            stacklevel=2,
        )
    _status = status
    return status


def has_kernels_for(device_type: str) -> bool:
    """Whether a loaded native library has kernels for this device type ("cpu", "cuda")."""
    lib = load().libraries.get(device_type)
    return lib is not None and lib.loaded
