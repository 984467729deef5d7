"""The JSON report the CPU benchmark scripts write: the command that reproduces the run, the machine, a note."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from inplace_abn.bench import environment


def write_report(script: str, args: argparse.Namespace, cases: list[Any]) -> None:
    """Writes {command, machine, note, cases} to args.json (nothing when it is not set)."""
    if not args.json:
        return
    options = " ".join(
        f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items() if v not in (None, False, "") and k != "json"
    )
    report = {
        "command": f"python benchmarks/{script} {options}",
        "machine": environment(torch.device("cpu")),
        "note": args.note,
        "cases": cases,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
