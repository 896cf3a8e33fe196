"""The machine a benchmark ran on, described the same way in every benchmark's JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from typing import Any, Callable, Iterable


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


def config_main(argv: list[str] | None, define_flags: Callable[[], None],
                run: Callable[[Any, Any], dict[str, Any]]) -> None:
    """The command line of a benchmark of one config: `--config configs/<size>.py` (any field
    overridable, e.g. `--config.model.encoder.d_model=512`) plus the absl flags `define_flags()`
    declares; prints `run(config, flags.FLAGS)` as one JSON object."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                                  lock_config=True)
    define_flags()
    flags.mark_flags_as_required(["config"])

    def _main(argv):
        del argv
        print(json.dumps(run(config_flag.value, flags.FLAGS), indent=2))
        sys.stdout.flush()

    app.run(_main, argv=argv)
