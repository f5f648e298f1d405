"""Collection rules for the whole repository (pytest reads this before tests/conftest.py).

``--doctest-modules`` (pyproject) imports every module of ``lightning_moe`` to run its docstring examples. A module
that needs an optional dependency which is not installed (``transformers``, ``matplotlib``, ...) is left out and
named in the summary; any other import error fails the run as usual.
"""

from __future__ import annotations

import importlib
from pathlib import Path

OPTIONAL_DEPENDENCIES = ("transformers", "matplotlib", "tensorboard", "torchvision", "fairscale", "jsonargparse")
PACKAGE = Path(__file__).resolve().parent / "lightning_moe"
_left_out: list[str] = []


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if collection_path.suffix != ".py" or PACKAGE not in collection_path.resolve().parents:
        return None
    module = ".".join(collection_path.resolve().relative_to(PACKAGE.parent).with_suffix("").parts)
    try:
        importlib.import_module(module.removesuffix(".__init__"))
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing in OPTIONAL_DEPENDENCIES:
            _left_out.append(f"{module} (needs {missing})")
            return True
    return None  # pytest imports it again and reports any other error


def pytest_terminal_summary(terminalreporter) -> None:
    if _left_out:
        terminalreporter.write_line(f"doctests left out, optional dependency missing: {', '.join(_left_out)}")
