"""dens: BI-RADS breast-density classification from screening mammograms, built for throughput."""

import importlib
import os
import sys
from collections.abc import Callable

__version__ = "0.1.0"


def usable_cores() -> int:
    """The CPUs this process may run on: a container's or taskset's share, not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def show_progress(flag: bool | None) -> bool:
    """A command's --progress/--no-progress: as asked, else (None) bars only when stderr is a terminal, so
    a batch job's log gets no carriage-return spam."""
    return sys.stderr.isatty() if flag is None else flag


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun, in the form a summary line reads: ``1 file``, ``0 files``, ``3 files``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def lazy_exports(package: str, module_of: dict[str, str]) -> Callable[[str], object]:
    """A package's module-level ``__getattr__`` (PEP 562) that imports each public name from its module
    (``module_of``: name -> module) when it is first used. A stage package uses it so that importing its command
    (``dens.<stage>.cli``, whose usage errors and --help answer at once) does not import torch."""

    def __getattr__(name: str) -> object:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module_of[name]), name)

    return __getattr__
