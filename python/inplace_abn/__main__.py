"""Command line: `python -m inplace_abn {bench,doctor}` (or `inplace-abn {bench,doctor}`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _bench(args: list[str]) -> int:
    from .bench import main

    return main(args)


def _doctor(args: list[str]) -> int:
    from .doctor import main

    return main(args)


def torch_import_failed(error: BaseException, args: Sequence[str]) -> int:
    """`doctor` when torch itself cannot be imported (the package cannot be imported either): says so,
    with the error and the fix, as text or as JSON (`--json`). Returns the exit status (1)."""
    import json
    import platform

    problem = {
        "severity": "error",
        "summary": f"torch cannot be imported: {type(error).__name__}: {error}",
        "cause": "torch is not installed in this environment"
        if isinstance(error, ImportError)
        else "torch is installed but its libraries fail to load (on Windows: a missing or outdated Visual C++ "
        "runtime, a broken or mixed torch install)",
        "fix": "pip install torch (GPU builds: https://pytorch.org/get-started/locally/)"
        if isinstance(error, ImportError)
        else 'make `python -c "import torch"` work first: reinstall torch in a fresh environment; on Windows '
        "install the latest Visual C++ redistributable (https://aka.ms/vs/17/release/vc_redist.x64.exe); "
        "see docs/windows.md",
    }
    report = {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "os": {"platform": platform.platform()},
        "torch": None,
        "problems": [problem],
    }
    if "--json" in args:
        print(json.dumps(report, indent=2))
    else:
        print(f"python        {platform.python_version()} ({sys.executable})")
        print(f"os            {platform.platform()}")
        print("torch         cannot be imported\n")
        print(f"ERROR: {problem['summary']}\n  cause: {problem['cause']}\n  fix:   {problem['fix']}")
    return 1


COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "bench": ("U-Net training with BatchNorm2d + LeakyReLU vs InPlaceABN: memory and time", _bench),
    "doctor": ("diagnose this environment: torch, CUDA, GPUs, native libraries, problems and fixes", _doctor),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a subcommand; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]][1](args[1:])
    usage = "usage: inplace-abn {" + ",".join(COMMANDS) + "} [options]\n\n"
    usage += "\n".join(f"  {name:<8}{text}" for name, (text, _) in COMMANDS.items())
    if args and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    problem = f"unknown command {args[0]!r}" if args else "a command is required"
    print(f"{usage}\n\ninplace-abn: error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
