"""How the benchmarks name the machine their figures were measured on."""

from __future__ import annotations

import os
import platform

import psutil


def machine() -> str:
    """The system, cores, memory and Python the figures were measured on."""
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}"
    )
