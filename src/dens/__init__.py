"""dens: BI-RADS breast-density classification from screening mammograms, built for throughput."""

import os
import sys

__version__ = "0.1.0"


def usable_cores() -> int:
    """The CPUs this process may run on: a container's or taskset's share, not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def show_progress(flag: bool | None) -> bool:
    """A command's --progress/--no-progress: as asked, else (None) bars only when stderr is a terminal, so
    a batch job's log gets no carriage-return spam."""
    return sys.stderr.isatty() if flag is None else flag
