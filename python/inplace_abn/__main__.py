"""Command line: `python -m inplace_abn bench` (or `inplace-abn bench`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "bench": "U-Net training with BatchNorm2d + LeakyReLU vs InPlaceABN: memory and time",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to a subcommand; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        usage = "usage: inplace-abn {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(
            f"  {name:<8}{text}" for name, text in COMMANDS.items()
        )
        unknown = args and args[0] not in ("-h", "--help")
        print(usage + (f"\n\nunknown command {args[0]!r}" if unknown else ""), file=sys.stderr if unknown else sys.stdout)
        return 2 if unknown or not args else 0
    if args[0] == "bench":
        from .bench import main as bench

        return bench(args[1:])
    return 2


if __name__ == "__main__":
    sys.exit(main())
