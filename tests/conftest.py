"""Test configuration: tests run against the installed package, never the source tree."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings(record=True) as _load_warnings:
    # The loader warns once about its problems (e.g. a CUDA wheel under a CPU-only torch, in the
    # wheel workflow's tests); the report header shows them, tests assert on them where they matter.
    warnings.simplefilter("always")
    import inplace_abn

REPO = Path(__file__).resolve().parents[1]

if sys.version_info[:3] == (3, 13, 0):
    # torch.compile warns "Guards may run slower on Python 3.13.0" (a CPython 3.13.0 bug fixed in 3.13.1),
    # which warnings-as-errors would turn into failures of every compile test: a notice about the
    # interpreter, switched off by the setting torch provides for it.
    import torch._dynamo

    if hasattr(torch._dynamo.config, "issue_3_13_0_warning"):
        torch._dynamo.config.issue_3_13_0_warning = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config: pytest.Config) -> list[str]:
    from inplace_abn import _native

    status = _native.load()
    libs = ", ".join(f"{name}: {'loaded' if lib.loaded else 'not loaded'}" for name, lib in status.libraries.items())
    return [
        f"inplace_abn {inplace_abn.__version__} from {Path(inplace_abn.__file__).parent}",
        f"native: {libs}",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}",
        *(f"load warning: {w.message}" for w in _load_warnings),
    ]


def pytest_sessionstart(session: pytest.Session) -> None:
    package = Path(inplace_abn.__file__).resolve()
    if package.is_relative_to(REPO / "python") and not os.environ.get("INPLACE_ABN_TEST_SOURCE_TREE"):
        raise pytest.UsageError(
            f"inplace_abn was imported from the source tree ({package}); the tests run against the installed "
            "wheel: use `bash scripts/test.sh`"
        )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
