"""The machine a benchmark ran on, described the same way in every benchmark's JSON."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any, Iterable


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each package, None when it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def describe() -> dict[str, Any]:
    """Platform, CPU model, Python, cores (and those this process may use), 1-min load."""
    env = dict(platform=platform.platform(), processor=cpu_model(),
               python=platform.python_version(), cpu_count=os.cpu_count(),
               load_average_1min=round(os.getloadavg()[0], 2))
    try:
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return env
