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
